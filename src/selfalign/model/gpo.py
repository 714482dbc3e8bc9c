"""Pooling of a variable-length set of local features into one vector.

GPO (VSE∞'s Generalized Pooling Operator) learns, from the number of valid features alone, a weight for each
rank after a per-dimension descending sort; mean pooling is the simple alternative.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def positional_encoding(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """Sinusoidal encoding ``[length, dim]``."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [B, L, D]`` over valid positions of ``mask [B, L]`` -> ``[B, D]``."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class GPO(nn.Module):
    """Generalized Pooling Operator: ``features [B, L, D]``, ``mask [B, L]`` -> ``[B, D]``.

    The weights depend on the valid count alone, so without gradients (evaluation, a query) each count's weights are
    computed once, in one table, and kept until the parameters change: a one-caption query then skips GPO's GRU,
    about half of the recurrent steps a BiGRU text encoder spends on it.
    """

    def __init__(self, pe_dim: int = 32, hidden: int = 32, temperature: float = 0.1):
        super().__init__()
        self.pe_dim = pe_dim
        self.temperature = temperature
        self.gru = nn.GRU(pe_dim, hidden, batch_first=True, bidirectional=True)
        self.score = nn.Linear(hidden, 1, bias=False)
        # (parameter versions, table): row n - 1 of the table holds the weights of n valid features.
        self._table: tuple[tuple, torch.Tensor] = ((), torch.zeros(0, 0))

    def _weights_of(self, lengths: torch.Tensor, length: int) -> torch.Tensor:
        """Pooling weights ``[B, length]`` for each sorted rank, from GPO's GRU; zero beyond each valid count."""
        batch = lengths.shape[0]
        mask = torch.arange(length, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
        pe = positional_encoding(length, self.pe_dim, lengths.device).to(self.score.weight.dtype)
        pe = pe.unsqueeze(0).expand(batch, -1, -1)  # in the parameters' dtype, so a cast module runs too
        packed = pack_padded_sequence(pe, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=length)
        half = out.shape[-1] // 2
        out = (out[..., :half] + out[..., half:]) / 2
        scores = self.score(out).squeeze(-1).masked_fill(~mask, float("-inf"))
        return torch.softmax(scores / self.temperature, dim=1)

    def weights(self, lengths: torch.Tensor, length: int) -> torch.Tensor:
        """Pooling weights ``[B, length]`` for each sorted rank, given valid counts ``lengths [B]``; zero beyond."""
        lengths = lengths.clamp(min=1)
        if torch.is_grad_enabled():
            return self._weights_of(lengths, length)
        # Any in-place change of a parameter (an optimiser step, load_state_dict) bumps its version; moving or
        # casting the module replaces the tensors, and _apply clears the table.
        # The pair is one attribute, read and replaced whole, so concurrent queries (a server) at worst recompute it.
        key, (table_key, table) = tuple(p._version for p in self.parameters()), self._table
        longest = int(lengths.max())
        if key != table_key or table.shape[0] < longest:
            counts = torch.arange(1, max(longest, table.shape[0]) + 1, device=lengths.device)
            table = self._weights_of(counts, int(counts[-1]))
            self._table = (key, table)
        rows = table.index_select(0, lengths - 1)
        if rows.shape[1] >= length:
            return rows[:, :length]
        return torch.nn.functional.pad(rows, (0, length - rows.shape[1]))

    def _apply(self, fn, recurse=True):
        self._table = ((), torch.zeros(0, 0))
        return super()._apply(fn, recurse)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Sorting puts padding last (filled with -inf), so rank k of every row is its k-th largest valid value;
        # valid positions need not be a prefix (dropped regions), but after the sort they are.
        lengths = mask.sum(1)
        filled = features.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        ranked = filled.sort(dim=1, descending=True).values
        weights = self.weights(lengths, mask.shape[1])
        ranked = ranked.masked_fill(weights.unsqueeze(-1) == 0, 0.0)
        return (ranked * weights.unsqueeze(-1).to(ranked.dtype)).sum(1)


class MeanPool(nn.Module):
    """Masked mean: ``features [B, L, D]``, ``mask [B, L]`` -> ``[B, D]``."""

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(features, mask)


def make_pooling(kind: str) -> nn.Module:
    return GPO() if kind == "gpo" else MeanPool()
