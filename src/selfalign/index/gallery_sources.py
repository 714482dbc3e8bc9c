"""Where a gallery's new images come from: a plain folder (extracted here, cached in chunks) or a prepared dataset
split (the run's feature store when it holds the split, else extracted into the cache).

Each source yields a :class:`NewImages`: ids, absolute paths, optional captions, and the region features as blocks,
so that a large folder never has to sit in memory at once.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from selfalign.atomic import atomic_path
from selfalign.config import RunConfig
from selfalign.errors import InputError
from selfalign.index.gallery_regions import RegionExtractor, RegionPlan

CHUNK = 64  # images per cached extraction chunk
Block = tuple[np.ndarray, np.ndarray, np.ndarray]  # features [b, r, D] f16, n_regions [b], boxes [b, r, 4]
MirrorBlock = tuple[np.ndarray, np.ndarray]  # the mirrored copies' features [b, r', D], n_regions [b]


@dataclass
class NewImages:
    """Images to add: ``image_ids``/``paths`` (N), ``captions`` (N lists of 5, or None), features by ``blocks()``
    and, for a mirroring plan, their mirrored copies' by ``mirror_blocks()`` (same images, same order)."""

    image_ids: list[str]
    paths: list[str]
    captions: list[list[str]] | None
    width: int  # the widest region count among them
    blocks: Callable[[], Iterator[Block]]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    already: int = 0  # images left out because the gallery holds them
    warnings: list[str] = field(default_factory=list)
    mirror_blocks: Callable[[], Iterator[MirrorBlock]] | None = None


# ----------------------------------------------------------------------------------------------------
# Plain folders


