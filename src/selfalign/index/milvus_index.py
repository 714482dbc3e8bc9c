"""A :class:`VectorIndex` over a Milvus collection, for deployments that outgrow one machine.

``MilvusClient(uri)`` with a local ``*.db`` path runs Milvus Lite embedded (prototyping, tests); the same
code with ``http://host:19530`` talks to a Milvus standalone or distributed cluster, which shards and
replicates the collection server-side. ``pymilvus`` is an optional dependency (``pip install
selfalign[milvus]``); it is imported only when a Milvus index is created or opened.

The saved index directory holds only ``index.json`` (URI, collection, kind); the vectors live in Milvus.
Credentials are never written: pass ``token=`` or set ``SELFALIGN_MILVUS_TOKEN``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from selfalign.errors import ConfigError, InputError, SelfAlignError
from selfalign.index.base import (
    MANIFEST,
    VectorIndex,
    check_ids,
    check_k,
    check_vectors,
    read_manifest,
    write_manifest,
)

# kind -> (Milvus index_type, build params); Milvus Lite accepts these names (it may serve them flat).
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "flat": ("FLAT", {}),
    "hnsw": ("HNSW", {"M": 32, "efConstruction": 40}),
    "ivf_flat": ("IVF_FLAT", {"nlist": 1024}),
    "autoindex": ("AUTOINDEX", {}),
}
MAX_TOPK = 16384  # Milvus' limit on ``limit``
INSERT_BATCH = 2048
ID_FIELD, VEC_FIELD = "id", "vector"
TOKEN_ENV = "SELFALIGN_MILVUS_TOKEN"


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError as exc:
        raise SelfAlignError(
            "the Milvus index backend needs pymilvus (and milvus-lite for local *.db files): "
            "pip install 'selfalign[milvus]'"
        ) from exc
    return pymilvus


def _normalise_uri(uri: str) -> str:
    """Local Milvus Lite files become absolute paths (so a saved manifest works from any cwd)."""
    if "://" in uri:
        return uri
    if not uri.endswith(".db"):
        raise ConfigError(f"milvus uri: {uri!r} is neither http(s)://host:port "
                          "nor a local Milvus Lite file ending in .db")
    return str(Path(uri).expanduser().resolve())


class MilvusIndex(VectorIndex):
    """Inner-product vectors in one Milvus collection (int64 primary key ``id``, float vector ``vector``).

    ``search_params`` go to Milvus per query (e.g. ``{"ef": 128}`` for HNSW, ``{"nprobe": 32}`` for IVF).
    Opening a collection that already exists reuses it (its dimension must match); with ``create=False``
    a missing collection is an error.
    """

    backend = "milvus"

    def __init__(self, dim: int, uri: str, collection: str = "selfalign", kind: str = "flat", *,
                 index_params: dict[str, Any] | None = None, search_params: dict[str, Any] | None = None,
                 token: str | None = None, create: bool = True) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ConfigError(f"index dim: expected a positive integer, got {dim!r}")
        if kind not in KINDS:
            raise ConfigError(f"milvus index kind: expected one of {', '.join(KINDS)}; got {kind!r}")
        if not collection or not collection.replace("_", "").isalnum() or collection[0].isdigit():
            raise ConfigError(f"milvus collection: {collection!r} must be letters, digits and '_', "
                              "not starting with a digit")
        pymilvus = _pymilvus()
        self._dim, self._kind, self.collection = int(dim), kind, collection
        self.uri = _normalise_uri(uri)
        self.index_params = {**KINDS[kind][1], **(index_params or {})}
        self.search_params = dict(search_params or {})
        try:
            self._client = pymilvus.MilvusClient(self.uri, token=token or os.environ.get(TOKEN_ENV, ""))
        except Exception as exc:  # noqa: BLE001 - pymilvus raises many types for "cannot connect"
            raise InputError(f"milvus uri {self.uri}: cannot connect: {exc}") from exc
        if self._client.has_collection(collection):
            self._check_existing()
        elif create:
            self._create()
        else:
            self._client.close()
            raise InputError(f"milvus collection {collection!r} does not exist at {self.uri}")
        self._client.load_collection(collection)

    def _create(self) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID_FIELD, DataType.INT64, is_primary=True)
        schema.add_field(VEC_FIELD, DataType.FLOAT_VECTOR, dim=self._dim)
        params = self._client.prepare_index_params()
        params.add_index(field_name=VEC_FIELD, index_type=KINDS[self._kind][0], metric_type="IP",
                         params=self.index_params)
        # Strong consistency: a search right after add() must see the new vectors.
        self._client.create_collection(self.collection, schema=schema, index_params=params,
                                       consistency_level="Strong")

    def _check_existing(self) -> None:
        info = self._client.describe_collection(self.collection)
        fields = {f["name"]: f for f in info.get("fields", [])}
        vec = fields.get(VEC_FIELD)
        if ID_FIELD not in fields or vec is None:
            raise InputError(f"milvus collection {self.collection!r} at {self.uri}: not a selfalign collection "
                             f"(needs fields {ID_FIELD!r} and {VEC_FIELD!r})")
        found = int(vec.get("params", {}).get("dim", -1))
        if found != self._dim:
            raise InputError(f"milvus collection {self.collection!r} at {self.uri}: dimension mismatch: "
                             f"it holds {found}-d vectors, expected {self._dim}")

    # ------------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def kind(self) -> str:
        return self._kind

    def __len__(self) -> int:
        rows = self._client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert ``vectors [N, E]`` under new, unique ``ids [N]`` (Milvus itself would accept duplicates)."""
        x = check_vectors(vectors, self._dim)
        ids = check_ids(ids, x.shape[0])
        for start in range(0, len(ids), INSERT_BATCH):
            chunk = ids[start:start + INSERT_BATCH].tolist()
            found = self._client.query(self.collection, ids=chunk, output_fields=[ID_FIELD])
            if found:
                raise InputError(f"ids: id {int(found[0][ID_FIELD])} is already in milvus collection "
                                 f"{self.collection!r}")
        for start in range(0, len(ids), INSERT_BATCH):
            rows = [{ID_FIELD: int(i), VEC_FIELD: v} for i, v in
                    zip(ids[start:start + INSERT_BATCH], x[start:start + INSERT_BATCH])]
            self._client.insert(self.collection, rows)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner product: ``queries [Q, E]`` -> ``(scores [Q, k], ids [Q, k])``, -inf / -1 padded."""
        q = check_vectors(queries, self._dim, "queries")
        k = check_k(k)
        if k > MAX_TOPK:
            raise InputError(f"k: Milvus returns at most {MAX_TOPK} results per query, got {k}")
        scores = np.full((q.shape[0], k), -np.inf, np.float32)
        ids = np.full((q.shape[0], k), -1, np.int64)
        hits = self._client.search(self.collection, data=list(q), limit=k, anns_field=VEC_FIELD,
                                   search_params={"metric_type": "IP", "params": self.search_params},
                                   output_fields=[ID_FIELD])
        for row, found in enumerate(hits):
            n = min(len(found), k)
            ids[row, :n] = [h["id"] for h in found[:n]]
            scores[row, :n] = [h["distance"] for h in found[:n]]
        return scores, ids

    # ------------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Flush the collection, then write ``index.json`` (URI + collection) atomically."""
        self._client.flush(self.collection)
        write_manifest(directory, {
            "backend": self.backend, "kind": self._kind, "dim": self._dim, "count": len(self),
            "uri": self.uri, "collection": self.collection,
            "index_params": self.index_params, "search_params": self.search_params,
        })

    @classmethod
    def load(cls, directory: str | os.PathLike, **kwargs: Any) -> "MilvusIndex":
        """Reconnect to the collection named in ``index.json``; ``token``/``search_params``/``uri`` may be given."""
        manifest = read_manifest(directory)
        where = Path(directory) / MANIFEST
        if manifest["backend"] != cls.backend:
            raise InputError(f"{where}: backend is {manifest['backend']!r}, not 'milvus'")
        for key in ("uri", "collection"):
            if not isinstance(manifest.get(key), str):
                raise InputError(f"{where}: field {key!r} missing or not a string")
        unknown = set(kwargs) - {"token", "search_params", "uri"}
        if unknown:
            raise ConfigError(f"MilvusIndex.load: unknown option(s) {sorted(unknown)}")
        uri = kwargs.get("uri") or manifest["uri"]
        if "://" not in uri and not Path(uri).exists():
            raise InputError(f"{where}: Milvus Lite file {uri} named by the manifest is missing")
        try:
            return cls(manifest["dim"], uri, manifest["collection"], manifest["kind"],
                       index_params=manifest.get("index_params"),
                       search_params=kwargs.get("search_params", manifest.get("search_params")),
                       token=kwargs.get("token"), create=False)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from exc

    def drop(self) -> None:
        """Delete the collection and its vectors from Milvus."""
        self._client.drop_collection(self.collection)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "MilvusIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MilvusIndex(dim={self._dim}, uri={self.uri!r}, collection={self.collection!r}, kind={self._kind!r})"
