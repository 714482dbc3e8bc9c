"""Build a gallery (or add images to one): regions -> the run's embeddings -> vector indexes + records.

Everything is written into a fresh temporary folder beside ``INDEX_DIR`` (manifest last) and swapped in by
renames, so a reader sees the old gallery or the new one, never a mix. ``add=True`` copies the old records and
region features and appends to the old vector index; old images are not encoded again.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from selfalign.atomic import write_json, write_text
from selfalign.errors import ConfigError, InputError
from selfalign.index.gallery import (
    CAPTION_VECTORS, CAPTIONS, FORMAT, FORMAT_VERSION, IMAGE_VECTORS, IMAGES, MANIFEST, REGIONS, model_hash,
    open_vectors, read_jsonl, read_manifest,
)  # fmt: skip
from selfalign.index.gallery_regions import RegionExtractor, RegionPlan, plan_regions
from selfalign.index.gallery_sources import NewImages, dataset_source, folder_source

BACKENDS = ("faiss", "milvus")
ENCODE_BATCH = 256


@dataclass
class BuildReport:
    """What a build did: images added and in total, captions in total, files skipped (path, reason), warnings."""

    index_dir: Path
    added: int
    total: int
    captions: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    already_indexed: int = 0
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _new_index(backend: str, kind: str, dim: int, count: int, uri: str | None, name: str) -> Any:
    if backend == "faiss":
        from selfalign.index.faiss_index import FaissIndex

        return FaissIndex(dim, kind, expected_count=count)
    from selfalign.index.milvus_index import MilvusIndex

    if not uri:
        raise ConfigError("the milvus backend needs --uri (a local ./gallery.db file or http://host:19530)")
    milvus_kind = ("flat" if count <= 1_000_000 else "hnsw") if kind == "auto" else kind
    return MilvusIndex(dim, uri, collection=f"gallery_{uuid.uuid4().hex[:12]}_{name}", kind=milvus_kind)


def _append_vectors(old_dir: Path | None, backend: str, kind: str, uri: str | None, name: str,
                    vectors: np.ndarray, next_id: int, out_dir: Path) -> tuple[Any, int]:
    """Add ``vectors [M, E]`` to the old index (or a new one) under ids from ``next_id``; save it to ``out_dir``."""
    index = open_vectors(old_dir) if old_dir is not None else _new_index(backend, kind, vectors.shape[1],
                                                                        len(vectors), uri, name)
    # an --add interrupted after a Milvus insert left ids past next_id behind; never reuse them
    start = max(next_id, len(index))
    if getattr(index, "is_trained", True) is False:
        index.train(vectors)
    index.add(np.arange(start, start + len(vectors), dtype=np.int64), vectors)
    index.save(out_dir)
    return index, start


def _write_regions(path: Path, old: np.ndarray | None, new: NewImages,
                   dim: int) -> tuple[list[list[list[float]]], np.ndarray]:
    """``regions.npy`` = old rows then new rows, padded to the widest; returns the new images' boxes and counts."""
    old_n = 0 if old is None else old.shape[0]
    width = max(new.width, 0 if old is None else old.shape[1])
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(old_n + len(new.paths), width, dim))
    for start in range(0, old_n, ENCODE_BATCH):
        block = np.asarray(old[start : start + ENCODE_BATCH])
        out[start : start + len(block), : block.shape[1]] = block
    row, boxes, counts = old_n, [], []
    for feats, n_regions, box in new.blocks():
        b, r = len(feats), min(feats.shape[1], width)
        out[row : row + b, :r] = feats[:, :r]
        for j in range(b):
            boxes.append(np.round(box[j, : n_regions[j]].astype(np.float64), 4).tolist())
        counts.append(n_regions)
        row += b
    if row != old_n + len(new.paths):
        raise InputError(f"internal mismatch: {row - old_n} feature rows for {len(new.paths)} new images")
    out.flush()
    del out
    return boxes, np.concatenate(counts) if counts else np.zeros(0, np.int32)


