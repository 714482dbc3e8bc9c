"""CRA: context-level alignment (method.md §1.4): per-modality context heads and the multi-positive NCE.

Each modality owns a ``ContextHead`` (nothing is shared across modalities). From contextual locals
``h_1..h_n`` it builds the masked mean ``h_bar``, the enhanced global ``e = ReLU(BN1(W_c h_bar + b_c))``,
the CRA locals ``l_i = norm(ReLU(BN2(h_i)))`` and the gated fusion ``c = norm(lam h_bar + (1 - lam) e)``.
``cra_loss`` contrasts one modality's ``norm(e)`` against the other modality's locals.

Documented deviations from the official code (which pads text to a fixed length and lets the padding in):
padded positions are excluded from the means, from BN2's batch statistics, from the positives and from the
negatives, and padded CRA locals are exactly zero.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from selfalign.align._checks import check_locals, check_same_batch, valid_locals
from selfalign.errors import InputError

__all__ = ["ContextHead", "ContextOutput", "cra_loss"]


class ContextOutput(NamedTuple):
    """What a ContextHead computes for one modality (B = batch, L = positions, d = width)."""

    global_mean: torch.Tensor  # h_bar [B, d]: masked mean of the contextual locals
    enhanced: torch.Tensor  # e [B, d] = ReLU(BN1(FC(h_bar)))  (not normalised; the CRA query is norm(e))
    locals: torch.Tensor  # l [B, L, d] = norm(ReLU(BN2(h))), zeros at padding (CRA keys)
    fused: torch.Tensor  # c [B, d] = norm(lam h_bar + (1 - lam) e)  (goes into the retrieval embedding)
    local_mean: torch.Tensor  # m [B, d]: masked mean of l, not re-normalised
    mask: torch.Tensor  # [B, L] bool, True = valid


class ContextHead(nn.Module):
    """Context enhancement + CRA locals + gated fusion for one modality (about 3 d^2 parameters)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.ctx_fc = nn.Linear(dim, dim)
        self.bn1 = nn.BatchNorm1d(dim)
        self.bn2 = nn.BatchNorm1d(dim)
        self.fusion_hidden = nn.Linear(2 * dim, dim)  # W1 [d, 2d]
        self.fusion_out = nn.Linear(dim, 1)  # w2 [1, d]

    def forward(self, context: torch.Tensor, mask: torch.Tensor) -> ContextOutput:
        """``context [B, L, d]`` (un-normalised contextual locals), ``mask [B, L]`` -> ContextOutput."""
        check_locals("context", context, mask, self.dim)
        mask = mask.bool()
        batch = context.shape[0]
        # Work on the valid positions only (gathered once): padding is never read, so garbage there (even NaN)
        # cannot leak, and BN2's batch statistics (and running stats) ignore it.
        valid, flat, pair_of = valid_locals(context, mask)  # [N_valid, d]
        counts = mask.sum(dim=1, keepdim=True).clamp_min(1).to(valid.dtype)  # [B, 1]
        h_bar = valid.new_zeros(batch, self.dim).index_add(0, pair_of, valid) / counts
        enhanced = F.relu(self.bn1(self.ctx_fc(h_bar)))
        local_valid = F.normalize(F.relu(self.bn2(valid)), dim=-1)
        locals_ = context.new_zeros(batch * context.shape[1], self.dim).index_copy(
            0, flat, local_valid.to(context.dtype)).view(context.shape)
        local_mean = local_valid.new_zeros(batch, self.dim).index_add(0, pair_of, local_valid) / counts
        lam = torch.sigmoid(self.fusion_out(F.relu(self.fusion_hidden(torch.cat([h_bar, enhanced], dim=-1)))))
        fused = F.normalize(lam * h_bar + (1.0 - lam) * enhanced, dim=-1)
        return ContextOutput(h_bar, enhanced, locals_, fused, local_mean, mask)


