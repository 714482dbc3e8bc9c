"""Image encoder over precomputed region features (VSE∞-style FC + residual MLP, plus region self-attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfalign.model.gpo import make_pooling, masked_mean


class ImageEncoder(nn.Module):
    """``regions [B, R, D_in]``, ``mask [B, R]`` -> (pooled ``[B, d]``, free locals ``[B, R, d]``, context ``[B, R, d]``).

    The free locals (after the first FC, L2-normalised) see no other region: LCA aligns them with words.
    The contextual locals pass a residual MLP and self-attention over the image's regions: CRA uses them.
    ``mean_skip`` adds a linear map of the mean input region to the pooled vector before it is normalised.
    """

    def __init__(self, in_dim: int, dim: int, context_layers: int = 1, heads: int = 4, dropout: float = 0.1,
                 pooling: str = "gpo", mean_skip: bool = False):
        super().__init__()
        self.fc = nn.Linear(in_dim, dim)
        self.mean_skip = nn.Linear(in_dim, dim) if mean_skip else None
        self.mlp = nn.Sequential(nn.Linear(dim, dim // 2), nn.BatchNorm1d(dim // 2), nn.ReLU(), nn.Linear(dim // 2, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True,
                                           norm_first=True)
        self.context = nn.ModuleList([layer] + [nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True, norm_first=True)
            for _ in range(context_layers - 1)]) if context_layers > 0 else nn.ModuleList()
        self.pool = make_pooling(pooling)
        nn.init.xavier_uniform_(self.fc.weight)

    def forward(self, regions: torch.Tensor, mask: torch.Tensor):
        x = self.fc(regions.to(self.fc.weight.dtype))
        free = F.normalize(x, dim=-1)
        # BatchNorm statistics over valid regions only: padding must not change any result.
        hidden = torch.zeros_like(x)
        hidden[mask] = self.mlp(x[mask]).to(hidden.dtype)
        h = x + hidden
        for layer in self.context:
            h = layer(h, src_key_padding_mask=~mask)
        h = h.masked_fill(~mask.unsqueeze(-1), 0.0)
        pooled = self.pool(h, mask)
        if self.mean_skip is not None:
            pooled = pooled + self.mean_skip(masked_mean(regions.to(pooled.dtype), mask))
        return F.normalize(pooled, dim=-1), free, h
