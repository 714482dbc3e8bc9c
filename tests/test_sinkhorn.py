"""Sinkhorn-Knopp: constraints, agreement with a naive SwAV-style loop, stability, distributed equivalence."""

from __future__ import annotations

import importlib
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selfalign.align.sinkhorn import sinkhorn


def naive_sinkhorn(scores: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """SwAV's procedure written out with loops, float64, exp domain: returns [N, K]."""
    q = np.exp(scores.astype(np.float64) / eps).T  # [K, N]
    k, n = q.shape
    q /= q.sum()
    for _ in range(iters):
        for row in range(k):  # each prototype gets mass 1/K
            q[row] /= q[row].sum() * k
        for col in range(n):  # each sample gets mass 1/N
            q[:, col] /= q[:, col].sum() * n
    return (q * n).T


@pytest.mark.parametrize("iters", [1, 2, 3])
def test_matches_naive_loop(iters: int) -> None:
    gen = torch.Generator().manual_seed(iters)
    scores = torch.rand(40, 12, generator=gen) * 2 - 1
    got = sinkhorn(scores, epsilon=0.05, iterations=iters)
    want = naive_sinkhorn(scores.numpy(), 0.05, iters)
    assert got.dtype == torch.float32 and got.shape == (40, 12)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("span", [40.0, 59.0])
@pytest.mark.parametrize("path", ["float32", "float64"])
def test_float32_and_float64_paths_match_naive_loop(span: float, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # LCA's real shape and range: unit-norm features against 1,024 prototypes, eps 0.05 (span <= 40), and close to
    # the widest span the float32 path takes
    mod = importlib.import_module("selfalign.align.sinkhorn")
    if path == "float64":
        monkeypatch.setattr(mod, "_FLOAT32_SPAN", -1.0)
    scores = torch.rand(300, 1024, generator=torch.Generator().manual_seed(11)) * 2 - 1
    scores = scores * (span * 0.05 / float(scores.max() - scores.min()))
    got = mod.sinkhorn(scores, epsilon=0.05, iterations=3)
    want = naive_sinkhorn(scores.numpy(), 0.05, 3)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=1e-7)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(300), rtol=0, atol=1e-5)


@pytest.mark.parametrize("iters", [1, 3])
def test_log_domain_path_matches_naive_loop(iters: int, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = importlib.import_module("selfalign.align.sinkhorn")  # the package re-exports the function by that name

    monkeypatch.setattr(mod, "_MAX_SPAN", -1.0)  # force the path used for very wide score spans
    scores = torch.rand(40, 12, generator=torch.Generator().manual_seed(7)) * 2 - 1
    got = mod.sinkhorn(scores, epsilon=0.05, iterations=iters)
    np.testing.assert_allclose(got.numpy(), naive_sinkhorn(scores.numpy(), 0.05, iters), rtol=1e-4, atol=1e-6)


def test_rows_sum_to_one_and_nonnegative() -> None:
    scores = torch.randn(100, 16)
    q = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert bool((q >= 0).all())
    torch.testing.assert_close(q.sum(dim=1), torch.ones(100), rtol=0, atol=1e-5)


def test_columns_equipartition_after_enough_iterations() -> None:
    n, k = 120, 8
    scores = torch.randn(n, k) * 0.3
    q = sinkhorn(scores, epsilon=0.1, iterations=200)
    torch.testing.assert_close(q.sum(dim=0), torch.full((k,), n / k), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(n), rtol=0, atol=1e-5)


def test_equipartition_spreads_a_dominant_prototype() -> None:
    # Every sample prefers prototype 0, yet the codes must share the mass among all prototypes.
    scores = torch.zeros(64, 4)
    scores[:, 0] = 0.5
    scores += torch.randn(64, 4) * 0.01
    q = sinkhorn(scores, epsilon=0.05, iterations=50)
    torch.testing.assert_close(q.sum(dim=0), torch.full((4,), 16.0), rtol=1e-3, atol=1e-3)


def test_extreme_scores_stay_finite() -> None:
    # In the float32 exp form, rows far below the global max underflow to all-zero and give NaN; not here.
    scores = torch.randn(50, 10) * 50
    q = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert bool(torch.isfinite(q).all())
    torch.testing.assert_close(q.sum(dim=1), torch.ones(50), rtol=0, atol=1e-5)


def test_no_grad_float32_under_autocast_and_input_untouched() -> None:
    scores = torch.randn(30, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = sinkhorn(scores.to(torch.bfloat16), 0.05, 3)
    assert q.dtype == torch.float32 and not q.requires_grad
    ref = sinkhorn(scores.detach().to(torch.bfloat16).float(), 0.05, 3)
    torch.testing.assert_close(q, ref)


def test_empty_input_and_bad_arguments() -> None:
    assert sinkhorn(torch.zeros(0, 5), 0.05, 3).shape == (0, 5)
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn(torch.zeros(3, 5), 0.05, 0)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(torch.zeros(3, 5), 0.0, 3)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        sinkhorn(torch.zeros(3), 0.05, 3)


def test_distributed_flag_without_process_group_is_single_process() -> None:
    scores = torch.randn(20, 5)
    torch.testing.assert_close(sinkhorn(scores, 0.05, 3, distributed=True), sinkhorn(scores, 0.05, 3))


def _dist_worker(rank: int, world: int, init_file: str, scores: torch.Tensor, splits: list[int], out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        start = sum(splits[:rank])
        for scale in (1.0, 50.0):  # the vector path and the wide-span log-domain path
            q = sinkhorn(scale * scores[start : start + splits[rank]], 0.05, 3, distributed=True)
            torch.save(q, os.path.join(out_dir, f"q{rank}_{scale}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_equals_single_process_on_concatenated_rows() -> None:
    torch.manual_seed(0)
    scores = torch.randn(23, 7)
    splits = [9, 14]  # unequal shards
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_dist_worker, args=(2, init_file, scores, splits, tmp), nprocs=2, join=True)
        for scale in (1.0, 50.0):
            got = torch.cat([torch.load(os.path.join(tmp, f"q{r}_{scale}.pt")) for r in range(2)])
            torch.testing.assert_close(got, sinkhorn(scale * scores, 0.05, 3), rtol=1e-5, atol=1e-6)