def scan_folder(folder: Path) -> list[Path]:
    """Every non-hidden regular file under ``folder`` (or the file itself), sorted, as absolute paths."""
    folder = Path(folder)
    if folder.is_file():
        return [folder.resolve()]
    if not folder.is_dir():
        raise InputError(f"{folder}: no such image folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, name).resolve() for name in filenames if not name.startswith(".")]
    return sorted(found)


def _chunk_key(plan: RegionPlan, files: list[Path]) -> str:
    digest = hashlib.sha1(plan.cache_key().encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


MIRROR_KEYS = ("mirror_feats", "mirror_n_regions")


def _read_chunk(path: Path, size: int, mirror: bool) -> dict | None:
    keys = ("feats", "n_regions", "boxes", "ok", "reasons") + (MIRROR_KEYS if mirror else ())
    try:
        with np.load(path, allow_pickle=False) as data:
            chunk = {key: data[key] for key in keys}
    except (OSError, ValueError, KeyError, EOFError):
        return None
    return chunk if len(chunk["ok"]) == size else None


def _extract_chunk(files: list[Path], extractor: RegionExtractor, batch_size: int) -> dict:
    """Features of ``files`` (and of their mirrored copies for a mirroring plan); unreadable ones get ``ok=False``
    and their reason (decoded per batch, not all at once)."""
    from selfalign.vision.extract import load_image
    from selfalign.vision.regions import pad_regions

    mirror = extractor.plan.mirror
    per_image: list[tuple[np.ndarray, np.ndarray]] = []
    per_mirror: list[tuple[np.ndarray, np.ndarray]] = []
    ok = np.ones(len(files), dtype=bool)
    reasons = [""] * len(files)
    for start in range(0, len(files), batch_size):
        images, slots = [], []
        for i in range(start, min(start + batch_size, len(files))):
            try:
                images.append(load_image(files[i]))
                slots.append(i)
            except InputError as exc:
                ok[i], reasons[i] = False, str(exc)
        if not images:
            continue
        for target, flipped in ((per_image, False), (per_mirror, True))[: 2 if mirror else 1]:
            feats, counts, boxes = extractor.extract(images, batch_size, mirrored=flipped)
            target += [(feats[j, : counts[j]], boxes[j, : counts[j]]) for j in range(len(slots))]
    out_feats, counts, out_boxes = pad_regions(per_image)
    chunk = {"feats": out_feats, "n_regions": counts, "boxes": out_boxes, "ok": ok, "reasons": np.array(reasons)}
    if mirror:
        chunk["mirror_feats"], chunk["mirror_n_regions"], _ = pad_regions(per_mirror)
    return chunk


def folder_source(folder: Path, known: set[str], plan: RegionPlan, extractor: Callable[[], RegionExtractor],
                  cache: Path, batch_size: int = 16, progress: bool = True) -> NewImages:
    """Extract (or reuse cached) regions of every readable image under ``folder`` that ``known`` does not hold."""
    folder = Path(folder)
    files = scan_folder(folder)
    if not files:
        raise InputError(f"{folder}: the folder holds no files")
    fresh = [f for f in files if str(f) not in known]
    base = folder.resolve() if folder.is_dir() else folder.resolve().parent
    cache = cache / "folder"
    cache.mkdir(parents=True, exist_ok=True)
    used: list[tuple[Path, list[Path]]] = []
    skipped: list[tuple[str, str]] = []
    kept_files: list[Path] = []
    width = 1
    for start in range(0, len(fresh), CHUNK):
        part = fresh[start : start + CHUNK]
        path = cache / f"chunk-{_chunk_key(plan, part)}.npz"
        chunk = _read_chunk(path, len(part), plan.mirror)
        if chunk is None:
            chunk = _extract_chunk(part, extractor(), batch_size)
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, **chunk)
        if progress:
            print(f"  regions: {min(start + CHUNK, len(fresh))}/{len(fresh)} images", file=sys.stderr, flush=True)
        for f, good, reason in zip(part, chunk["ok"], chunk["reasons"]):
            if good:
                kept_files.append(f)
            else:
                reason = str(reason)  # the extractor's message starts with the path, which the pair already has
                skipped.append((str(f), reason.removeprefix(f"{f}: ")))
        if len(chunk["n_regions"]):
            width = max(width, int(chunk["n_regions"].max()))
        used.append((path, part))
    for stale in cache.glob("chunk-*.npz"):  # chunks of files that changed or were indexed: no longer useful
        if stale not in {p for p, _ in used}:
            stale.unlink(missing_ok=True)

    def chunk_arrays(keys: tuple[str, ...]) -> Iterator[tuple[np.ndarray, ...]]:
        for path, _ in used:
            with np.load(path, allow_pickle=False) as data:  # an npz reads only the arrays asked for
                if len(data["n_regions"]):
                    yield tuple(data[k] for k in keys)

    ids = [f.relative_to(base).as_posix() if f.is_relative_to(base) else f.name for f in kept_files]
    return NewImages(ids, [str(f) for f in kept_files], None, width,
                     lambda: chunk_arrays(("feats", "n_regions", "boxes")), skipped, len(files) - len(fresh),
                     mirror_blocks=(lambda: chunk_arrays(MIRROR_KEYS)) if plan.mirror else None)


# ----------------------------------------------------------------------------------------------------
# Prepared dataset splits


def load_captioned(dataset: str, root: Path, split: str, karpathy_json: str = ""):
    """A captioned split of a prepared dataset (scenes, flickr, karpathy, folder)."""
    try:
        from selfalign.data.formats import load_dataset
    except ImportError:
        load_dataset = None
    if load_dataset is not None:
        opts = {"karpathy_json": karpathy_json} if dataset == "karpathy" else {}
        return load_dataset(dataset, Path(root), split, **opts)
    if dataset != "scenes":
        raise InputError(f"dataset {dataset!r}: this installation can only read 'scenes' datasets")
    from selfalign.data.scenes import load_scenes

    return load_scenes(Path(root), split)


def _run_store(cfg: RunConfig, root: Path, split: str, ids: set[str]):
    """The run's own feature store for ``split`` when it was extracted from this very dataset, else None."""
    from selfalign.data.precomp import load_feature_split, split_files

    features = Path(cfg.data.features)
    if not split_files(features, split)["ims"].is_file():
        return None
    if Path(cfg.data.root).resolve() != Path(root).resolve():
        return None
    try:
        store = load_feature_split(features, split)
    except InputError:
        return None
    if store.feature_dim != cfg.model.image_dim or not set(store.image_ids) <= ids:
        return None
    return store


def dataset_source(cfg: RunConfig, dataset: str, root: Path, split: str, known: set[str], plan: RegionPlan,
                   cache: Path, device: str, batch_size: int = 16, progress: bool = True) -> NewImages:
    """Images + captions of a dataset split; features from the run's store when it has the split, else extracted.

    A mirroring plan also reads the mirrored copies: the store's ``{split}_mirror`` when it is there, else extracted.
    """
    from selfalign.data.precomp import load_feature_split, load_mirror_split, mirror_split_name, split_files
    from selfalign.vision.extract import extract_split

    captioned = load_captioned(dataset, root, split, cfg.data.karpathy_json)
    index = {image_id: i for i, image_id in enumerate(captioned.image_ids)}
    warnings: list[str] = []
    skipped: list[tuple[str, str]] = []
    store = _run_store(cfg, root, split, set(index))
    store_dir, name = Path(cfg.data.features), split
    if store is None or (plan.mirror and not split_files(store_dir, mirror_split_name(split))["ims"].is_file()):
        regions = plan.trained
        detector = None
        if regions == "boxes" and captioned.boxes is None:
            regions = plan.mode
            warnings.append(plan.warning)
        if regions == "detector":
            from selfalign.vision.detector import Detector

            detector = Detector(plan.detector_path, top_k=plan.detector_top_k)
        store_dir, name = cache / "dataset", f"{dataset}_{split}"
        for target, mirrored in ((name, False), (mirror_split_name(name), True))[: 2 if plan.mirror else 1]:
            stats = extract_split(captioned, store_dir, target, regions, device=device, image_size=plan.image_size,
                                  batch_size=batch_size, detector=detector, max_regions=plan.max_regions,
                                  progress=progress, skip_bad=True, mirror=mirrored)
            if not mirrored:
                skipped = [(path, "cannot read image") for path in stats.get("skipped_files", [])]
        store = load_feature_split(store_dir, name)
    mirror_store = load_mirror_split(store_dir, name, store) if plan.mirror else None
    rows = [r for r, image_id in enumerate(store.image_ids) if str(captioned.image_paths[index[image_id]].resolve())
            not in known]
    n_regions = _counts(store)
    boxes = store.boxes
    width = int(max((n_regions[r] for r in rows), default=1))

    def blocks() -> Iterator[Block]:
        for start in range(0, len(rows), 256):
            sel = rows[start : start + 256]
            feats = np.asarray(store.images[sel, :width], dtype=np.float16)
            if boxes is not None:
                box = np.asarray(boxes[sel, :width], dtype=np.float32)
            else:  # a store without boxes: only region 0 (the whole image) has a known box
                box = np.zeros((len(sel), width, 4), np.float32)
                box[:, 0] = (0.0, 0.0, 1.0, 1.0)
            yield feats, np.asarray(n_regions[sel], dtype=np.int32), box

    def mirror_blocks() -> Iterator[MirrorBlock]:
        counts = _counts(mirror_store)
        for start in range(0, len(rows), 256):
            sel = rows[start : start + 256]
            yield np.asarray(mirror_store.images[sel], dtype=np.float16), np.asarray(counts[sel], dtype=np.int32)

    chosen = [index[store.image_ids[r]] for r in rows]
    paths = [str(captioned.image_paths[i].resolve()) for i in chosen]
    return NewImages([captioned.image_ids[i] for i in chosen], paths, [list(captioned.captions[i]) for i in chosen],
                     width, blocks, skipped, store.num_images - len(rows), warnings,
                     mirror_blocks if mirror_store is not None else None)


def _counts(store) -> np.ndarray:
    """``[N]`` valid regions per image of a FeatureSplit (all of them when it has no counts)."""
    return store.n_regions if store.n_regions is not None else np.full(store.num_images, store.max_regions)
