"""The dual encoder: independent image and text encoders, optionally trained with SelfAlign.

Images and captions are embedded separately; one dot product of the embeddings scores a pair, so a gallery is
embedded once and searched with an index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from selfalign.config import AlignConfig, ModelConfig
from selfalign.data.text import TokenBatch, Vocabulary
from selfalign.errors import ConfigError, InputError
from selfalign.model.image_encoder import ImageEncoder
from selfalign.model.text_encoder import GRUTextEncoder, MiniLMTextEncoder


@dataclass
class Encoded:
    """One modality's encoding of a batch.

    ``embedding [B, E]`` retrieval embedding; ``base [B, d]`` pooled and L2-normalised; ``free [B, L, d]``
    context-free locals (L2-normalised); ``context [B, L, d]`` contextual locals; ``mask [B, L]`` valid positions;
    ``heads`` SelfAlign's context-head output (reused by its losses), or None.
    """

    embedding: torch.Tensor
    base: torch.Tensor
    free: torch.Tensor
    context: torch.Tensor
    mask: torch.Tensor
    heads: Any = None


class RetrievalModel(nn.Module):
    """Dual encoder with ``encode_image`` / ``encode_text``; ``align`` is the SelfAlign module or None.

    ``model.similarity=scan`` turns the same encoders into the cross-attention baseline: pairs are scored by SCAN
    t2i attention over the contextual locals (:meth:`similarity`), and SelfAlign is not built (its CRA output is
    the retrieval embedding, which SCAN never uses; keeping the baseline plain keeps the comparison clean).
    """

    def __init__(self, model_cfg: ModelConfig, align_cfg: AlignConfig, vocab: Vocabulary | None,
                 init_pretrained: bool = True):
        super().__init__()
        self.model_cfg = model_cfg
        self.align_cfg = align_cfg
        d = model_cfg.embed_dim
        self.image_tail = None
        region_dim = model_cfg.image_dim
        if model_cfg.image_backbone_tail:
            from selfalign.vision.backbone import FEATURE_DIM, TAIL_IN_DIM, BackboneTail

            if model_cfg.image_dim != TAIL_IN_DIM:
                raise ConfigError(f"config key 'model.image_dim': must be {TAIL_IN_DIM} (the map entering the "
                                  f"backbone's top, a store of regions=tail) with model.image_backbone_tail, got "
                                  f"{model_cfg.image_dim}")
            self.image_tail = BackboneTail(pretrained=init_pretrained)
            region_dim = FEATURE_DIM
        self.image_encoder = ImageEncoder(region_dim, d, model_cfg.image_context_layers,
                                          model_cfg.image_context_heads, model_cfg.dropout, model_cfg.pooling,
                                          model_cfg.image_mean_skip)
        if model_cfg.text_encoder == "minilm":
            self.text_encoder: nn.Module = MiniLMTextEncoder(d, model_cfg.max_words, model_cfg.pooling,
                                                                model_cfg.minilm_trainable_layers)
        else:
            assert vocab is not None, "the BiGRU text encoder needs a vocabulary"
            self.text_encoder = GRUTextEncoder(vocab, d, model_cfg.word_dim, model_cfg.gru_layers, model_cfg.max_words,
                                               model_cfg.pooling, model_cfg.glove, model_cfg.dropout,
                                               load_vectors=init_pretrained)
        for key in ("scan_lambda_softmax", "scan_lambda_lse"):
            if getattr(model_cfg, key) <= 0:
                raise ConfigError(f"config key 'model.{key}': must be > 0, got {getattr(model_cfg, key)}")
        self.align = None
        if model_cfg.similarity == "dot" and (align_cfg.lca or align_cfg.cra):
            from selfalign.align import SelfAlign

            self.align = SelfAlign(d, align_cfg)

    @property
    def vocab(self) -> Vocabulary | None:
        return getattr(self.text_encoder, "vocab", None)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, captions: list[str]) -> TokenBatch:
        return self.text_encoder.tokenize(captions)

    def encode_image(self, regions: torch.Tensor, mask: torch.Tensor) -> Encoded:
        """``regions [B, R, D_in]``, ``mask [B, R]`` -> Encoded with ``embedding [B, E]``.

        With ``model.image_backbone_tail`` the regions are the ``G x G`` cells of the map entering the backbone's
        top (``[B, G*G, 192]``, row by row); the top turns them into the final cells, and the whole image (their
        mean) is put first, so the encoder sees ``[B, 1 + G*G, 1280]`` as from a grid store. A masked cell (region
        dropout) still feeds the convolutions; only its final region is left out.
        """
        if self.image_tail is not None:
            regions, mask = self._tail_regions(regions, mask)
        base, free, context = self.image_encoder(regions, mask)
        if self.align is not None and self.align_cfg.cra:
            heads = self.align.image_context(context, mask)
            return Encoded(self.align.embed_image(base, heads), base, free, context, mask, heads)
        return Encoded(base, base, free, context, mask)

    def _tail_regions(self, cells: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cells [B, G*G, 192]``, ``mask [B, G*G]`` -> final regions ``[B, 1 + G*G, 1280]`` and their mask."""
        side = round(cells.shape[1] ** 0.5)
        if side * side != cells.shape[1]:
            raise InputError(f"model.image_backbone_tail needs the G x G cells of a regions=tail store, got "
                             f"{cells.shape[1]} regions per image")
        maps = cells.to(self.image_tail.conv_head.weight.dtype).transpose(1, 2).unflatten(2, (side, side))
        final = self.image_tail(maps).flatten(2).transpose(1, 2)  # [B, G*G, 1280]
        regions = torch.cat([final.mean(dim=1, keepdim=True), final], dim=1)
        return regions, torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)

    def region_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Stored region boxes ``[R, 4]`` -> the boxes of the regions :meth:`encode_image` returns (a backbone-top
        run puts the whole image first)."""
        if self.image_tail is None:
            return boxes
        return np.concatenate([np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32), np.asarray(boxes, np.float32)])

    def encode_text(self, tokens: TokenBatch) -> Encoded:
        """Token batch ``ids [B, L]`` -> Encoded with ``embedding [B, E]``."""
        base, free, context, mask = self.text_encoder(tokens)
        if self.align is not None and self.align_cfg.cra:
            heads = self.align.text_context(context, mask)
            return Encoded(self.align.embed_text(base, heads), base, free, context, mask, heads)
        return Encoded(base, base, free, context, mask)

    def align_losses(self, image: Encoded, text: Encoded, word_weight: torch.Tensor | None = None) -> dict:
        """SelfAlign's weighted losses for matched pairs (row b of ``image`` ↔ row b of ``text``); {} without it."""
        if self.align is None:
            return {}
        return self.align.losses_from(image.free, image.mask, text.free, text.mask, image.heads, text.heads,
                                      word_weight)

    @staticmethod
    def scoring_locals(enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """The locals SCAN attends over: ``(context [B, L, d], mask [B, L])``.

        The contextual locals, on both sides: for text they are SCAN's own BiGRU word features; for images they
        add the residual MLP and region self-attention to SCAN's FC regions, so the baseline is at least as strong
        as published SCAN, and every encoder layer it trains is one it uses.
        """
        return enc.context, enc.mask

    def score_locals(self, img_locals: torch.Tensor, img_mask: torch.Tensor, txt_locals: torch.Tensor,
                     txt_mask: torch.Tensor, device: torch.device | str | None = None,
                     normalized: bool = False) -> torch.Tensor:
        """SCAN t2i scores ``[N, M]`` of ``img_locals [N, R, d]`` x ``txt_locals [M, L, d]`` with this model's
        lambdas and pooling; batched and chunked, blocks moved to ``device`` (default: the locals' device).
        ``normalized``: the locals are already unit vectors (a cached gallery): skip that pass."""
        from selfalign.crossattn.scan import scan_t2i_scores

        cfg = self.model_cfg
        return scan_t2i_scores(img_locals, img_mask, txt_locals, txt_mask, cfg.scan_lambda_softmax,
                               cfg.scan_pooling, cfg.scan_lambda_lse, device=device, normalized=normalized)

    def similarity(self, image: Encoded, text: Encoded,
                   gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Scores ``[B_img, B_txt]`` of every image with every caption: the embeddings' dot product, or SCAN.

        ``gather`` (e.g. an all-gather over data-parallel ranks, rows concatenated) is applied to whatever the
        scorer needs, so the scores span the global batch; by default the batch is this process's own.
        """
        gather = gather or (lambda x: x)
        if self.model_cfg.similarity == "dot":
            return gather(image.embedding.float()) @ gather(text.embedding.float()).T
        img_locals, img_mask = _gather_locals(*self.scoring_locals(image), gather)
        txt_locals, txt_mask = _gather_locals(*self.scoring_locals(text), gather)
        return self.score_locals(img_locals, img_mask, txt_locals, txt_mask)

    @property
    def embedding_dim(self) -> int:
        d = self.model_cfg.embed_dim
        return 3 * d if self.align is not None and self.align_cfg.cra else d

    @property
    def embedding_parts(self) -> tuple[int, ...]:
        """The embedding's independently normalised parts (one here; an ensemble has one per member)."""
        return (self.embedding_dim,)


def _gather_locals(locals_: torch.Tensor, mask: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather ``locals_ [B, L, d]`` and ``mask [B, L]`` row-wise. Ranks may trim captions to different L, so each
    first pads to the widest L of the global batch (learnt by gathering every row's width)."""
    width = int(gather(torch.full((locals_.shape[0],), locals_.shape[1], device=locals_.device)).max())
    if width > locals_.shape[1]:
        locals_ = torch.nn.functional.pad(locals_, (0, 0, 0, width - locals_.shape[1]))
        mask = torch.nn.functional.pad(mask, (0, width - mask.shape[1]))
    return gather(locals_.float()), gather(mask.to(torch.uint8)).bool()
