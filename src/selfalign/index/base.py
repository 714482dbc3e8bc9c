"""The vector index interface: add (id, vector) pairs, search by inner product, save and reopen.

Embeddings compare by dot product (they need not be unit-norm), so every backend uses the inner-product
metric. An index directory always holds ``index.json`` (the manifest: backend, kind, dim, count, plus
backend-specific fields); it is written last, so a directory with a manifest is a complete index.
"""

from __future__ import annotations

import abc
import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from selfalign.atomic import write_json
from selfalign.errors import InputError

MANIFEST = "index.json"
FORMAT = "selfalign-index"
FORMAT_VERSION = 1


class VectorIndex(abc.ABC):
    """An inner-product vector store keyed by int64 ids (ids are >= 0; -1 pads missing results)."""

    backend: ClassVar[str] = ""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Vector width E."""

    @property
    @abc.abstractmethod
    def kind(self) -> str:
        """The index structure (e.g. ``flat``, ``hnsw``, ``ivfpq``)."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of stored vectors."""

    @abc.abstractmethod
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store ``vectors [N, E]`` under ``ids [N]`` (int64, >= 0, not already present)."""

    @abc.abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: ``queries [Q, E]`` -> ``(scores [Q, k] float32, ids [Q, k] int64)``.

        Rows are sorted by decreasing score; when fewer than k vectors exist the tail is id -1, score -inf.
        """

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike) -> None:
        """Write the index into ``directory`` atomically (the manifest is replaced last)."""

    @classmethod
    @abc.abstractmethod
    def load(cls, directory: str | os.PathLike, **kwargs: Any) -> "VectorIndex":
        """Reopen an index written by :meth:`save`."""


# ----------------------------------------------------------------------------------------------------
# Input validation shared by the backends


def check_vectors(vectors: Any, dim: int | None, what: str = "vectors") -> np.ndarray:
    """Validate ``[N, E]`` finite, non-empty vectors; return them as C-contiguous float32."""
    arr = np.asarray(vectors)
    if arr.ndim == 1 and what == "queries":
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InputError(f"{what}: expected a 2-D array [N, E], got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise InputError(f"{what}: empty array (0 rows)")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"{what}: expected real numbers, got dtype {arr.dtype}")
    if dim is not None and arr.shape[1] != dim:
        raise InputError(f"{what}: dimension mismatch: the index holds {dim}-d vectors, got {arr.shape[1]}-d")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    step = 1 << 16  # blockwise, so a 1M x 1536 gallery does not need a 1.5 GB boolean temporary
    for start in range(0, arr.shape[0], step):
        finite = np.isfinite(arr[start:start + step]).all(axis=1)
        if not finite.all():
            bad = start + int(np.flatnonzero(~finite)[0])
            raise InputError(f"{what}: row {bad} contains NaN or infinite values")
    return arr


def check_ids(ids: Any, n: int) -> np.ndarray:
    """Validate ``[N]`` unique non-negative integer ids matching ``n`` vectors; return int64."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise InputError(f"ids: expected a 1-D array [N], got shape {tuple(arr.shape)}")
    if arr.shape[0] != n:
        raise InputError(f"ids: {arr.shape[0]} ids for {n} vectors")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"ids: expected integers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.size and arr.min() < 0:
        raise InputError(f"ids: must be >= 0 (-1 marks a missing result), got {int(arr.min())}")
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise InputError(f"ids: duplicate id {int(uniq[counts > 1][0])} in one add() call")
    return arr


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k: expected a positive integer, got {k!r}")
    return int(k)


def pad_results(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalise padding: wherever the id is -1 the score becomes -inf (backends use assorted sentinels)."""
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    scores[ids < 0] = -np.inf
    ids[ids < 0] = -1
    return scores, ids


# ----------------------------------------------------------------------------------------------------
# Manifest


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Atomically replace ``directory/index.json``; call this after every data file is in place."""
    body = {"format": FORMAT, "version": FORMAT_VERSION, **manifest}
    write_json(Path(directory) / MANIFEST, body)


def read_json_manifest(directory: str | os.PathLike, name: str, fmt: str, version: int,
                       fields: tuple[tuple[str, type], ...], what: str, folder: str) -> dict[str, Any]:
    """Read ``directory/name`` and check its ``format``, ``version`` and typed ``fields``; errors name the file.

    Shared by the vector index (``index.json``) and the gallery (``gallery.json``).
    """
    path = Path(directory) / name
    if not path.is_file():
        if not Path(directory).is_dir():
            raise InputError(f"{directory}: {folder} does not exist")
        raise InputError(f"{path}: missing {what} manifest (not a saved {what}, or the save did not finish)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable {what} manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise InputError(f"{path}: not a selfalign {what} manifest (field 'format' must be {fmt!r})")
    if manifest.get("version") != version:
        raise InputError(f"{path}: unsupported {what} manifest version {manifest.get('version')!r}")
    for key, typ in fields:
        value = manifest.get(key)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise InputError(f"{path}: field '{key}' missing or not a {typ.__name__}")
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``directory/index.json`` (backend, kind, dim, count)."""
    manifest = read_json_manifest(directory, MANIFEST, FORMAT, FORMAT_VERSION,
                                  (("backend", str), ("kind", str), ("dim", int), ("count", int)), "index",
                                  "index directory")
    if manifest["dim"] < 1 or manifest["count"] < 0:
        raise InputError(f"{Path(directory) / MANIFEST}: field 'dim' must be >= 1 and 'count' >= 0")
    return manifest


def open_index(directory: str | os.PathLike, **kwargs: Any) -> VectorIndex:
    """Open a saved index of any backend, dispatching on the manifest's ``backend`` field."""
    manifest = read_manifest(directory)
    backend = manifest["backend"]
    if backend == "faiss":
        from selfalign.index.faiss_index import FaissIndex

        return FaissIndex.load(directory, **kwargs)
    if backend == "milvus":
        from selfalign.index.milvus_index import MilvusIndex

        return MilvusIndex.load(directory, **kwargs)
    raise InputError(
        f"{Path(directory) / MANIFEST}: unknown index backend {backend!r} (expected 'faiss' or 'milvus')"
    )


def available_ram_bytes() -> int:
    """Memory the OS could hand out now (Linux ``MemAvailable``); a large number when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return 1 << 62


def isqrt_scaled(n: int, factor: float) -> int:
    """``round(factor * sqrt(n))``, at least 1."""
    return max(1, int(round(factor * math.sqrt(max(n, 0)))))
