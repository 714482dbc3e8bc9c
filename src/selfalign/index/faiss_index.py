"""The default, embedded vector index: faiss-cpu with the inner-product metric.

* ``flat``  — ``IndexFlatIP``: exact; the default up to ``flat_max`` (1M) items.
* ``hnsw``  — ``IndexHNSWFlat`` (M=32): best speed/recall when the full vectors fit in RAM.
* ``ivfpq`` — ``IndexIVFPQ`` + re-ranking: exact (``IndexRefine`` over ``IndexFlatIP``), or from an SQ8/fp16
  copy when memory is short. The coarse quantiser is fitted on the indexed modality (see :meth:`FaissIndex.train`).

Caller ids live in a numpy array beside the faiss index (position -> id) rather than in faiss'
``IndexIDMap2``: the latter opens an OpenMP parallel region on every search, and on a busy 2-core machine
each single query then waits for a scheduler slice (measured p99 32 ms vs 0.6 ms for HNSW at 20K items).
The thread count is whatever the caller set with ``faiss.omp_set_num_threads``; it is never changed here.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from selfalign.atomic import atomic_path, save_npy
from selfalign.errors import ConfigError, InputError
from selfalign.index.base import (
    MANIFEST,
    VectorIndex,
    available_ram_bytes,
    check_ids,
    check_k,
    check_vectors,
    isqrt_scaled,
    pad_results,
    read_manifest,
    write_manifest,
)

KINDS = ("flat", "hnsw", "ivfpq")
REFINES = ("flat", "fp16", "sq8", "none")
FLAT_MAX = 1_000_000
# Defaults chosen with benchmarks/index_scale.py (modality-gapped synthetic data, text queries, 2 cores).
# nlist = 4 sqrt(N): PQ encodes residuals to the list centroid, so small lists keep them small; at 100K,
# sqrt(N) lists capped recall@10 at 0.94 where 4 sqrt(N) gave 1.00 (at 1M: 0.98 either way, build 121 s vs 163 s).
DEFAULT_EF_SEARCH = 128  # up to 200K items: recall@10 0.998 at 100K (1.2 ms)
LARGE_EF_SEARCH = 1024  # above: at 1M, ef 256 gave only 0.89 for text queries, 1024 gave 0.95 (4.6 ms)
DEFAULT_NPROBE = 32
DEFAULT_K_FACTOR = 30  # 10 left recall@10 at 0.86 at 1M (SQ8 refine); 30 gave 0.975 for +0.3 ms
MIN_PQ_TRAIN = 39 * 16  # faiss wants >= 39 points per centroid; 16 centroids is the smallest useful PQ


def choose_kind(n: int, dim: int, *, flat_max: int = FLAT_MAX, hnsw_m: int = 32, ram_bytes: int | None = None) -> str:
    """The ``auto`` rule: exact flat up to ``flat_max`` items, else HNSW if it fits in RAM, else IVF-PQ."""
    if n <= flat_max:
        return "flat"
    ram = available_ram_bytes() if ram_bytes is None else ram_bytes
    # Full vectors + level-0 links (2M int32) + upper levels and ids, with headroom for the build.
    return "hnsw" if n * (4 * dim + 2 * hnsw_m * 4 * 1.1 + 24) <= 0.8 * ram else "ivfpq"


def choose_refine(n: int, dim: int, ram_bytes: int | None = None) -> str:
    """Re-ranking store for IVF-PQ: exact float32 if it fits in RAM, else SQ8 (1 byte/dim), else none."""
    ram = available_ram_bytes() if ram_bytes is None else ram_bytes
    if n * 4 * dim <= 0.8 * ram:
        return "flat"
    return "sq8" if n * dim <= 0.8 * ram else "none"


def default_ef_search(n: int | None) -> int:
    """HNSW efSearch for an index expected to hold ``n`` items (cross-modal queries need a wide beam at 1M)."""
    return DEFAULT_EF_SEARCH if (n or 0) <= 200_000 else LARGE_EF_SEARCH


def default_pq_m(dim: int) -> int:
    """Largest divisor of ``dim`` not above ``dim // 16`` (about one byte per 16 dimensions)."""
    target = max(1, dim // 16)
    return max(m for m in range(1, target + 1) if dim % m == 0)


class FaissIndex(VectorIndex):
    """faiss-backed :class:`VectorIndex`; prefer :meth:`build`, which picks the structure from N.

    Search knobs (``ef_search``, ``nprobe``, ``k_factor``) can change any time via :meth:`set_search_params`;
    build knobs are fixed once the index holds data. ``refine=None`` picks the IVF-PQ re-ranking store
    from the available RAM (:func:`choose_refine`); ``ef_search=None`` follows ``expected_count``
    (:func:`default_ef_search`).
    """

    backend = "faiss"

    def __init__(
        self, dim: int, kind: str = "auto", *, expected_count: int | None = None, flat_max: int = FLAT_MAX,
        ram_bytes: int | None = None, hnsw_m: int = 32, ef_construction: int = 40,
        ef_search: int | None = None, nlist: int | None = None, nlist_factor: float = 4.0,
        pq_m: int | None = None, pq_nbits: int | None = None, nprobe: int = DEFAULT_NPROBE,
        k_factor: float = DEFAULT_K_FACTOR, refine: str | None = None, train_max: int | None = 100_000,
        kmeans_niter: int = 10, seed: int = 1234,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ConfigError(f"index dim: expected a positive integer, got {dim!r}")
        if kind == "auto":
            kind = choose_kind(expected_count or 0, int(dim), flat_max=flat_max, hnsw_m=hnsw_m, ram_bytes=ram_bytes)
        if kind not in KINDS:
            raise ConfigError(f"index kind: expected one of auto, {', '.join(KINDS)}; got {kind!r}")
        if refine is None:
            refine = choose_refine(expected_count or 0, int(dim), ram_bytes)
        if ef_search is None:
            ef_search = default_ef_search(expected_count)
        if refine not in REFINES:
            raise ConfigError(f"index refine: expected one of {', '.join(REFINES)}; got {refine!r}")
        if pq_m is not None and (pq_m < 1 or dim % pq_m):
            raise ConfigError(f"index pq_m: must divide dim={dim}, got {pq_m}")
        for name, value in (("hnsw_m", hnsw_m), ("ef_construction", ef_construction), ("ef_search", ef_search),
                            ("nprobe", nprobe), ("kmeans_niter", kmeans_niter), ("k_factor", k_factor)):
            if value < 1:
                raise ConfigError(f"index {name}: must be >= 1, got {value}")
        self._dim, self._kind = int(dim), kind
        self.params: dict[str, Any] = {
            "hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search,
            "nlist": nlist, "nlist_factor": nlist_factor, "pq_m": pq_m, "pq_nbits": pq_nbits,
            "nprobe": nprobe, "k_factor": float(k_factor), "refine": refine,
            "expected_count": expected_count, "train_max": train_max, "kmeans_niter": kmeans_niter, "seed": seed,
        }
        self._ids = np.zeros(0, dtype=np.int64)  # faiss position -> caller id
        self._index: Any = None  # None until an ivfpq index is trained
        if kind == "flat":
            self._index = faiss.IndexFlatIP(self._dim)
        elif kind == "hnsw":
            self._index = faiss.IndexHNSWFlat(self._dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self._index.hnsw.efConstruction = ef_construction
        self._apply_search_params()

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, kind: str = "auto",
              train_vectors: np.ndarray | None = None, **params: Any) -> "FaissIndex":
        """Build an index over ``vectors [N, E]`` with ``ids [N]``; ``auto`` picks the structure from N.

        IVF-PQ only: the coarse quantiser is fitted on (a sample of) ``vectors`` themselves;
        ``train_vectors [T, E]`` (e.g. image and text embeddings mixed) train the PQ codebooks, and
        default to the same sample. :meth:`train` explains why the coarse quantiser ignores them.
        """
        vectors = check_vectors(vectors, None)
        params.setdefault("expected_count", vectors.shape[0])
        index = cls(vectors.shape[1], kind, **params)
        if not index.is_trained:
            index.train(vectors, pq_vectors=train_vectors)
        index.add(ids, vectors)
        return index

    def train(self, vectors: np.ndarray, pq_vectors: np.ndarray | None = None) -> None:
        """Fit the IVF coarse quantiser on ``vectors [T, E]`` and the PQ codebooks on ``pq_vectors``.

        ``vectors`` must come from the INDEXED modality (images): an IVF list holds only the database
        vectors assigned to it, so centroids fitted to text embeddings stay empty, and text queries,
        which prefer those centroids under inner product, then probe empty lists (measured recall@10
        0.0 instead of 1.0 on modality-gapped data). Text queries need no centroids of their own: a
        constant offset of the database does not change an inner-product ranking. ``pq_vectors``
        (default ``vectors``) may mix both modalities. A no-op for flat and HNSW.
        """
        if self._kind != "ivfpq":
            return
        if len(self) > 0:
            raise InputError("train: the ivfpq index already holds vectors; build a new index to retrain")
        p = self.params
        x = _sample(check_vectors(vectors, self._dim, "train vectors"), p["train_max"], p["seed"])
        x_pq = x if pq_vectors is None else _sample(
            check_vectors(pq_vectors, self._dim, "train_vectors"), p["train_max"], p["seed"] + 1)
        if min(len(x), len(x_pq)) < MIN_PQ_TRAIN:
            raise InputError(f"train vectors: ivfpq needs at least {MIN_PQ_TRAIN} training vectors, got "
                             f"{min(len(x), len(x_pq))}; use kind='flat' for small galleries")
        nlist = p["nlist"] or isqrt_scaled(p["expected_count"] or len(x), p["nlist_factor"])
        nlist = max(1, min(nlist, len(x) // 39))
        nbits = p["pq_nbits"] or int(min(8, np.floor(np.log2(len(x_pq) / 39))))
        pq_m = p["pq_m"] or default_pq_m(self._dim)
        quantizer = faiss.IndexFlatIP(self._dim)
        ivf = faiss.IndexIVFPQ(quantizer, self._dim, nlist, pq_m, nbits, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter, ivf.cp.seed = p["kmeans_niter"], p["seed"]
        ivf.cp.max_points_per_centroid = max(39, -(-len(x) // nlist))  # use every given point
        # Fitting the coarse quantiser here leaves IndexIVF.train only the PQ (on residuals of x_pq).
        faiss.Clustering(self._dim, nlist, ivf.cp).train(x, quantizer)
        ivf.pq.cp.seed = p["seed"]
        ivf.pq.cp.max_points_per_centroid = 64  # faiss uses 256: 4x faster, no loss after re-ranking
        ivf.train(x_pq)
        store: Any = None
        if p["refine"] == "none":
            inner: Any = ivf
        else:
            # Generic IndexRefine even for exact re-ranking: IndexRefineFlat opens an OpenMP region per
            # search, which costs single queries a scheduler slice on a busy machine (p50 20 ms vs 0.13 ms).
            if p["refine"] == "flat":
                store = faiss.IndexFlatIP(self._dim)
            else:
                qtype = faiss.ScalarQuantizer.QT_fp16 if p["refine"] == "fp16" else faiss.ScalarQuantizer.QT_8bit
                store = faiss.IndexScalarQuantizer(self._dim, qtype, faiss.METRIC_INNER_PRODUCT)
                store.train(x)  # the store encodes indexed vectors: fit its value ranges to them
            inner = faiss.IndexRefine(ivf, store)
        p.update(nlist=nlist, pq_nbits=nbits, pq_m=pq_m)
        self._parts = (quantizer, ivf, store)  # keep the SWIG-owned pieces alive with the index
        self._index = inner
        self._apply_search_params()

    @property
    def is_trained(self) -> bool:
        return self._index is not None and bool(self._index.is_trained)

    # ------------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def kind(self) -> str:
        return self._kind

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> np.ndarray:
        """All stored ids ``[N]`` int64, in insertion order."""
        return self._ids.copy()

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Append ``vectors [N, E]`` under new, unique ``ids [N]`` (works after :meth:`load` too)."""
        x = check_vectors(vectors, self._dim)
        ids = check_ids(ids, x.shape[0])
        if not self.is_trained:
            raise InputError("add: the ivfpq index is not trained; call train(image vectors) first, "
                             "or use FaissIndex.build()")
        if len(self):
            clash = np.isin(ids, self._ids)
            if clash.any():
                raise InputError(f"ids: id {int(ids[clash][0])} is already in the index")
        self._index.add(x)
        self._ids = np.concatenate([self._ids, ids])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner product: ``queries [Q, E]`` -> ``(scores [Q, k], ids [Q, k])``, -inf / -1 padded."""
        q = check_vectors(queries, self._dim, "queries")
        k = check_k(k)
        if len(self) == 0:
            return np.full((q.shape[0], k), -np.inf, np.float32), np.full((q.shape[0], k), -1, np.int64)
        scores, pos = self._index.search(q, k)
        return pad_results(scores, np.where(pos >= 0, self._ids[np.maximum(pos, 0)], -1))

    def set_search_params(self, *, ef_search: int | None = None, nprobe: int | None = None,
                          k_factor: float | None = None) -> None:
        """Change the speed/recall knobs: HNSW ``ef_search``; IVF ``nprobe``; refine ``k_factor``."""
        for name, value in (("ef_search", ef_search), ("nprobe", nprobe), ("k_factor", k_factor)):
            if value is not None:
                if value < 1:
                    raise ConfigError(f"index {name}: must be >= 1, got {value}")
                self.params[name] = float(value) if name == "k_factor" else int(value)
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        p, index = self.params, self._index
        if index is None:
            return
        if self._kind == "hnsw":
            index.hnsw.efSearch = int(p["ef_search"])
        elif self._kind == "ivfpq":
            if isinstance(index, faiss.IndexRefine):
                index.k_factor = float(p["k_factor"])
                index = faiss.downcast_index(index.base_index)
            index.nprobe = int(min(p["nprobe"], index.nlist))

    # ------------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``index-<uid>.faiss`` and ``ids-<uid>.npy``, then the manifest; older files go last.

        A reader sees either the previous complete index or the new one, never a mix.
        """
        if self._index is None:
            raise InputError("save: the ivfpq index is not trained yet; nothing to save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        uid = uuid.uuid4().hex[:12]
        files = {"file": f"index-{uid}.faiss", "ids_file": f"ids-{uid}.npy"}
        with atomic_path(directory / files["file"]) as tmp:
            faiss.write_index(self._index, str(tmp))
        save_npy(directory / files["ids_file"], self._ids)
        write_manifest(directory, {"backend": self.backend, "kind": self._kind, "dim": self._dim,
                                   "count": len(self), **files, "params": self.params,
                                   "faiss_version": faiss.__version__})
        for old in [*directory.glob("index-*.faiss"), *directory.glob("ids-*.npy")]:
            if old.name not in files.values():
                old.unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: str | os.PathLike, **kwargs: Any) -> "FaissIndex":
        """Reopen a saved index; ``kwargs`` may override search knobs (ef_search, nprobe, k_factor)."""
        manifest = read_manifest(directory)
        where = Path(directory) / MANIFEST
        if manifest["backend"] != cls.backend:
            raise InputError(f"{where}: backend is {manifest['backend']!r}, not 'faiss'")
        if manifest["kind"] not in KINDS:
            raise InputError(f"{where}: unknown faiss index kind {manifest['kind']!r}")
        unknown = set(kwargs) - {"ef_search", "nprobe", "k_factor"}
        if unknown:
            raise ConfigError(f"FaissIndex.load: unknown option(s) {sorted(unknown)}")
        paths = {}
        for key in ("file", "ids_file"):
            name = manifest.get(key)
            if not isinstance(name, str) or "/" in name or not (Path(directory) / name).is_file():
                raise InputError(f"{where}: data file {name!r} named by field {key!r} is missing")
            paths[key] = Path(directory) / name
        try:
            raw = faiss.read_index(str(paths["file"]))
            ids = np.load(paths["ids_file"], allow_pickle=False)
        except (RuntimeError, OSError, ValueError) as exc:
            raise InputError(f"{Path(directory)}: unreadable index data: {exc}") from exc
        if raw.d != manifest["dim"] or raw.ntotal != manifest["count"] or ids.shape != (manifest["count"],):
            raise InputError(f"{Path(directory)}: data files do not match {where} (dim {raw.d} vs "
                             f"{manifest['dim']}, count {raw.ntotal} / {ids.shape[0]} ids vs {manifest['count']})")
        obj = cls.__new__(cls)
        obj._dim, obj._kind = manifest["dim"], manifest["kind"]
        obj.params = {"ef_search": DEFAULT_EF_SEARCH, "nprobe": DEFAULT_NPROBE, "k_factor": DEFAULT_K_FACTOR,
                      **(manifest.get("params") or {})}
        obj._index, obj._ids = raw, ids.astype(np.int64, copy=False)
        obj.set_search_params(**kwargs)
        return obj

    def __repr__(self) -> str:
        return f"FaissIndex(dim={self._dim}, kind={self._kind!r}, count={len(self)})"


def _sample(x: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or x.shape[0] <= limit:
        return x
    pick = np.random.default_rng(seed).choice(x.shape[0], limit, replace=False)
    return x[np.sort(pick)]
