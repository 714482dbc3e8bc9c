"""MilvusIndex against Milvus Lite (an embedded Milvus in a local *.db file under tmp_path)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from selfalign.errors import ConfigError, InputError
from selfalign.index import open_index, read_manifest

MISSING = [m for m in ("pymilvus", "milvus_lite") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"optional Milvus backend not installed ({', '.join(MISSING)}): pip install 'selfalign[milvus]'",
)

DIM = 16


def data(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def exact(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]]


def test_lazy_import_keeps_core_independent() -> None:
    import selfalign.index as index_pkg

    assert "MilvusIndex" in index_pkg.__all__
    assert index_pkg.MilvusIndex.backend == "milvus"


def test_add_search_save_load_round_trip(tmp_path: Path) -> None:
    from selfalign.index import MilvusIndex

    x = data(300, 0)
    ids = np.arange(300, dtype=np.int64) * 7
    q = data(12, 1)
    index = MilvusIndex(DIM, str(tmp_path / "milvus.db"), "gallery")
    assert len(index) == 0 and index.dim == DIM and index.kind == "flat"
    s, i = index.search(q, 3)
    assert (i == -1).all() and np.isneginf(s).all()
    index.add(ids, x)
    assert len(index) == 300
    scores, got = index.search(q, 10)
    np.testing.assert_array_equal(got, exact(x, ids, q, 10))  # FLAT is exact
    np.testing.assert_allclose(scores, np.sort(q @ x.T, axis=1)[:, ::-1][:, :10], rtol=1e-4, atol=1e-4)
    assert scores.dtype == np.float32 and got.dtype == np.int64
    index.save(tmp_path / "idx")
    index.close()

    manifest = read_manifest(tmp_path / "idx")
    assert manifest["backend"] == "milvus" and manifest["count"] == 300 and manifest["collection"] == "gallery"
    assert Path(manifest["uri"]).is_absolute()
    again = open_index(tmp_path / "idx")
    assert isinstance(again, MilvusIndex) and len(again) == 300
    np.testing.assert_array_equal(again.search(q, 10)[1], got)

    # incremental add after load, then a second save
    x2 = data(100, 2)
    again.add(np.arange(5000, 5100), x2)
    assert len(again) == 400
    all_x, all_ids = np.concatenate([x, x2]), np.concatenate([ids, np.arange(5000, 5100)])
    np.testing.assert_array_equal(again.search(q, 10)[1], exact(all_x, all_ids, q, 10))
    again.save(tmp_path / "idx")
    assert read_manifest(tmp_path / "idx")["count"] == 400
    s, i = again.search(q[:1], 500)
    assert (i[0, :400] >= 0).all() and (i[0, 400:] == -1).all() and np.isneginf(s[0, 400:]).all()
    again.close()


def test_hnsw_kind_recall(tmp_path: Path) -> None:
    from selfalign.index import MilvusIndex

    x, q = data(1000, 3), data(20, 4)
    with MilvusIndex(DIM, str(tmp_path / "m.db"), "h", kind="hnsw", search_params={"ef": 64}) as index:
        index.add(np.arange(1000), x)
        got = index.search(q, 10)[1]
    truth = exact(x, np.arange(1000), q, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)]) >= 0.9


def test_bad_inputs(tmp_path: Path) -> None:
    from selfalign.index import MilvusIndex

    with pytest.raises(ConfigError, match=r"\.db"):
        MilvusIndex(DIM, str(tmp_path / "milvus.sqlite"))
    with pytest.raises(ConfigError, match="kind"):
        MilvusIndex(DIM, str(tmp_path / "m.db"), kind="diskann_xl")
    with pytest.raises(ConfigError, match="collection"):
        MilvusIndex(DIM, str(tmp_path / "m.db"), collection="bad name!")
    with MilvusIndex(DIM, str(tmp_path / "m.db"), "c") as index:
        with pytest.raises(InputError, match="dimension mismatch"):
            index.add(np.arange(5), data(5, 5)[:, :8])
        bad = data(5, 6)
        bad[2, 0] = np.inf
        with pytest.raises(InputError, match="row 2"):
            index.add(np.arange(5), bad)
        index.add(np.arange(5), data(5, 7))
        with pytest.raises(InputError, match="already in milvus"):
            index.add(np.array([9, 4]), data(2, 8))
        assert len(index) == 5
        with pytest.raises(InputError, match="k:"):
            index.search(data(1, 9), 0)
        index.save(tmp_path / "c")
    with pytest.raises(InputError, match="dimension mismatch"):
        MilvusIndex(DIM * 2, str(tmp_path / "m.db"), "c")
    with MilvusIndex(DIM, str(tmp_path / "m.db"), "c") as index:
        index.drop()
    with pytest.raises(InputError, match="does not exist"):
        open_index(tmp_path / "c")
