"""The built-in dataset: procedurally rendered scenes of coloured shapes with 5 true captions each.

``generate_scenes`` writes the Flickr-like layout of docs/ARCHITECTURE.md ("Dataset on disk") and is deterministic
in its seed. Each split is planned from its own random stream, so the test split does not change when the training
split grows. About 45 % of the images come in hard-negative groups (see ``scenes_layout``), kept within one split.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from selfalign import atomic
from selfalign.data.captions import CaptionedSplit, load_token_dataset
from selfalign.data.scenes_grammar import scene_captions
from selfalign.data.scenes_layout import Scene, plan_split
from selfalign.data.scenes_render import object_box, render_to_file
from selfalign.errors import InputError

GENERATOR = "selfalign.scenes"
VERSION = 1
SPLITS = ("train", "dev", "test")


def _params(n_train: int, n_dev: int, n_test: int, seed: int, image_size: int) -> dict:
    return {"n_train": n_train, "n_dev": n_dev, "n_test": n_test, "seed": seed, "image_size": image_size}


def _read_meta(root: Path) -> dict | None:
    try:
        meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("generator") == GENERATOR else None


def _json_lines(table: dict) -> str:
    """A JSON object with one key per line: readable and diff-friendly, unlike one huge line."""
    body = ",\n".join(f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in table.items())
    return "{\n" + body + "\n}\n"


def _build_one(job: tuple) -> list[dict]:
    """Worker entry point: render one scene to PNG and phrase its 5 captions."""
    objects, background, side, path, caption_seed, siblings = job
    render_to_file((objects, background, side, path))
    return scene_captions(random.Random(caption_seed), objects, background, siblings=siblings)


def _build_all(jobs: list[tuple], workers: int, progress: bool) -> list[list[dict]]:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="rendering scenes", unit="img")
    out: list[list[dict]] = []
    if workers <= 1:
        results = map(_build_one, jobs)
        pool = None
    else:
        pool = multiprocessing.get_context("spawn").Pool(workers)
        results = pool.imap(_build_one, jobs, chunksize=16)
    try:
        for caps in results:
            out.append(caps)
            if bar:
                bar.update()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar:
            bar.close()
    return out


def _write_dataset(out: Path, params: dict, workers: int, progress: bool) -> dict:
    side, seed = params["image_size"], params["seed"]
    (out / "images").mkdir(parents=True)
    (out / "splits").mkdir()
    planned: list[tuple[str, str, Scene]] = []  # (split, image id, scene)
    caption_seeds: list[str] = []  # by position within the split, so a split's text ignores the others' sizes
    counts: dict[str, int] = {}
    for split in SPLITS:
        scenes = plan_split(random.Random(f"scenes/{seed}/{split}/layout"), params[f"n_{split}"], split)
        ids = [f"scene_{len(planned) + k:06d}.png" for k in range(len(scenes))]
        planned += [(split, i, s) for i, s in zip(ids, scenes)]
        caption_seeds += [f"scenes/{seed}/{split}/{k}/captions" for k in range(len(scenes))]
        atomic.write_text(out / "splits" / f"{split}.txt", "".join(i + "\n" for i in ids))
        counts[split] = len(ids)
        counts[f"{split}_in_groups"] = sum(s.group is not None for s in scenes)
    groups: dict[str, list[Scene]] = {}
    for _, _, s in planned:
        if s.group is not None:
            groups.setdefault(s.group, []).append(s)
    jobs = [(s.objects, s.background, side, str(out / "images" / image_id), cs,
             [m.objects for m in groups.get(s.group, []) if m is not s] if s.group else [])
            for (_, image_id, s), cs in zip(planned, caption_seeds)]
    all_caps = _build_all(jobs, workers, progress)

    caption_lines: list[str] = []
    boxes: dict[str, list] = {}
    annotations: dict[str, dict] = {}
    for (split, image_id, scene), caps in zip(planned, all_caps):
        caption_lines += [f"{image_id}#{j}\t{c['text']}" for j, c in enumerate(caps)]
        boxes[image_id] = [object_box(o, side) for o in scene.objects]
        annotations[image_id] = {
            "split": split, "group": scene.group, "variant": scene.variant,
            "background": {k: v for k, v in scene.background.items() if k in ("kind", "colors")},
            "objects": [{"shape": o.shape, "color": o.color, "size": o.size, "box": b, "center": [o.cx, o.cy],
                         "radius": o.r} for o, b in zip(scene.objects, boxes[image_id])],
            "captions": caps,
        }
    atomic.write_text(out / "captions.txt", "\n".join(caption_lines) + "\n")
    atomic.write_text(out / "boxes.json", _json_lines(boxes))
    atomic.write_text(out / "annotations.json", _json_lines(annotations))
    counts["images"] = len(planned)
    counts["captions"] = len(caption_lines)
    counts["captions_true_of_a_sibling"] = sum(c.get("shared", False) for caps in all_caps for c in caps)
    return counts


def generate_scenes(
    root: Path,
    n_train: int = 4000,
    n_dev: int = 500,
    n_test: int = 500,
    seed: int = 0,
    image_size: int = 224,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write the scenes dataset under ``root`` (cached: returns at once if ``meta.json`` has the same parameters).

    With other parameters the dataset is regenerated in a temporary folder beside ``root`` and swapped in.
    ``workers`` processes share rendering, PNG encoding and captioning (default: one per CPU, at most 4; one
    for fewer than 400 images). The output does not depend on ``workers``. Returns ``root``.
    """
    root = Path(root)
    params = _params(n_train, n_dev, n_test, seed, image_size)
    for key, value in params.items():
        low = 0 if key == "seed" else 1
        if not isinstance(value, int) or value < low:
            raise InputError(f"generate_scenes: {key} must be an integer >= {low}, got {value!r}")
    if image_size < 32:
        raise InputError(f"generate_scenes: image_size must be at least 32 pixels, got {image_size}")
    meta = _read_meta(root)
    if meta is not None and meta.get("version") == VERSION and meta.get("params") == params:
        return root
    if root.exists() and meta is None and (not root.is_dir() or any(root.iterdir())):
        raise InputError(f"{root}: exists and is not a scenes dataset (no scenes meta.json); refusing to overwrite it")
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if n_train + n_dev + n_test >= 400 else 1
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is meant to be shared like any folder
    try:
        start = time.perf_counter()
        counts = _write_dataset(tmp, params, workers, progress)
        atomic.write_json(tmp / "meta.json", {
            "generator": GENERATOR, "version": VERSION, "params": params, "counts": counts,
            "seconds": round(time.perf_counter() - start, 1),
        })
        if root.exists():
            old = root.with_name(f".{root.name}.old-{os.getpid()}")
            os.rename(root, old)
            os.rename(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def load_scenes(root: Path, split: str) -> CaptionedSplit:
    """One split (train, dev or test) of a generated scenes dataset, with its ground-truth object boxes."""
    root = Path(root)
    split = "dev" if split == "val" else split
    if split not in SPLITS:
        raise InputError(f"scenes: unknown split '{split}' (expected one of {', '.join(SPLITS)})")
    if _read_meta(root) is None:
        raise InputError(f"{root}: not a complete scenes dataset (meta.json missing); generate it first")
    return load_token_dataset(root / "captions.txt", root / "splits" / f"{split}.txt", root / "images",
                              boxes_file=root / "boxes.json", name=split)

