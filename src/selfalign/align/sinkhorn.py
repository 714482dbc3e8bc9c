"""Sinkhorn-Knopp equipartitioned soft assignments (the SwAV recipe used by LCA).

Given scores ``Z [N, K]`` of N samples against K prototypes, the SwAV procedure starts from
``P = exp(Z / eps)`` normalised to total mass 1 and alternates, ``iterations`` times,

1. per-prototype normalisation: every column of ``P`` is scaled to sum to ``1 / K``;
2. per-sample normalisation: every row of ``P`` is scaled to sum to ``1 / N``;

and returns ``N * P``: each row sums to 1 (exactly, it is the last step) and each prototype receives
about ``N / K`` of the mass (exactly after the first step of an iteration; approximately at the end).

Both steps only rescale rows or columns, so ``P = diag(v) E diag(u)`` with ``E = exp(Z / eps - max)``
throughout: the loop updates the vectors ``u [K]`` and ``v [N]`` (two matrix-vector products per
iteration) instead of rewriting the whole matrix, and the initial "total mass 1" constant is absorbed by
the first per-prototype step. This is the same arithmetic as SwAV: in float32 while the exponents span at
most ``_FLOAT32_SPAN`` (unit-norm features with eps = 0.05 span at most 40), in float64 up to ``_MAX_SPAN``,
so that nothing underflows or overflows; wider spans (scores far larger than eps) switch to the same iteration
in the log domain, slower but immune to underflow. Everything runs under ``no_grad`` with autocast off.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["sinkhorn"]

# exp(-span), the scalings u, v (at most about e^span * N) and their products stay inside float32's normal
# range (e^-87 .. e^88) up to _FLOAT32_SPAN and inside float64's (e^-708 .. e^709) up to _MAX_SPAN.
_FLOAT32_SPAN = 60.0
_MAX_SPAN = 300.0


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp, enabled: bool) -> torch.Tensor:
    if enabled:
        dist.all_reduce(x, op=op)
    return x


def _scaling(log_e: torch.Tensor, iterations: int, n_total: torch.Tensor, use_dist: bool) -> torch.Tensor:
    """Vector form on ``E = exp(log_e)`` (entries in (e^-span, 1]); float64, consumes ``log_e``."""
    k = log_e.shape[1]
    e = log_e.exp_()  # in place: these [N, K] passes dominate the cost
    v = e.new_ones(e.shape[0])
    for _ in range(iterations):
        u = 1.0 / (k * _all_reduce(e.t() @ v, dist.ReduceOp.SUM, use_dist))
        v = 1.0 / (n_total * (e @ u))
    return e.mul_((n_total * v).unsqueeze(1)).mul_(u.unsqueeze(0))


def _log_domain(log_e: torch.Tensor, iterations: int, n_total: torch.Tensor, use_dist: bool) -> torch.Tensor:
    """The same iteration on log P; each cross-rank logsumexp shares the global column max as its shift."""
    log_k, log_n = math.log(log_e.shape[1]), torch.log(n_total)
    log_p = log_e
    for _ in range(iterations):
        if log_p.shape[0] > 0:
            shift = log_p.amax(dim=0)
        else:
            shift = log_p.new_full((log_p.shape[1],), -math.inf)
        shift = _all_reduce(shift, dist.ReduceOp.MAX, use_dist)
        mass = _all_reduce(torch.exp(log_p - shift).sum(dim=0), dist.ReduceOp.SUM, use_dist)
        log_p = log_p - (torch.log(mass) + shift) - log_k
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True) - log_n
    return torch.exp(log_p + log_n)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3, distributed: bool = False) -> torch.Tensor:
    """Equipartitioned soft codes of ``scores [N, K]`` -> ``Q [N, K]`` float32 (rows sum to 1, columns ~ N/K).

    Only valid samples may be passed (padding must be removed by the caller). With ``distributed=True`` and
    an initialised process group of more than one rank, the global max, the prototype sums and N are
    all-reduced, so each rank gets its own rows of what single-process Sinkhorn gives on the concatenated rows.
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn: scores must be [N, K], got shape {tuple(scores.shape)}")
    if iterations < 1:
        raise ValueError(f"sinkhorn: iterations must be >= 1, got {iterations}")
    if epsilon <= 0:
        raise ValueError(f"sinkhorn: epsilon must be > 0, got {epsilon}")
    use_dist = distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    with torch.autocast(device_type=scores.device.type, enabled=False):
        z = scores.detach().float()
        n_local, k = z.shape
        if n_local == 0 and not use_dist:
            return z.new_zeros((0, k))
        # [max, -min] in one reduction: every rank must take the same branch below.
        if n_local > 0:
            extremes = torch.stack([z.max(), -z.min()]).double()
        else:
            extremes = z.new_full((2,), -math.inf, dtype=torch.float64)
        extremes = _all_reduce(extremes, dist.ReduceOp.MAX, use_dist)
        n_total = _all_reduce(extremes.new_tensor(float(n_local)), dist.ReduceOp.SUM, use_dist)
        span = float(extremes[0] + extremes[1]) / epsilon
        dtype = torch.float32 if span <= _FLOAT32_SPAN else torch.float64
        # sub() makes a new tensor (the caller's scores stay untouched); the rest works in place on it
        log_e = z.to(dtype).sub(extremes[0].to(dtype)).div_(epsilon)  # <= 0, max exactly 0
        if span <= _MAX_SPAN:
            q = _scaling(log_e, iterations, n_total.to(log_e.dtype), use_dist)
        else:
            q = _log_domain(log_e, iterations, n_total, use_dist)
        return q.float()