def _encode_blocks(model: Any, blocks: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Embeddings ``[M, E]`` of blocks of (region features ``[b, R, D]``, valid counts ``[b]``), in order."""
    import torch

    from selfalign.data.batches import RegionStore
    from selfalign.evaluate.runner import encode_images

    out = [encode_images(model, RegionStore.from_counts(feats, counts), ENCODE_BATCH) for feats, counts in blocks]
    return torch.cat(out).numpy()


def _encode_new(model: Any, regions_path: Path, start: int, counts: np.ndarray, new: NewImages) -> np.ndarray:
    """Embeddings ``[M, E]`` of rows ``start..`` of the written ``regions.npy``; for a mirroring plan, each averaged
    with the embedding of the image's mirrored copy (``new.mirror_blocks``)."""
    import torch

    from selfalign.evaluate.runner import average_views

    regions = np.load(regions_path, mmap_mode="r")
    rows = ((regions[start + s : start + s + ENCODE_BATCH], counts[s : s + ENCODE_BATCH])
            for s in range(0, len(counts), ENCODE_BATCH))
    embeddings = _encode_blocks(model, rows)
    if new.mirror_blocks is None:
        return embeddings
    mirrored = _encode_blocks(model, new.mirror_blocks())
    return average_views(torch.from_numpy(embeddings), torch.from_numpy(mirrored), model.embedding_parts).numpy()


def _gallery_querybank(run_dir: Path, out: Path, requested: bool | None,
                       old_manifest: dict[str, Any] | None) -> tuple[Any, str | None]:
    """The run's QueryBank and its file's sha256 when the gallery's vectors carry its discount, else (None, None).

    A new gallery uses the run's bank when ``requested`` is True, or is None and the run has one; ``--add`` keeps
    what the gallery was built with and refuses a bank that changed since (old and new images would be discounted
    differently).
    """
    from selfalign.evaluate.querybank import QueryBank

    if old_manifest is not None:
        recorded = old_manifest.get("querybank")
        if requested is not None and requested != bool(recorded):
            raise InputError(f"{out / MANIFEST}: the gallery was built {'with' if recorded else 'without'} a query "
                             f"bank; images added to it must be indexed the same way (rebuild to change that)")
        if not recorded:
            return None, None
        if not QueryBank.exists(run_dir) or QueryBank.file_hash(run_dir) != recorded["sha256"]:
            raise InputError(f"{out / MANIFEST}: the query bank of {run_dir} is not the one the gallery was built "
                             f"with (rebuilt?); rebuild the gallery with --overwrite")
        return QueryBank.load(run_dir, model_hash(run_dir)), recorded["sha256"]
    if requested is False or (requested is None and not QueryBank.exists(run_dir)):
        return None, None
    return QueryBank.load(run_dir, model_hash(run_dir)), QueryBank.file_hash(run_dir)


def _discounted(vectors: np.ndarray, discount: Any, offset: float) -> np.ndarray:
    """``[M, E]`` -> ``[M, E + 1]``: the bank's discount less ``offset`` as a last coordinate, negated, so that a query
    ``[q, 1]`` scores ``q·v - discount + offset`` in one inner product (``[q, 0]``: the plain score).

    ``offset`` (the gallery's mean discount, fixed when it is built) shifts every item's score by the same amount,
    which leaves rankings as they are but keeps the extra coordinate small: a coordinate of the discount's full size
    (≈ 1.3 against vectors of length ≈ 1.2 on Flickr8k) cost HNSW and IVF-PQ recall."""
    return np.concatenate([vectors, -(discount.numpy()[:, None] - offset)], axis=1).astype(np.float32)


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _swap(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp`` with two renames (the old folder is deleted afterwards)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def build_gallery(run_dir: str | os.PathLike, out: str | os.PathLike, images: str | os.PathLike | None = None, *,
                  dataset: str | None = None, root: str | os.PathLike | None = None, split: str = "test",
                  add: bool = False, overwrite: bool = False, backend: str = "faiss", uri: str | None = None,
                  kind: str = "auto", device: str = "cpu", batch_size: int = 16,
                  cache_dir: str | os.PathLike | None = None, progress: bool = True,
                  querybank: bool | None = None) -> BuildReport:
    """Index ``images`` (a folder) or a dataset split (``dataset``, ``root``, ``split``) with the run's model.

    ``add``: append to the existing gallery at ``out`` (images it already holds are left out); ``overwrite``:
    replace it. A gallery already at ``out`` with neither is refused, so a forgotten ``--add`` loses nothing.
    ``cache_dir`` (default ``<out>.cache``) keeps extracted region features, so a rebuild or a resumed build is fast.
    ``querybank``: store the run's query-bank discount with every vector (:mod:`selfalign.evaluate.querybank`);
    None: when the run has a bank (``selfalign querybank RUN``).
    """
    import torch

    from selfalign.evaluate.runner import encode_captions
    from selfalign.model.checkpoint import embedding_config, load_model
    from selfalign.train.trainer import resolve_device

    started = time.perf_counter()
    if (images is None) == (dataset is None):
        raise InputError("index needs either an image folder or a dataset split (--dataset, --root, --split)")
    if dataset is not None and root is None:
        raise InputError("--dataset needs --root (the dataset folder)")
    if add and overwrite:
        raise InputError("give --add (extend the gallery) or --overwrite (replace it), not both")
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    run_dir, out = Path(run_dir).resolve(), Path(out).resolve()
    cfg = embedding_config(run_dir)
    if cfg.model.similarity != "dot":  # a SCAN run's pairs need cross-attention: no embedding to index
        raise InputError(f"{run_dir / 'config.json'}: model.similarity={cfg.model.similarity} scores each pair by "
                         f"cross-attention, which a vector index cannot search; index a dual-encoder run")
    old_manifest: dict[str, Any] | None = None
    has_gallery = (out / MANIFEST).is_file()
    if add:
        old_manifest = read_manifest(out)
        if old_manifest["model_hash"] != model_hash(run_dir):
            raise InputError(f"{out / MANIFEST}: built with another model than {run_dir}; --add needs the same run")
        backend = old_manifest["backend"]
    elif out.exists() and not has_gallery and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not a gallery; refusing to overwrite it")
    elif has_gallery and not overwrite:
        raise InputError(f"{out}: already holds a gallery of {read_manifest(out)['images']} image(s); pass --add to "
                         f"add these images to it, or --overwrite to replace it")
    replaced = _milvus_collections(out) if not add and has_gallery else []
    bank, bank_sha = _gallery_querybank(run_dir, out, querybank, old_manifest)
    dev = resolve_device(device)
    model, _ = load_model(run_dir, dev)
    plan = RegionPlan.from_dict(old_manifest["query_regions"], str(out / MANIFEST)) if add else plan_regions(cfg)

    old_images = read_jsonl(out / IMAGES, ("id", "image_id", "path", "boxes")) if add else []
    old_captions = read_jsonl(out / CAPTIONS, ("id", "image", "text")) if add and old_manifest["captions"] else []
    known = {r["path"] for r in old_images}
    cache = Path(cache_dir) if cache_dir else out.with_name(out.name + ".cache")
    extractor: list[RegionExtractor] = []

    def get_extractor() -> RegionExtractor:
        if not extractor:
            extractor.append(RegionExtractor(plan, dev))
        return extractor[0]

    if images is not None:
        new = folder_source(Path(images), known, plan, get_extractor, cache, batch_size, progress)
        if plan.warning:
            new.warnings.append(plan.warning)
        source = {"kind": "folder", "path": str(Path(images).resolve())}
    else:
        new = dataset_source(cfg, dataset, Path(root), split, known, plan, cache, str(dev), batch_size, progress)
        source = {"kind": "dataset", "dataset": dataset, "path": str(Path(root).resolve()), "split": split}
    for warning in dict.fromkeys(new.warnings):
        print(f"warning: {warning}", file=sys.stderr)
    report = BuildReport(out, len(new.paths), len(old_images) + len(new.paths),
                         len(old_captions) + 5 * len(new.paths) * (new.captions is not None), new.skipped,
                         new.already, list(dict.fromkeys(new.warnings)))
    if not new.paths:
        if add:
            report.seconds = time.perf_counter() - started
            return report
        first = f" (first: {new.skipped[0][0]}: {new.skipped[0][1]})" if new.skipped else ""
        raise InputError(f"no readable images to index{first}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the gallery private to its builder
    try:
        old_regions = np.load(out / REGIONS, mmap_mode="r") if add else None
        boxes, counts = _write_regions(tmp / REGIONS, old_regions, new, cfg.model.image_dim)
        embeddings = _encode_new(model, tmp / REGIONS, len(old_images), counts, new)
        next_id = int(old_manifest.get("next_id", len(old_images))) if add else 0
        # a gallery keeps the offsets it was built with; the first discounted images (captions) fix them
        recorded = (old_manifest or {}).get("querybank") or {}
        offsets = {key: recorded.get(key) for key in ("image_offset", "caption_offset")}
        if bank is not None and bank.beta_images is not None:
            discount = bank.image_discount(torch.from_numpy(embeddings))
            if offsets["image_offset"] is None:
                offsets["image_offset"] = float(discount.mean())
            embeddings = _discounted(embeddings, discount, offsets["image_offset"])
        _, start = _append_vectors(out / IMAGE_VECTORS if add else None, backend, kind, uri, "images", embeddings,
                                   next_id, tmp / IMAGE_VECTORS)
        new_rows = [{"id": start + i, "image_id": image_id, "path": path, "boxes": b}
                    for i, (image_id, path, b) in enumerate(zip(new.image_ids, new.paths, boxes))]
        write_text(tmp / IMAGES, _jsonl(old_images + new_rows))
        captions = list(old_captions)
        next_caption = int(old_manifest.get("next_caption_id", len(old_captions))) if add else 0
        if new.captions is not None:
            texts = [c for caps in new.captions for c in caps]
            vectors = encode_captions(model, texts)
            if bank is None or bank.beta_captions is None:
                vectors = vectors.numpy()
            else:
                discount = bank.caption_discount(vectors)
                if offsets["caption_offset"] is None:
                    offsets["caption_offset"] = float(discount.mean())
                vectors = _discounted(vectors.numpy(), discount, offsets["caption_offset"])
            had = add and bool(old_manifest["captions"])
            _, cstart = _append_vectors(out / CAPTION_VECTORS if had else None, backend, kind, uri, "captions",
                                        vectors, next_caption, tmp / CAPTION_VECTORS)
            captions += [{"id": cstart + j, "image": start + j // 5, "text": t} for j, t in enumerate(texts)]
            next_caption = cstart + len(texts)
            write_text(tmp / CAPTIONS, _jsonl(captions))
        elif captions:
            shutil.copytree(out / CAPTION_VECTORS, tmp / CAPTION_VECTORS)
            write_text(tmp / CAPTIONS, _jsonl(captions))
        now = _now()
        write_json(tmp / MANIFEST, {
            "format": FORMAT, "version": FORMAT_VERSION, "run_dir": str(run_dir), "model_hash": model_hash(run_dir),
            "backend": backend, "embedding_dim": int(model.embedding_dim), "images": len(old_images) + len(new_rows),
            "querybank": None if bank is None else {**bank.describe(), "sha256": bank_sha, **offsets},
            "captions": len(captions), "next_id": start + len(new_rows), "next_caption_id": next_caption,
            "image_root": old_manifest.get("image_root") if add else source["path"],
            "query_regions": plan.to_dict(), "created": old_manifest.get("created") if add else now, "updated": now,
            "sources": (old_manifest.get("sources", []) if add else []) + [
                {**source, "added": len(new_rows), "skipped": len(new.skipped), "at": now}],
        })
        _swap(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _drop_milvus(replaced)  # a rebuilt gallery's old collections, once nothing points at them
    report.seconds = time.perf_counter() - started
    return report


def _milvus_collections(directory: Path) -> list[dict[str, Any]]:
    """The index manifests (uri, collection, ...) of a gallery's Milvus-backed indexes."""
    from selfalign.index.base import read_manifest as read_index_manifest

    found = []
    for sub in (IMAGE_VECTORS, CAPTION_VECTORS):
        if (directory / sub / "index.json").is_file():
            manifest = read_index_manifest(directory / sub)
            if manifest["backend"] == "milvus":
                found.append(manifest)
    return found


def _drop_milvus(manifests: list[dict[str, Any]]) -> None:
    """Drop the collections of a replaced Milvus gallery (a failed cleanup warns; the new gallery stands)."""
    for m in manifests:
        try:
            from selfalign.index.milvus_index import MilvusIndex

            with MilvusIndex(m["dim"], m["uri"], m["collection"], m["kind"], create=False) as index:
                index.drop()
        except Exception as exc:  # noqa: BLE001 - pymilvus raises many types
            print(f"warning: could not drop the old Milvus collection {m.get('collection')}: {exc}", file=sys.stderr)


def build_demo_index(run_dir: str | os.PathLike, data_root: str | os.PathLike, out: str | os.PathLike,
                     split: str = "test", device: str = "auto") -> str:
    """The demo's last step: index the scenes ``split`` (with its captions) and return the ``selfalign serve`` command.

    The run's feature store already holds the split, so nothing is extracted again.
    """
    report = build_gallery(run_dir, out, dataset="scenes", root=data_root, split=split, device=device,
                           overwrite=True, progress=False)  # the demo's own gallery: a rerun rebuilds it
    return f"selfalign serve {report.index_dir}"
