"""Vector indexes for serving: one small interface, a faiss default, an optional Milvus adapter."""

from __future__ import annotations

from typing import Any

from selfalign.index.base import VectorIndex, open_index, read_manifest
from selfalign.index.faiss_index import FaissIndex, choose_kind

__all__ = ["VectorIndex", "FaissIndex", "MilvusIndex", "choose_kind", "open_index", "read_manifest"]


def __getattr__(name: str) -> Any:
    # MilvusIndex loads lazily: importing selfalign.index must not require pymilvus.
    if name == "MilvusIndex":
        from selfalign.index.milvus_index import MilvusIndex

        return MilvusIndex
    raise AttributeError(f"module 'selfalign.index' has no attribute {name!r}")
