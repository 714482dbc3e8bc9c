"""The dual encoder: independent image and text encoders, optionally trained with SelfAlign.

Images and captions are embedded separately; one dot product of the embeddings scores a pair, so a gallery is
embedded once and searched with an index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selfalign.config import AlignConfig, ModelConfig
from selfalign.data.text import TokenBatch, Vocabulary
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
    """Dual encoder with ``encode_image`` / ``encode_text``; ``align`` is the SelfAlign module or None."""

    def __init__(self, model_cfg: ModelConfig, align_cfg: AlignConfig, vocab: Vocabulary | None,
                 init_pretrained: bool = True):
        super().__init__()
        self.model_cfg = model_cfg
        self.align_cfg = align_cfg
        d = model_cfg.embed_dim
        self.image_encoder = ImageEncoder(model_cfg.image_dim, d, model_cfg.image_context_layers,
                                          model_cfg.image_context_heads, model_cfg.dropout, model_cfg.pooling)
        if model_cfg.text_encoder == "minilm":
            self.text_encoder: nn.Module = MiniLMTextEncoder(d, model_cfg.max_words, model_cfg.pooling)
        else:
            assert vocab is not None, "the BiGRU text encoder needs a vocabulary"
            self.text_encoder = GRUTextEncoder(vocab, d, model_cfg.word_dim, model_cfg.gru_layers, model_cfg.max_words,
                                               model_cfg.pooling, model_cfg.glove, model_cfg.dropout,
                                               load_vectors=init_pretrained)
        self.align = None
        if align_cfg.lca or align_cfg.cra:
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
        """``regions [B, R, D_in]``, ``mask [B, R]`` -> Encoded with ``embedding [B, E]``."""
        base, free, context = self.image_encoder(regions, mask)
        if self.align is not None and self.align_cfg.cra:
            heads = self.align.image_context(context, mask)
            return Encoded(self.align.embed_image(base, heads), base, free, context, mask, heads)
        return Encoded(base, base, free, context, mask)

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

    @property
    def embedding_dim(self) -> int:
        d = self.model_cfg.embed_dim
        return 3 * d if self.align is not None and self.align_cfg.cra else d
