"""SelfAlign as one pluggable module: LCA + CRA losses and the context-augmented retrieval embeddings.

Retrieval embeddings (method.md §1.5, VSRN form), with base globals ``v``/``t`` and context outputs of §1.4::

    image = [v; 0.5 c_V; 0.5 m_V]      text = [t; m_T; c_T]
    image . text = v.t + 0.5 c_V.m_T + 0.5 m_V.c_T

so retrieval stays a single inner product between independently computed embeddings. With ``cfg.cra`` off
the embeddings are the base ones (width d); with it on they have width 3d (see ``embedding_dim``).

To compute the heads once per training step: ``ic = sa.image_context(...)``, ``tc = sa.text_context(...)``,
then ``sa.embed_image(v, ic)``, ``sa.embed_text(t, tc)`` and ``sa.losses_from(..., ic, tc)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from selfalign.align.cra import ContextHead, ContextOutput, cra_loss
from selfalign.align.lca import LCA
from selfalign.config import AlignConfig
from selfalign.errors import ConfigError, InputError

__all__ = ["SelfAlign"]

_CONTEXT_WEIGHT = 0.5  # hard-coded in the official code (the `--exp_sim` option is parsed but unused)


class SelfAlign(nn.Module):
    """LCA (``self.lca``, when ``cfg.lca``) and CRA heads (``self.image_head``/``self.text_head``, when ``cfg.cra``)."""

    def __init__(self, dim: int, cfg: AlignConfig, distributed: bool = False) -> None:
        super().__init__()
        if cfg.cra_temperature <= 0:
            raise ConfigError(f"align.cra_temperature: must be > 0, got {cfg.cra_temperature}")
        if cfg.cra_negatives < 0:
            raise ConfigError(f"align.cra_negatives: must be >= 0, got {cfg.cra_negatives}")
        for name in ("lca_weight", "cra_weight"):
            value = getattr(cfg, name)
            # 0 is allowed: the head still trains its context embeddings through the ranking loss, without its loss.
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"align.{name}: must be a finite number >= 0, got {value}")
        self.dim = dim
        self.cfg = cfg
        self.image_head = ContextHead(dim) if cfg.cra else None
        self.text_head = ContextHead(dim) if cfg.cra else None
        self.lca = (
            LCA(
                dim,
                codebook_size=cfg.codebook_size,
                epsilon=cfg.sinkhorn_epsilon,
                iterations=cfg.sinkhorn_iters,
                student_temperature=cfg.student_temperature,
                direction=cfg.lca_direction,
                distributed=distributed,
            )
            if cfg.lca
            else None
        )

    @property
    def embedding_dim(self) -> int:
        """Width of the retrieval embeddings: 3d with CRA, d without."""
        return 3 * self.dim if self.cfg.cra else self.dim

    # --- context heads -------------------------------------------------------------------------------------
    def image_context(self, img_context: torch.Tensor, img_mask: torch.Tensor) -> ContextOutput | None:
        """Image head on contextual region locals ``[B, R, d]`` (None when CRA is off)."""
        return None if self.image_head is None else self.image_head(img_context, img_mask)

    def text_context(self, txt_context: torch.Tensor, txt_mask: torch.Tensor) -> ContextOutput | None:
        """Text head on contextual word locals ``[B, L, d]`` (None when CRA is off)."""
        return None if self.text_head is None else self.text_head(txt_context, txt_mask)

    # --- retrieval embeddings ------------------------------------------------------------------------------
    def embed_image(self, base: torch.Tensor, ctx: ContextOutput | None) -> torch.Tensor:
        """``[v; 0.5 c_V; 0.5 m_V]`` -> ``[B, 3d]`` from base ``v [B, d]``; ``base`` itself when CRA is off."""
        if self.image_head is None:
            return base
        _check_base("image base", base, ctx, self.dim)
        return torch.cat([base, _CONTEXT_WEIGHT * ctx.fused, _CONTEXT_WEIGHT * ctx.local_mean], dim=-1)

    def embed_text(self, base: torch.Tensor, ctx: ContextOutput | None) -> torch.Tensor:
        """``[t; m_T; c_T]`` -> ``[B, 3d]`` from base ``t [B, d]``; ``base`` itself when CRA is off."""
        if self.text_head is None:
            return base
        _check_base("text base", base, ctx, self.dim)
        return torch.cat([base, ctx.local_mean, ctx.fused], dim=-1)

    def image_embedding(self, base: torch.Tensor, img_context: torch.Tensor, img_mask: torch.Tensor) -> torch.Tensor:
        """Image retrieval embedding ``[B, 3d]`` (or ``base`` without CRA) in one call."""
        return self.embed_image(base, self.image_context(img_context, img_mask))

    def text_embedding(self, base: torch.Tensor, txt_context: torch.Tensor, txt_mask: torch.Tensor) -> torch.Tensor:
        """Text retrieval embedding ``[B, 3d]`` (or ``base`` without CRA) in one call."""
        return self.embed_text(base, self.text_context(txt_context, txt_mask))

    # --- training losses -----------------------------------------------------------------------------------
    def losses_from(
        self,
        img_free: torch.Tensor,
        img_mask: torch.Tensor,
        txt_free: torch.Tensor,
        txt_mask: torch.Tensor,
        img_ctx: ContextOutput | None,
        txt_ctx: ContextOutput | None,
        word_weight: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Weighted losses ``{"lca": ..., "cra": ...}`` (keys only for enabled parts) from precomputed head outputs.

        ``cra = cra_weight * 0.5 [NCE(norm(e_T), l_V) + NCE(norm(e_V), l_T)]``; ``lca = lca_weight * LCA(...)``.
        """
        out: dict[str, torch.Tensor] = {}
        if self.lca is not None:
            out["lca"] = self.cfg.lca_weight * self.lca(img_free, img_mask, txt_free, txt_mask, word_weight)
        if self.image_head is not None:
            if img_ctx is None or txt_ctx is None:
                raise InputError("losses_from: CRA is enabled, so img_ctx and txt_ctx must be ContextOutputs")
            t2v = cra_loss(
                F.normalize(txt_ctx.enhanced, dim=-1), img_ctx.locals, img_ctx.mask,
                self.cfg.cra_temperature, self.cfg.cra_negatives, self.cfg.cra_positives,
            )
            v2t = cra_loss(
                F.normalize(img_ctx.enhanced, dim=-1), txt_ctx.locals, txt_ctx.mask,
                self.cfg.cra_temperature, self.cfg.cra_negatives, self.cfg.cra_positives,
            )
            out["cra"] = self.cfg.cra_weight * 0.5 * (t2v + v2t)
        return out

    def losses(
        self,
        img_free: torch.Tensor,
        img_context: torch.Tensor,
        img_mask: torch.Tensor,
        txt_free: torch.Tensor,
        txt_context: torch.Tensor,
        txt_mask: torch.Tensor,
        word_weight: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``losses_from`` computing the heads itself (free ``[B, R|L, d]`` unit-norm, context ``[B, R|L, d]``)."""
        return self.losses_from(
            img_free, img_mask, txt_free, txt_mask,
            self.image_context(img_context, img_mask), self.text_context(txt_context, txt_mask), word_weight,
        )

    # --- codebook freeze (delegates to LCA; no-ops without LCA) --------------------------------------------
    def freeze_codebook(self, flag: bool = True) -> None:
        """Freeze (or unfreeze) the LCA codebook; see ``LCA`` for the mechanism."""
        if self.lca is not None:
            self.lca.freeze_codebook(flag)

    def drop_frozen_grad(self) -> None:
        """Call after ``backward()`` and before clipping / ``optimizer.step()``."""
        if self.lca is not None:
            self.lca.drop_frozen_grad()


def _check_base(name: str, base: torch.Tensor, ctx: ContextOutput | None, dim: int) -> None:
    if ctx is None:
        raise InputError(f"{name}: CRA is enabled, so a ContextOutput is required")
    if base.dim() != 2 or base.shape[1] != dim or base.shape[0] != ctx.fused.shape[0]:
        raise InputError(f"{name}: expected shape [{ctx.fused.shape[0]}, {dim}], got {tuple(base.shape)}")
