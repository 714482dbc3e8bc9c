"""LCA: concept-level alignment through a shared prototype codebook with Sinkhorn codes (method.md §1.3).

Text -> image (the official direction): every valid region of the batch gets an equipartitioned soft code
``q`` over the K prototypes (Sinkhorn on ``C v``, detached). Every valid word picks, by hard argmax of the
cosine, one region of its OWN image and must predict that region's code with ``softmax(C w / tau_s)``::

    L_t2i = mean over captions [ (1 / n_T) * sum_t  CE(q_{r*(t)}, softmax(C w_t / tau_s)) ]

Regions get no gradient from this direction: targets are detached and the argmax is not differentiable.
The "symmetric" variant adds the mirror term (codes over all valid words; every valid region predicts the
code of its best word in the paired caption) and returns the mean of the two directions.

Padding never participates: codes, matches and the loss are built from masked selections only.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from selfalign.align._checks import check_locals, check_same_batch, valid_locals
from selfalign.align.sinkhorn import sinkhorn
from selfalign.errors import ConfigError, InputError

__all__ = ["LCA"]


class LCA(nn.Module):
    """Prototype codebook ``C [K, d]`` (shared by both modalities) and the LCA loss.

    Freezing (SwAV's ``freeze_prototypes_niters``, the official code's epoch-0 freeze): ``freeze_codebook(True)``
    only sets a flag; the trainer calls ``drop_frozen_grad()`` after ``backward()`` and before clipping and the
    optimizer step, which sets the codebook's ``.grad`` to ``None`` so optimizers skip it entirely (no update,
    no weight decay, no moment state). ``requires_grad`` is never toggled, so a DistributedDataParallel wrapper
    built before the freeze keeps reducing the codebook's gradient on every rank.

    Every forward renormalises the codebook rows in place, so run ``backward()`` on one LCA loss before
    computing the next (as any forward/backward training step does).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int = 1024,
        epsilon: float = 0.05,
        iterations: int = 3,
        student_temperature: float = 0.1,
        direction: Literal["text_to_image", "symmetric"] = "text_to_image",
        distributed: bool = False,
    ) -> None:
        super().__init__()
        if direction not in ("text_to_image", "symmetric"):
            raise ConfigError(f"align.lca_direction: {direction!r} is not one of ['text_to_image', 'symmetric']")
        for key, value in (("codebook_size", codebook_size), ("sinkhorn_iters", iterations)):
            if value < 1:
                raise ConfigError(f"align.{key}: must be >= 1, got {value}")
        for key, value in (("sinkhorn_epsilon", epsilon), ("student_temperature", student_temperature)):
            if value <= 0:
                raise ConfigError(f"align.{key}: must be > 0, got {value}")
        self.dim = dim
        # nn.Linear gives PyTorch's default (Kaiming-uniform) init, as the official `v_prototypes`.
        self.prototypes = nn.Linear(dim, codebook_size, bias=False)
        self.epsilon = epsilon
        self.iterations = iterations
        self.student_temperature = student_temperature
        self.direction = direction
        self.distributed = distributed
        self._frozen = False

    @property
    def codebook(self) -> torch.Tensor:
        """The prototypes ``[K, d]`` (rows unit-norm after any forward)."""
        return self.prototypes.weight

    def freeze_codebook(self, flag: bool = True) -> None:
        """Mark the codebook frozen (or not); takes effect through ``drop_frozen_grad()``."""
        self._frozen = bool(flag)

    @property
    def codebook_frozen(self) -> bool:
        return self._frozen

    def drop_frozen_grad(self) -> None:
        """If frozen, discard the codebook gradient (call after backward, before clipping / optimizer step)."""
        if self._frozen:
            self.prototypes.weight.grad = None

    @torch.no_grad()
    def initialize_codebook(self, features: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Set the prototypes to ``K`` rows of ``features [N, d]`` drawn at random (``codebook_init=data``).

        Without replacement when ``N >= K``; otherwise every feature is used and the rest are drawn again with a
        small perturbation (std 0.01 per coordinate), so no two prototypes coincide. Rows are L2-normalised.
        """
        if features.dim() != 2 or features.shape[1] != self.dim or features.shape[0] == 0:
            raise InputError(f"features: expected shape [N > 0, {self.dim}], got {tuple(features.shape)}")
        features = features.detach().float().cpu()
        size = self.prototypes.weight.shape[0]
        order = torch.randperm(features.shape[0], generator=generator)
        picked = features[order[:size]]
        if picked.shape[0] < size:
            extra = features[torch.randint(features.shape[0], (size - picked.shape[0],), generator=generator)]
            noise = torch.randn(extra.shape, generator=generator) * 0.01
            picked = torch.cat([picked, F.normalize(extra, dim=1) + noise])
        w = self.prototypes.weight
        w.copy_(F.normalize(picked, dim=1).to(w.device, w.dtype))

    @torch.no_grad()
    def normalize_codebook(self) -> None:
        """L2-normalise the prototype rows in place (SwAV does this before every forward)."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    @torch.no_grad()
    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """Hard code of each feature: ``argmax_k C_k . x`` over unit-norm prototypes. ``[N, d] -> [N]`` long."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise InputError(f"features: expected shape [N, {self.dim}], got {tuple(features.shape)}")
        protos = F.normalize(self.prototypes.weight, dim=1)
        return (features.to(protos.dtype) @ protos.t()).argmax(dim=1)

    def forward(
        self,
        img_free: torch.Tensor,
        img_mask: torch.Tensor,
        txt_free: torch.Tensor,
        txt_mask: torch.Tensor,
        word_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LCA loss (scalar) from context-free locals ``img_free [B, R, d]``, ``txt_free [B, L, d]`` (unit-norm).

        ``img_mask [B, R]``, ``txt_mask [B, L]``: True = valid. ``word_weight [B, L]`` (optional, >= 0, usually a
        0/1 mask such as "is a noun") restricts the words that take part: per-caption averages become weighted
        averages, captions whose selected weight is zero are left out of the batch mean, and in the symmetric
        variant regions are matched among the selected words only (all valid words still get Sinkhorn codes).
        """
        check_locals("img_free", img_free, img_mask, self.dim)
        check_locals("txt_free", txt_free, txt_mask, self.dim)
        check_same_batch("img_free", img_free, "txt_free", txt_free)
        img_mask = img_mask.bool()
        txt_mask = txt_mask.bool()
        weight = txt_mask.float()
        if word_weight is not None:
            if tuple(word_weight.shape) != tuple(txt_mask.shape):
                raise InputError(f"word_weight: expected shape {tuple(txt_mask.shape)}, got {tuple(word_weight.shape)}")
            if bool((word_weight < 0).any()):
                raise InputError("word_weight: weights must be >= 0")
            weight = weight * word_weight.float()
        # Gradients flow through the valid rows only (gathered below); the matching works on detached copies
        # with the padding zeroed, so garbage there (even NaN) cannot leak through 0 * x in any product.
        with torch.no_grad():
            img_match = img_free.masked_fill(~img_mask.unsqueeze(-1), 0.0)
            txt_match = txt_free.masked_fill(~txt_mask.unsqueeze(-1), 0.0)

        self.normalize_codebook()
        # 1/tau folded into the [K, d] codebook instead of dividing every [N, K] logit: the projection C.x / tau
        # is both the student logits and (rescaled through epsilon) the Sinkhorn scores.
        student = self.prototypes.weight / self.student_temperature
        eps = self.epsilon / self.student_temperature
        symmetric = self.direction == "symmetric"
        img_rows, img_valid = _valid_rows(img_free, img_mask)
        txt_rows, txt_valid = _valid_rows(txt_free, txt_mask)
        with torch.set_grad_enabled(symmetric and torch.is_grad_enabled()):
            img_logits = img_valid @ student.t().to(img_valid.dtype)  # [N_regions, K]
        txt_logits = txt_valid @ student.t().to(txt_valid.dtype)  # [N_words, K]

        img_codes = sinkhorn(img_logits.detach(), eps, self.iterations, self.distributed)
        loss = self._predict(img_match, img_rows, img_codes, img_mask, txt_match, txt_rows, txt_logits, weight)
        if symmetric:
            txt_codes = sinkhorn(txt_logits.detach(), eps, self.iterations, self.distributed)
            mirror = self._predict(txt_match, txt_rows, txt_codes, weight > 0, img_match, img_rows, img_logits,
                                   img_mask.float())
            loss = 0.5 * (loss + mirror)
        return loss

    def _predict(
        self,
        target: torch.Tensor,
        target_rows: torch.Tensor,
        codes: torch.Tensor,
        match_mask: torch.Tensor,
        source: torch.Tensor,
        source_rows: torch.Tensor,
        source_logits: torch.Tensor,
        source_weight: torch.Tensor,
    ) -> torch.Tensor:
        """One direction: sources ``[B, S, d]`` predict the Sinkhorn code of their best target ``[B, M, d]``.

        ``source``/``target`` serve the matching only (padding zeroed; no gradient); the prediction's gradient
        flows through ``source_logits``.

        ``target_rows [B, M]`` / ``source_rows [B, S]``: row of each position in ``codes [N_t, K]`` /
        ``source_logits [N_s, K]`` (-1 at padding); ``match_mask [B, M]``: targets a source may be matched to
        (valid, and selected); ``source_weight [B, S]``: > 0 for the sources that take part.
        """
        batch, n_sources, _ = source.shape
        n_targets = target.shape[1]
        with torch.no_grad():
            sim = torch.bmm(source, target.transpose(1, 2))  # [B, S, M] cosines
            best = sim.masked_fill(~match_mask.unsqueeze(1), float("-inf")).argmax(dim=2)  # [B, S]
            takes_part = (source_weight > 0) & match_mask.any(dim=1, keepdim=True)
            b_idx, s_idx = takes_part.nonzero(as_tuple=True)
            tgt = target_rows.reshape(-1)[b_idx * n_targets + best[b_idx, s_idx]]
            src = source_rows.reshape(-1)[b_idx * n_sources + s_idx]
        if b_idx.numel() == 0:
            return self.prototypes.weight.sum() * 0.0  # nothing to predict; keeps a graph so backward() works
        # Rows are numbered in the same row-major order nonzero() walks, so when every source takes part src is
        # 0..N-1: skip the gathers, whose backward (an accumulating scatter of [N, K]) costs more than the loss.
        logits = source_logits if src.numel() == source_logits.shape[0] else source_logits.index_select(0, src)
        # [n]: soft targets, -sum q log softmax
        ce = F.cross_entropy(logits.float(), codes.index_select(0, tgt), reduction="none")
        w = source_weight[b_idx, s_idx].float()
        num = ce.new_zeros(batch).index_add(0, b_idx, ce * w)
        den = ce.new_zeros(batch).index_add(0, b_idx, w)
        present = den > 0
        return (num[present] / den[present]).mean()


def _valid_rows(feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid locals ``[N, d]`` of ``feats [B, L, d]`` and the row of each position ``[B, L]`` (-1 at padding)."""
    valid, flat, _ = valid_locals(feats, mask)
    rows = torch.full((mask.numel(),), -1, dtype=torch.long, device=mask.device)
    rows[flat] = torch.arange(flat.numel(), device=mask.device)
    return rows.view(mask.shape), valid