def cra_loss(
    query: torch.Tensor,
    keys: torch.Tensor,
    keys_mask: torch.Tensor,
    temperature: float = 0.7,
    num_negatives: int = 512,
    positives: str = "each",
) -> torch.Tensor:
    """Multi-positive NCE of globals ``query [B, d]`` against the other modality's locals ``keys [B, L, d]``.

    ``positives="each"`` (the official code), for each pair b and each valid local i of pair b (one positive at a
    time): ``-log( e^{s_bbi} / (e^{s_bbi} + sum_{(c,j) in N(b)} e^{s_bcj}) )`` with ``s = q.k / T``, where ``N(b)``
    are the ``num_negatives`` highest-scoring valid locals of the OTHER pairs (all of them if fewer exist), shared
    by all positives of ``b``; the mean over all valid (b, i). ``positives="pooled"``: one term per pair,
    ``-log( sum_i e^{s_bbi} / (sum_i e^{s_bbi} + sum_{N(b)} e^{s_bcj}) )``, the mean over pairs. Pairs with no valid
    local contribute nothing.
    """
    if query.dim() != 2:
        raise InputError(f"query: expected shape [B, d], got {tuple(query.shape)}")
    check_locals("keys", keys, keys_mask, query.shape[1])
    check_same_batch("query", query, "keys", keys)
    if temperature <= 0:
        raise InputError(f"cra temperature must be > 0, got {temperature}")
    if num_negatives < 0:
        raise InputError(f"cra num_negatives must be >= 0, got {num_negatives}")
    if positives not in ("each", "pooled"):
        raise InputError(f"cra positives must be 'each' or 'pooled', got {positives!r}")
    batch = keys.shape[0]
    keys_mask = keys_mask.bool()
    if not bool(keys_mask.any()):
        return (query.sum() + keys.sum()) * 0.0
    # Only the valid locals enter (text is padded to the longest caption, often twice the mean length):
    # pair_of[n] is the pair that valid local n belongs to.
    valid, _, pair_of = valid_locals(keys, keys_mask)  # [N, d]
    with torch.autocast(device_type=query.device.type, enabled=False):
        valid = valid.float()
        scores = (query.float() / temperature) @ valid.t()  # [B, N]
        own_scores = scores.gather(0, pair_of.unsqueeze(0)).squeeze(0)  # [N]: s[pair, own local]
        k = min(num_negatives, pair_of.numel())
        if k > 0:
            is_negative = pair_of.unsqueeze(0) != torch.arange(batch, device=scores.device).unsqueeze(1)  # [B, N]
            # The choice is not differentiated: select on a detached copy, gather the k scores (unsorted:
            # logsumexp ignores order, and sorting doubles topk's cost). A row with fewer than k negatives
            # also picks some of its own locals; those are masked back to -inf.
            with torch.no_grad():
                pick = scores.masked_fill(~is_negative, float("-inf")).topk(k, dim=1, sorted=False).indices
                real = is_negative.gather(1, pick)  # [B, k]
            neg = scores.gather(1, pick).masked_fill(~real, float("-inf"))
            has_neg = real.any(dim=1)
            # logsumexp of an all -inf row has a NaN gradient: compute it on zeros there, then discard.
            lse = torch.logsumexp(torch.where(has_neg.unsqueeze(1), neg, torch.zeros_like(neg)), dim=1)
            lse = torch.where(has_neg, lse, torch.full_like(lse, float("-inf")))
        else:
            lse = own_scores.new_full((batch,), float("-inf"))
        # -log(e^p / (e^p + e^lse)) = softplus(lse - p); equals 0 when there are no negatives.
        if positives == "each":
            return F.softplus(lse.index_select(0, pair_of) - own_scores).mean()
        own = torch.full_like(scores, float("-inf"))  # [B, N]: each pair's own positives, -inf elsewhere
        own[pair_of, torch.arange(pair_of.numel(), device=scores.device)] = own_scores
        has_local = torch.zeros(batch, dtype=torch.bool, device=scores.device).index_fill_(0, pair_of, True)
        pooled = torch.logsumexp(own[has_local], dim=1)
        return F.softplus(lse[has_local] - pooled).mean()

