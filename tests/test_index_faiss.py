"""FaissIndex: exact and approximate search, save/load round trips, incremental adds, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from selfalign.errors import ConfigError, InputError
from selfalign.index import FaissIndex, choose_kind, open_index, read_manifest
from selfalign.index.faiss_index import choose_refine, default_pq_m

DIM = 32


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """Tiny indexes: one OpenMP thread avoids barrier waits that dominate on a busy 2-core machine."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n: int, seed: int, dim: int = DIM, gap: float = 0.0) -> np.ndarray:
    """Easy data: well-separated clusters in a low-rank subspace; ``gap`` shifts a second 'modality'."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(40, 8))
    basis = np.random.default_rng(98).normal(size=(8, dim))
    z = centers[rng.integers(0, 40, n)] + 0.3 * rng.normal(size=(n, 8))
    x = z @ basis + 0.05 * rng.normal(size=(n, dim))
    if gap:
        x += gap * np.random.default_rng(97).normal(size=dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ x.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), ids[order]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


def test_flat_equals_numpy_and_unnormalised_inner_product(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(300, DIM)) * rng.uniform(0.5, 3, size=(300, 1))).astype(np.float32)  # not unit-norm
    ids = rng.permutation(10_000)[:300].astype(np.int64)
    q = rng.normal(size=(20, DIM)).astype(np.float32)
    index = FaissIndex.build(ids, x, kind="auto")
    assert index.kind == "flat" and len(index) == 300 and index.dim == DIM
    scores, got = index.search(q, 10)
    exp_scores, exp_ids = brute_force(x, ids, q, 10)
    np.testing.assert_array_equal(got, exp_ids)
    np.testing.assert_allclose(scores, exp_scores, rtol=1e-5, atol=1e-5)
    assert scores.dtype == np.float32 and got.dtype == np.int64

    index.save(tmp_path / "idx")
    manifest = read_manifest(tmp_path / "idx")
    assert manifest["backend"] == "faiss" and manifest["kind"] == "flat"
    assert manifest["dim"] == DIM and manifest["count"] == 300
    again = open_index(tmp_path / "idx")
    assert isinstance(again, FaissIndex) and len(again) == 300
    s2, i2 = again.search(q, 10)
    np.testing.assert_array_equal(i2, got)
    np.testing.assert_array_equal(s2, scores)


def test_padding_when_fewer_than_k() -> None:
    x = clustered(3, 1)
    index = FaissIndex(DIM, "flat")
    s, i = index.search(x[:2], 4)  # empty index
    assert (i == -1).all() and np.isneginf(s).all()
    index.add(np.array([7, 8, 9]), x)
    s, i = index.search(x[0], 5)  # a single 1-D query is accepted
    assert s.shape == (1, 5)
    assert sorted(i[0, :3].tolist()) == [7, 8, 9] and (i[0, 3:] == -1).all()
    assert np.isfinite(s[0, :3]).all() and np.isneginf(s[0, 3:]).all()


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_kinds_recall_and_round_trip(kind: str, tmp_path: Path) -> None:
    x = clustered(3000, 2)
    ids = np.arange(3000, dtype=np.int64) * 3 + 1
    q = clustered(100, 3, gap=0.3)  # cross-modal style queries
    train = np.concatenate([x[:1500], clustered(1500, 4, gap=0.3)])  # both modalities
    index = FaissIndex.build(ids, x, kind=kind, train_vectors=train if kind == "ivfpq" else None)
    assert index.kind == kind and len(index) == 3000
    _, truth = brute_force(x, ids, q, 10)
    _, got = index.search(q, 10)
    assert recall(got, truth) >= 0.9

    index.save(tmp_path / kind)
    again = FaissIndex.load(tmp_path / kind)
    assert again.kind == kind and len(again) == 3000 and again.params == index.params
    _, got2 = again.search(q, 10)
    np.testing.assert_array_equal(got2, got)


def test_ivfpq_defaults_and_search_params() -> None:
    x = clustered(2000, 5)
    index = FaissIndex.build(np.arange(2000), x, kind="ivfpq", nprobe=4, k_factor=4)
    p = index.params
    assert p["pq_m"] == default_pq_m(DIM) == 2 and DIM % p["pq_m"] == 0
    assert 1 <= p["nlist"] <= 2000 // 39 and 4 <= p["pq_nbits"] <= 8
    inner = index._index
    assert isinstance(inner, faiss.IndexRefine) and inner.k_factor == 4
    assert isinstance(faiss.downcast_index(inner.refine_index), faiss.IndexFlatIP)  # exact re-ranking
    index.set_search_params(nprobe=8, k_factor=20)
    assert faiss.downcast_index(inner.base_index).nprobe == 8 and inner.k_factor == 20
    with pytest.raises(ConfigError):
        index.set_search_params(nprobe=0)
    assert default_pq_m(1536) == 96 and default_pq_m(1000) == 50 and default_pq_m(7) == 1


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_incremental_add_after_load(kind: str, tmp_path: Path) -> None:
    x = clustered(2000, 6)
    index = FaissIndex.build(np.arange(1000), x[:1000], kind=kind, train_vectors=x)
    index.save(tmp_path / "i")
    first_file = read_manifest(tmp_path / "i")["file"]
    loaded = open_index(tmp_path / "i")
    loaded.add(np.arange(1000, 2000), x[1000:])
    assert len(loaded) == 2000
    q = clustered(50, 12, gap=0.3)
    _, got = loaded.search(q, 10)
    _, truth = brute_force(x, np.arange(2000), q, 10)
    assert recall(got, truth) >= 0.9
    assert np.isin(truth, np.arange(1000, 2000)).mean() > 0.3  # the new vectors are really being found
    loaded.save(tmp_path / "i")
    manifest = read_manifest(tmp_path / "i")
    assert manifest["count"] == 2000 and manifest["file"] != first_file
    assert sorted(p.name for p in (tmp_path / "i").iterdir()) == sorted(
        ["index.json", manifest["file"], manifest["ids_file"]])  # the previous save's files are gone
    assert len(open_index(tmp_path / "i")) == 2000


def test_auto_picks_kind_from_size() -> None:
    assert choose_kind(10, 1536) == "flat"
    assert choose_kind(1_000_000, 1536) == "flat"
    assert choose_kind(2_000_000, 1536, ram_bytes=1 << 40) == "hnsw"
    assert choose_kind(2_000_000, 1536, ram_bytes=8 << 30) == "ivfpq"
    x = clustered(1000, 7)
    assert FaissIndex.build(np.arange(1000), x, flat_max=500, ram_bytes=1 << 40).kind == "hnsw"
    small = FaissIndex.build(np.arange(1000), x, flat_max=500, ram_bytes=1 << 10)
    assert small.kind == "ivfpq" and small.params["refine"] == "none"  # memory-bound: no re-ranking copy
    assert choose_refine(10**6, 1536, ram_bytes=64 << 30) == "flat"
    assert choose_refine(10**6, 1536, ram_bytes=4 << 30) == "sq8"
    assert choose_refine(10**6, 1536, ram_bytes=1 << 30) == "none"
    assert FaissIndex(DIM, "hnsw", expected_count=5000).params["ef_search"] == 128
    assert FaissIndex(DIM, "hnsw", expected_count=2_000_000).params["ef_search"] == 1024


def test_respects_caller_thread_setting() -> None:
    faiss.omp_set_num_threads(3)  # the autouse fixture restores the previous value
    FaissIndex.build(np.arange(700), clustered(700, 8), kind="ivfpq").search(clustered(5, 9), 3)
    assert faiss.omp_get_max_threads() == 3


def test_bad_inputs(tmp_path: Path) -> None:
    x = clustered(50, 10)
    index = FaissIndex(DIM, "flat")
    with pytest.raises(InputError, match="dimension mismatch"):
        index.add(np.arange(50), x[:, :16])
    with pytest.raises(InputError, match="empty"):
        index.add(np.zeros(0, np.int64), np.zeros((0, DIM), np.float32))
    bad = x.copy()
    bad[3, 5] = np.nan
    with pytest.raises(InputError, match="row 3"):
        index.add(np.arange(50), bad)
    with pytest.raises(InputError, match="50 vectors"):
        index.add(np.arange(49), x)
    with pytest.raises(InputError, match="duplicate id 4"):
        index.add(np.array([1, 2, 3, 4, 4] + list(range(10, 55))), x)
    with pytest.raises(InputError, match=">= 0"):
        index.add(np.arange(50) - 1, x)
    with pytest.raises(InputError, match="integers"):
        index.add(np.arange(50, dtype=np.float64), x)
    index.add(np.arange(50), x)
    with pytest.raises(InputError, match="already in the index"):
        index.add(np.array([49]), x[:1])
    with pytest.raises(InputError, match="dimension mismatch"):
        index.search(x[:, :8], 3)
    with pytest.raises(InputError, match="k:"):
        index.search(x, 0)
    with pytest.raises(ConfigError, match="kind"):
        FaissIndex(DIM, "annoy")
    with pytest.raises(ConfigError, match="pq_m"):
        FaissIndex(DIM, "ivfpq", pq_m=5)
    with pytest.raises(InputError, match="not trained"):
        FaissIndex(DIM, "ivfpq").add(np.arange(50), x)
    with pytest.raises(InputError, match="at least"):
        FaissIndex(DIM, "ivfpq").train(x)


def test_bad_directories(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        open_index(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="missing index manifest"):
        open_index(tmp_path / "empty")
    index = FaissIndex.build(np.arange(20), clustered(20, 11))
    index.save(tmp_path / "ok")
    manifest = json.loads((tmp_path / "ok" / "index.json").read_text())

    def write(name: str, **changes: object) -> Path:
        (tmp_path / name).mkdir()
        for f in (tmp_path / "ok").iterdir():
            if f.name != "index.json":
                (tmp_path / name / f.name).write_bytes(f.read_bytes())
        (tmp_path / name / "index.json").write_text(json.dumps({**manifest, **changes}))
        return tmp_path / name

    with pytest.raises(InputError, match="unknown index backend 'annoy'"):
        open_index(write("b1", backend="annoy"))
    with pytest.raises(InputError, match="do not match"):
        open_index(write("b2", dim=64))
    with pytest.raises(InputError, match="field 'count'"):
        open_index(write("b3", count="many"))
    with pytest.raises(InputError, match="field 'file' is missing"):
        open_index(write("b4", file="index-gone.faiss"))
    with pytest.raises(InputError, match="field 'ids_file' is missing"):
        open_index(write("b6", ids_file="../ids.npy"))
    (tmp_path / "b5").mkdir()
    (tmp_path / "b5" / "index.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        open_index(tmp_path / "b5")
    with pytest.raises(ConfigError, match="unknown option"):
        FaissIndex.load(tmp_path / "ok", efsearch=3)


@pytest.mark.parametrize("refine", ["sq8", "fp16", "none"])
def test_ivfpq_refine_variants(refine: str, tmp_path: Path) -> None:
    x = clustered(2000, 13)
    q = clustered(30, 14, gap=0.3)
    index = FaissIndex.build(np.arange(2000), x, kind="ivfpq", refine=refine, k_factor=20)
    _, truth = brute_force(x, np.arange(2000), q, 10)
    _, got = index.search(q, 10)
    assert recall(got, truth) >= (0.9 if refine != "none" else 0.3)
    index.save(tmp_path / refine)
    np.testing.assert_array_equal(FaissIndex.load(tmp_path / refine).search(q, 10)[1], got)


def two_modalities(n: int, seed: int, which: int, dim: int = 64) -> np.ndarray:
    """Shared clustered signal plus a constant per-modality offset (nearly orthogonal to the signal)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(40, 8))
    basis = np.random.default_rng(98).normal(size=(8, dim))
    s = (centers[rng.integers(0, 40, n)] + 0.5 * rng.normal(size=(n, 8))) @ basis
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    offsets = np.random.default_rng(96).normal(size=(2, dim))
    offsets /= np.linalg.norm(offsets, axis=1, keepdims=True)
    x = s + 0.0125 * rng.normal(size=(n, dim)) + offsets[which]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ivfpq_coarse_quantiser_ignores_other_modality() -> None:
    """Mixed train_vectors reach only the PQ codebooks: text-fitted centroids would hold no images."""
    images, text, queries = two_modalities(3000, 1, 0), two_modalities(3000, 2, 1), two_modalities(50, 3, 1)
    mixed = np.concatenate([images, text])
    _, truth = brute_force(images, np.arange(3000), queries, 10)
    index = FaissIndex.build(np.arange(3000), images, kind="ivfpq", train_vectors=mixed, nprobe=8)
    assert recall(index.search(queries, 10)[1], truth) >= 0.9
    ivf = faiss.downcast_index(index._index.base_index)
    sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)])
    assert (sizes > 0).mean() > 0.9  # every centroid sits among the indexed vectors
    # The failure this guards against: a coarse quantiser fitted on the mix serves text queries nothing.
    naive = FaissIndex(64, "ivfpq", expected_count=3000, nprobe=8)
    naive.train(mixed)
    naive.add(np.arange(3000), images)
    assert recall(naive.search(queries, 10)[1], truth) < 0.2


def test_benchmark_script_smoke(tmp_path: Path) -> None:
    """benchmarks/index_scale.py runs end to end on a tiny gallery and writes its JSON table."""
    from conftest import load_benchmark

    module = load_benchmark("index_scale")
    out = tmp_path / "r.json"
    module.main(["--sizes", "2000", "--dim", "32", "--queries", "20", "--ef-search", "64", "--nprobe", "16",
                 "--k-factor", "10", "--threads", "1", "--latent-dim", "8", "--clusters", "20", "--out", str(out),
                 "--workdir", str(tmp_path / "w")])
    rows = json.loads(out.read_text())["rows"]
    assert [r["kind"] for r in rows] == ["flat", "ivfpq", "hnsw"]
    assert rows[0]["recall@10"] == 1.0 and rows[0]["bytes_per_item"] >= 32 * 4
    assert all(0.0 <= r["recall@10"] <= 1.0 and r["p50_ms"] > 0 for r in rows)
