"""Tests for selfalign.evaluate.metrics against an independent brute-force oracle and hand-built cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from selfalign.errors import InputError
from selfalign.evaluate.metrics import (
    METRIC_KEYS,
    evaluate_sims_file,
    fold5_metrics,
    format_table,
    i2t_ranks,
    protocol_metrics,
    retrieval_metrics,
    t2i_ranks,
)


# ---------------------------------------------------------------- oracle: per-query stable argsort loops
def oracle_ranks(sims: np.ndarray, cpi: int = 5) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(sims, dtype=np.float64)
    n, m = s.shape
    i2t = np.zeros(n, dtype=np.int64)
    for i in range(n):
        order = list(np.argsort(-s[i], kind="stable"))
        i2t[i] = min(order.index(j) for j in range(cpi * i, cpi * i + cpi))
    t2i = np.zeros(m, dtype=np.int64)
    for j in range(m):
        order = list(np.argsort(-s[:, j], kind="stable"))
        t2i[j] = order.index(j // cpi)
    return i2t, t2i


def oracle_metrics(sims: np.ndarray, cpi: int = 5) -> dict:
    i2t, t2i = oracle_ranks(sims, cpi)
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        r = sorted(int(x) for x in ranks)
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(1 for x in r if x < k) / len(r)
        mid = len(r) // 2
        median = r[mid] if len(r) % 2 else (r[mid - 1] + r[mid]) / 2
        out[f"{name}_medr"] = math.floor(median) + 1
        out[f"{name}_meanr"] = sum(r) / len(r) + 1
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    out["n_images"], out["n_captions"] = sims.shape
    return out


def assert_metrics_equal(got: dict, want: dict) -> None:
    assert set(got) >= set(METRIC_KEYS)
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


def random_sims(rng: np.random.Generator, n: int, kind: str, cpi: int = 5) -> np.ndarray:
    shape = (n, cpi * n)
    if kind == "float":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "rounded":  # many ties
        return np.round(rng.uniform(-1, 1, shape), 1).astype(np.float32)
    if kind == "int":  # integer-valued: heavy ties
        return rng.integers(0, 3, shape).astype(np.float64)
    if kind == "informative":  # own pairs score higher on average, so ranks are small and R@K non-trivial
        s = rng.standard_normal(shape)
        s[np.arange(cpi * n) // cpi, np.arange(cpi * n)] += 2.0
        return np.round(s, 1)
    raise ValueError(kind)


# ---------------------------------------------------------------- agreement with the oracle
@pytest.mark.parametrize("kind", ["float", "rounded", "int", "informative"])
@pytest.mark.parametrize("n", [1, 2, 7, 23])
def test_ranks_match_oracle(kind: str, n: int) -> None:
    rng = np.random.default_rng(1000 * n + len(kind))
    sims = random_sims(rng, n, kind)
    want_i2t, want_t2i = oracle_ranks(sims)
    for chunk in (1, 2, 3, 5, 256):  # chunks smaller than, not dividing, and larger than N
        np.testing.assert_array_equal(i2t_ranks(sims, chunk_size=chunk), want_i2t)
        np.testing.assert_array_equal(t2i_ranks(sims, chunk_size=chunk), want_t2i)
        assert_metrics_equal(retrieval_metrics(sims, chunk_size=chunk), oracle_metrics(sims))


@pytest.mark.parametrize("cpi", [1, 3])
def test_other_captions_per_image(cpi: int) -> None:
    sims = random_sims(np.random.default_rng(cpi), 9, "int", cpi=cpi)
    want_i2t, want_t2i = oracle_ranks(sims, cpi)
    np.testing.assert_array_equal(i2t_ranks(sims, captions_per_image=cpi, chunk_size=4), want_i2t)
    np.testing.assert_array_equal(t2i_ranks(sims, captions_per_image=cpi, chunk_size=4), want_t2i)
    assert_metrics_equal(retrieval_metrics(sims, captions_per_image=cpi), oracle_metrics(sims, cpi))


def test_torch_and_other_dtypes_match_numpy() -> None:
    sims = random_sims(np.random.default_rng(3), 11, "rounded")
    want = retrieval_metrics(sims)
    assert_metrics_equal(retrieval_metrics(torch.from_numpy(sims)), want)
    assert_metrics_equal(retrieval_metrics(torch.from_numpy(sims).to(torch.bfloat16)),
                         oracle_metrics(torch.from_numpy(sims).to(torch.bfloat16).float().numpy()))
    assert_metrics_equal(retrieval_metrics(torch.from_numpy(sims).requires_grad_()), want)
    assert_metrics_equal(retrieval_metrics(sims.astype(np.float16)), oracle_metrics(sims.astype(np.float16)))
    ints = random_sims(np.random.default_rng(4), 6, "int").astype(np.uint8)  # -x would wrap: comparisons must not
    assert_metrics_equal(retrieval_metrics(ints), oracle_metrics(ints))
    fortran = np.asfortranarray(sims)
    assert_metrics_equal(retrieval_metrics(fortran, chunk_size=4), want)


# ---------------------------------------------------------------- hand-built 2 images / 10 captions
OWN = np.arange(10) // 5 == np.arange(2)[:, None]  # [2, 10] True where caption belongs to image


def test_perfect_ranking() -> None:
    m = retrieval_metrics(OWN.astype(np.float32))
    assert m["rsum"] == 600.0
    assert m["i2t_medr"] == m["t2i_medr"] == 1.0
    assert m["i2t_meanr"] == m["t2i_meanr"] == 1.0
    assert (m["n_images"], m["n_captions"]) == (2, 10)


def test_reversed_ranking() -> None:
    sims = (~OWN).astype(np.float32)  # every foreign pair beats every own pair
    np.testing.assert_array_equal(i2t_ranks(sims), [5, 5])  # 5 foreign captions ahead
    np.testing.assert_array_equal(t2i_ranks(sims), [1] * 10)  # the other image ahead
    m = retrieval_metrics(sims)
    assert (m["i2t_r1"], m["i2t_r5"], m["i2t_r10"]) == (0.0, 0.0, 100.0)
    assert (m["t2i_r1"], m["t2i_r5"], m["t2i_r10"]) == (0.0, 100.0, 100.0)
    assert m["rsum"] == 300.0
    assert (m["i2t_medr"], m["i2t_meanr"], m["t2i_medr"], m["t2i_meanr"]) == (6.0, 6.0, 2.0, 2.0)


def test_ties_go_to_the_lower_index() -> None:
    sims = np.zeros((2, 10), dtype=np.float32)  # everything tied
    # image 0's caption 0 is first; image 1's best own caption (5) has captions 0..4 ahead of it
    np.testing.assert_array_equal(i2t_ranks(sims), [0, 5])
    # captions of image 0 find row 0 first; captions of image 1 have row 0 ahead of row 1
    np.testing.assert_array_equal(t2i_ranks(sims), [0] * 5 + [1] * 5)
    m = retrieval_metrics(sims)
    assert (m["i2t_r1"], m["i2t_r5"], m["i2t_r10"]) == (50.0, 50.0, 100.0)
    assert (m["t2i_r1"], m["t2i_r5"], m["t2i_r10"]) == (50.0, 100.0, 100.0)
    assert m["rsum"] == 450.0
    assert m["i2t_medr"] == 3.0  # floor(median([0, 5]) = 2.5) + 1
    assert m["i2t_meanr"] == 3.5
    assert (m["t2i_medr"], m["t2i_meanr"]) == (1.0, 1.5)


def test_partial_tie_counts_only_earlier_equal_scores() -> None:
    sims = np.zeros((2, 10), dtype=np.float32)
    sims[1] = [0.1, 0.9, 0.5, 0.5, 0.0, 0.5, 0.2, 0.2, 0.5, 0.1]  # best own caption: 5 (0.5, ties 2, 3, 8)
    # ahead of caption 5: caption 1 (greater), captions 2 and 3 (equal, lower index); caption 8 (equal) is behind
    assert i2t_ranks(sims)[1] == 3


# ---------------------------------------------------------------- COCO 1K (5 folds)
def test_fold5_is_mean_of_separate_folds() -> None:
    sims = random_sims(np.random.default_rng(7), 20, "informative")
    out = fold5_metrics(sims, chunk_size=3)
    assert out["n_folds"] == 5 and len(out["folds"]) == 5
    assert (out["n_images"], out["n_captions"]) == (4, 20)
    separate = [retrieval_metrics(sims[4 * f:4 * f + 4, 20 * f:20 * f + 20]) for f in range(5)]
    for f in range(5):
        assert_metrics_equal(out["folds"][f], separate[f])
    for k in METRIC_KEYS:
        if k not in ("n_images", "n_captions"):
            assert out[k] == pytest.approx(np.mean([d[k] for d in separate])), k


def test_protocol_metrics_dispatches_on_fold5() -> None:
    sims = random_sims(np.random.default_rng(11), 10, "informative")
    whole, folds = protocol_metrics(sims), protocol_metrics(sims, fold5=True)
    assert_metrics_equal(whole, retrieval_metrics(sims))
    assert "n_folds" not in whole and folds["n_folds"] == 5
    assert folds["rsum"] == pytest.approx(fold5_metrics(sims)["rsum"])


def test_fold5_rsum_is_not_the_scan_bug() -> None:
    # 5 folds of the reversed 2-image case: i2t recalls sum to 100, t2i recalls to 200 in every fold
    out = fold5_metrics(np.kron(np.eye(5, dtype=np.float32), (~OWN).astype(np.float32)))
    fold_rsums = [d["rsum"] for d in out["folds"]]
    assert out["rsum"] == pytest.approx(np.mean(fold_rsums))
    scan_bug = 6 * np.mean([(d["i2t_r1"] + d["i2t_r5"] + d["i2t_r10"]) / 3 for d in out["folds"]])
    assert scan_bug != pytest.approx(out["rsum"])  # the case discriminates
    assert out["rsum"] == 300.0 and scan_bug == 200.0
    assert out["rsum"] <= 600.0  # not the VSE++ 6 x rsum printout either


def test_fold5_needs_divisible_rows() -> None:
    with pytest.raises(InputError, match=r"\(7, 35\)"):
        fold5_metrics(np.zeros((7, 35)))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "shape", [(10,), (2, 10, 1), (2, 9), (2, 2), (0, 0)],
)
def test_bad_shapes_name_the_shape(shape: tuple) -> None:
    with pytest.raises(InputError, match=str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")):
        retrieval_metrics(np.zeros(shape))


def test_transposed_matrix_gets_a_hint() -> None:
    with pytest.raises(InputError, match=r"\(10, 2\).*transposed"):
        i2t_ranks(np.zeros((10, 2)))


def test_nan_and_bad_dtypes_and_params() -> None:
    sims = np.zeros((4, 20))
    sims[2, 17] = np.nan
    with pytest.raises(InputError, match=r"NaN.*row 2"):
        retrieval_metrics(sims, chunk_size=1)
    with pytest.raises(InputError, match="NaN"):
        t2i_ranks(torch.from_numpy(sims))
    with pytest.raises(InputError, match="NaN"):
        fold5_metrics(np.pad(sims, ((0, 1), (0, 5))))  # NaN outside the folds' blocks still fails
    with pytest.raises(InputError, match="dtype"):
        retrieval_metrics(np.full((1, 5), "a"))
    with pytest.raises(InputError, match="dtype"):
        retrieval_metrics(np.zeros((1, 5), dtype=complex))
    with pytest.raises(InputError, match="chunk_size"):
        retrieval_metrics(np.zeros((1, 5)), chunk_size=0)
    with pytest.raises(InputError, match="captions_per_image"):
        retrieval_metrics(np.zeros((1, 5)), captions_per_image=0)


# ---------------------------------------------------------------- files and table
def test_evaluate_sims_file(tmp_path) -> None:
    sims = random_sims(np.random.default_rng(9), 10, "informative")
    np.save(tmp_path / "sims.npy", sims)
    assert_metrics_equal(evaluate_sims_file(tmp_path / "sims.npy", fold5=False), oracle_metrics(sims))
    assert evaluate_sims_file(tmp_path / "sims.npy", fold5=True)["rsum"] == fold5_metrics(sims)["rsum"]

    with pytest.raises(InputError, match="missing.npy.*not found"):
        evaluate_sims_file(tmp_path / "missing.npy", fold5=False)
    (tmp_path / "text.npy").write_text("not an array\n")
    with pytest.raises(InputError, match="text.npy"):
        evaluate_sims_file(tmp_path / "text.npy", fold5=False)
    np.savez(tmp_path / "arch.npz", sims=sims)
    with pytest.raises(InputError, match="npz"):
        evaluate_sims_file(tmp_path / "arch.npz", fold5=False)
    np.save(tmp_path / "wrong.npy", sims.T)
    with pytest.raises(InputError, match=r"wrong.npy.*\(50, 10\)"):
        evaluate_sims_file(tmp_path / "wrong.npy", fold5=False)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="obj.npy"):
        evaluate_sims_file(tmp_path / "obj.npy", fold5=False)


def test_format_table() -> None:
    table = format_table(retrieval_metrics((~OWN).astype(np.float32)))
    lines = table.splitlines()
    assert lines[0].split() == ["R@1", "R@5", "R@10", "medr", "meanr"]
    assert lines[1].split() == ["i2t", "0.0", "0.0", "100.0", "6.0", "6.0"]
    assert lines[2].split() == ["t2i", "0.0", "100.0", "100.0", "2.0", "2.0"]
    assert "rsum 300.0" in table and "2 images / 10 captions" in table
    assert "mean of 5 folds" in format_table(fold5_metrics(np.zeros((5, 25))))


# ---------------------------------------------------------------- property test
@st.composite
def small_sims(draw):
    n = draw(st.integers(1, 6))
    cpi = draw(st.sampled_from([1, 2, 5]))
    elems = st.one_of(
        st.integers(-2, 2).map(float),  # heavy ties
        st.floats(-1e3, 1e3, allow_nan=False, width=32),
        st.sampled_from([np.inf, -np.inf, 0.0, -0.0]),
    )
    sims = draw(arrays(np.float32, (n, cpi * n), elements=elems))
    return sims, cpi, draw(st.integers(1, 4))


@settings(max_examples=150, deadline=None)
@given(small_sims())
def test_property_ranks_and_metrics_consistent(case) -> None:
    sims, cpi, chunk = case
    n = sims.shape[0]
    i2t = i2t_ranks(sims, captions_per_image=cpi, chunk_size=chunk)
    t2i = t2i_ranks(sims, captions_per_image=cpi, chunk_size=chunk)
    assert i2t.shape == (n,) and t2i.shape == (cpi * n,)
    assert ((0 <= i2t) & (i2t <= cpi * n - cpi)).all()  # at least its other cpi-1 captions come after the best
    assert ((0 <= t2i) & (t2i < n)).all()
    want_i2t, want_t2i = oracle_ranks(sims, cpi)
    np.testing.assert_array_equal(i2t, want_i2t)
    np.testing.assert_array_equal(t2i, want_t2i)
    m = retrieval_metrics(sims, captions_per_image=cpi, chunk_size=chunk)
    assert tuple(m) == METRIC_KEYS
    for d in ("i2t", "t2i"):
        assert 0 <= m[f"{d}_r1"] <= m[f"{d}_r5"] <= m[f"{d}_r10"] <= 100
        assert m[f"{d}_medr"] >= 1 and m[f"{d}_meanr"] >= 1
    assert m["rsum"] == pytest.approx(sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
    assert (m["n_images"], m["n_captions"]) == (n, cpi * n)
