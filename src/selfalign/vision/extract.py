"""Images -> region features -> feature store: batched, cached and resumable.

Extraction works in chunks saved atomically under ``OUT/.partial/{split}/``: an interrupted run resumes at the first
missing chunk, and a run whose outputs already match the requested settings and inputs does nothing. The region
layouts themselves are computed by :mod:`selfalign.vision.regions`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from selfalign.atomic import atomic_path, write_json
from selfalign.data.captions import CaptionedSplit
from selfalign.data.precomp import read_meta, split_files, write_feature_split, write_meta
from selfalign.errors import InputError
from selfalign.vision.backbone import BACKBONE_NAME, FEATURE_DIM, INPUT_SCALING, TAIL_IN_DIM, load_backbone
from selfalign.vision.detector import Detector
from selfalign.vision.regions import (
    REGION_KINDS, ROI_OUTPUT, ROI_SAMPLING, batch_regions, check_settings, extract_images, load_image, mirror_image,
    pad_regions,
)  # fmt: skip

__all__ = ["REGION_KINDS", "extract_images", "extract_split", "load_image"]


def _fingerprint(split: CaptionedSplit, regions: str, mirror: bool = False) -> str:
    """A hash of the split's inputs: ids, captions, file names, sizes and times, boxes if they are the regions, and
    whether the images are mirrored.

    File names rather than full paths, so that moving the dataset folder keeps the cache; sizes and modification
    times, so that regenerating images under the same names does not.
    """
    digest = hashlib.sha1(b"mirrored\n" if mirror else b"")
    for image_id, path in zip(split.image_ids, split.image_paths):
        try:
            stat = os.stat(path)
            digest.update(f"{image_id}\t{Path(path).name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        except OSError:  # missing: skipped (skip_bad) or an error later, with the file named
            digest.update(f"{image_id}\t{Path(path).name}\t-\n".encode())
    digest.update("\n".join(split.flat_captions()).encode())
    if regions == "boxes":
        for b in split.boxes:
            digest.update(np.ascontiguousarray(b, dtype=np.float32).tobytes() + b"|")
    return digest.hexdigest()


def _read_chunk(path: Path, size: int) -> dict | None:
    """A finished chunk of ``size`` images, or None when absent or unreadable (then it is recomputed)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            chunk = {key: data[key] for key in ("feats", "n_regions", "boxes", "ok")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return chunk if len(chunk["ok"]) == size == len(chunk["feats"]) else None


def _read_job(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _compute_chunk(
    split: CaptionedSplit,
    indices: range,
    settings: dict,
    backbone: torch.nn.Module,
    device: torch.device,
    detector: Detector | None,
    batch_size: int,
    skip_bad: bool,
    bar: tqdm,
    mirror: bool = False,
) -> dict:
    """Features of the images ``indices`` (a chunk), mirrored left-right if ``mirror``; unreadable images get a zero
    row and ``ok=False``."""
    placeholder = (np.zeros((1, settings["feature_dim"]), np.float32), np.zeros((1, 4), np.float32))
    results = [placeholder] * len(indices)
    ok = np.ones(len(indices), dtype=bool)
    for start in range(0, len(indices), batch_size):
        slots, images, pixel_boxes = [], [], []
        for k in range(start, min(start + batch_size, len(indices))):
            i = indices[k]
            try:
                image = load_image(split.image_paths[i])
            except InputError:
                if not skip_bad:
                    raise
                ok[k] = False
                continue
            boxes = split.boxes[i] if settings["regions"] == "boxes" else None
            if mirror:
                image, boxes = mirror_image(image, boxes)
            slots.append(k)
            images.append(image)
            pixel_boxes.append(boxes)
        if images:
            out = batch_regions(
                backbone, images, settings["regions"], settings["image_size"], device, detector, pixel_boxes,
                settings["max_regions"],
            )  # fmt: skip
            for k, result in zip(slots, out):
                results[k] = result
        bar.update(min(batch_size, len(indices) - start))
    feats, n_regions, boxes = pad_regions(results)
    return {"feats": feats, "n_regions": n_regions, "boxes": boxes, "ok": ok}


def _assemble(split: CaptionedSplit, out_dir: Path, name: str, paths: list[Path], partial: Path) -> tuple[int, list]:
    """Write the final split files from the chunk files, one chunk in memory at a time (features via a memory map)."""
    ok, n_regions = [], []
    for path in paths:
        with np.load(path, allow_pickle=False) as data:
            ok.append(data["ok"])
            n_regions.append(data["n_regions"])
            dim = data["feats"].shape[2]
    ok_all = np.concatenate(ok)
    keep = np.flatnonzero(ok_all)
    skipped = [str(split.image_paths[i]) for i in np.flatnonzero(~ok_all)]
    if not len(keep):
        raise InputError(f"split '{name}': none of the {len(ok_all)} images could be read (first: {skipped[0]})")
    width = max(int(n[o].max()) for n, o in zip(n_regions, ok) if o.any())
    feats = np.lib.format.open_memmap(partial / "assembled_ims.npy", mode="w+", dtype=np.float16,
                                      shape=(len(keep), width, dim))  # fmt: skip
    boxes = np.zeros((len(keep), width, 4), dtype=np.float32)
    row = 0
    for path, good in zip(paths, ok):
        with np.load(path, allow_pickle=False) as data:
            n, r = int(good.sum()), min(width, data["feats"].shape[1])
            feats[row : row + n, :r] = data["feats"][good][:, :r]
            boxes[row : row + n, :r] = data["boxes"][good][:, :r]
        row += n
    feats.flush()
    captions = [c for i in keep for c in split.captions[i]]
    ids = [split.image_ids[i] for i in keep]
    write_feature_split(out_dir, name, feats, captions, ids, boxes, np.concatenate(n_regions)[keep])
    del feats
    return width, skipped


def extract_split(
    split: CaptionedSplit,
    out_dir: str | os.PathLike,
    split_name: str,
    regions: str,
    device: str | torch.device = "cpu",
    image_size: int = 224,
    batch_size: int = 8,
    detector: Detector | None = None,
    max_regions: int | None = None,
    progress: bool = True,
    *,
    chunk_size: int = 256,
    skip_bad: bool = False,
    backbone: torch.nn.Module | None = None,
    on_chunk: Callable[[int], None] | None = None,
    mirror: bool = False,
) -> dict:
    """Extract one split into the store at ``out_dir`` (``{split_name}_ims.npy`` ``[N, R, 1280]`` float16, ...).

    ``mirror``: extract every image mirrored left-right (boxes mirrored with it; the detector runs on the mirrored
    image) — the store's ``{split}_mirror`` copy, see :func:`selfalign.data.precomp.mirror_split_name`.
    Resumes from finished chunks; returns at once when the store already holds this split with these settings.
    ``skip_bad``: leave out unreadable images (and their captions) instead of failing; they are counted in the result.
    ``backbone``: reuse an already loaded network; ``on_chunk(i)`` is called after chunk ``i`` is saved.
    Returns stats: images, skipped, skipped_files, regions, chunks_total/computed, seconds, images_per_s, cached.
    """
    check_settings(regions, image_size, detector, max_regions)
    if regions == "boxes" and split.boxes is None:
        raise InputError(f"split '{split.name}' has no ground-truth boxes (boxes.json); use regions=grid or detector")
    if not split.image_ids:
        raise InputError(f"split '{split.name}' has no images")
    out_dir = Path(out_dir)
    settings = {
        "backbone": BACKBONE_NAME,
        "input_scaling": INPUT_SCALING,
        "feature_dim": TAIL_IN_DIM if regions == "tail" else FEATURE_DIM,
        "regions": regions,
        "image_size": image_size,
        "max_regions": max_regions,
        "roi_align": {"output_size": list(ROI_OUTPUT), "sampling_ratio": ROI_SAMPLING} if regions in ("boxes", "detector") else None,
        "detector": detector.describe() if regions == "detector" else None,
    }
    fingerprint = _fingerprint(split, regions, mirror)
    total = len(split.image_ids)
    meta = read_meta(out_dir)
    entry = meta.get("splits", {}).get(split_name)
    if (
        {k: meta.get(k) for k in settings} == settings
        and entry is not None
        and entry.get("fingerprint") == fingerprint
        and (skip_bad or not entry.get("skipped"))
        and all(split_files(out_dir, split_name)[k].exists() for k in ("ims", "caps", "ids", "boxes", "nregions"))
    ):
        return {**entry, "split": split_name, "chunks_total": 0, "chunks_computed": 0, "seconds": 0.0,
                "images_per_s": 0.0, "cached": True}  # fmt: skip

    partial = out_dir / ".partial" / split_name
    job = {"settings": settings, "fingerprint": fingerprint, "chunk_size": chunk_size, "skip_bad": skip_bad}
    job_file = partial / "job.json"
    if partial.exists() and _read_job(job_file) != job:
        shutil.rmtree(partial)  # chunks of another configuration or dataset: useless here
    write_json(job_file, job)

    device = torch.device(device)
    n_chunks = (total + chunk_size - 1) // chunk_size
    paths = [partial / f"chunk_{c:05d}.npz" for c in range(n_chunks)]
    todo = [c for c in range(n_chunks) if _read_chunk(paths[c], min(chunk_size, total - c * chunk_size)) is None]
    done_images = total - sum(min(chunk_size, total - c * chunk_size) for c in todo)
    started = time.perf_counter()
    if todo and backbone is None:
        backbone = load_backbone(device)
    bar = tqdm(total=total, initial=done_images, disable=not progress, unit="img", desc=f"extract {split_name}")
    with torch.inference_mode(), bar:
        for c in todo:
            indices = range(c * chunk_size, min(total, (c + 1) * chunk_size))
            chunk = _compute_chunk(split, indices, settings, backbone, device, detector, batch_size, skip_bad, bar,
                                   mirror)
            with atomic_path(paths[c]) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, **chunk)
            if on_chunk is not None:
                on_chunk(c)
    seconds = time.perf_counter() - started
    computed = total - done_images

    # meta first loses this split's entry, so a crash while writing leaves it marked unfinished
    if {k: meta.get(k) for k in settings} != settings:
        stale = sorted(set(meta.get("splits", {})) - {split_name})
        if stale:
            print(f"warning: {out_dir}: splits {stale} were extracted with other settings; they are dropped from "
                  "meta.json and must be extracted again", file=sys.stderr)  # fmt: skip
        meta = {**settings, "splits": {}}
    meta.setdefault("splits", {}).pop(split_name, None)
    write_meta(out_dir, meta)
    width, skipped_files = _assemble(split, out_dir, split_name, paths, partial)
    kept = total - len(skipped_files)
    entry = {"images": kept, "captions": 5 * kept, "regions": width, "skipped": len(skipped_files),
             "skipped_files": skipped_files, "fingerprint": fingerprint, "mirrored": mirror}  # fmt: skip
    meta["splits"][split_name] = entry
    write_meta(out_dir, meta)
    shutil.rmtree(partial)
    if not any((out_dir / ".partial").iterdir()):
        (out_dir / ".partial").rmdir()
    rate = computed / seconds if computed and seconds > 0 else 0.0
    if progress:
        print(f"{split_name}: {kept} images, {width} regions, {len(skipped_files)} skipped, "
              f"{computed} computed at {rate:.1f} images/s", file=sys.stderr)  # fmt: skip
    return {
        **entry, "split": split_name, "chunks_total": n_chunks, "chunks_computed": len(todo), "seconds": seconds,
        "images_per_s": rate, "cached": False,
    }  # fmt: skip
