"""The feature store: region features + captions on disk in the SCAN / VSE∞ "precomp" layout.

```
FEAT/{split}_ims.npy        [N, R, D] (float16 here; float32 in SCAN / VSE∞ releases), region 0 = whole image
FEAT/{split}_caps.txt       5N lines; caption j belongs to image j // 5
FEAT/{split}_ids.txt        N image ids (SCAN releases: sometimes one per caption; absent: "0".."N-1")
FEAT/{split}_boxes.npy      optional [N, R, 4] float32 x1,y1,x2,y2 normalised to [0, 1]
FEAT/{split}_nregions.npy   optional [N] int32 valid regions per image (the rest is zero padding)
FEAT/meta.json              extraction settings
FEAT/{split}_mirror_*       optional: the same split with every image mirrored left-right (``--mirror``), for
                            flip augmentation in training and test-time averaging (``data.mirror_train/test``)
```
Every file is written atomically; readers memory-map the features so a store larger than RAM still trains.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfalign.atomic import save_npy, write_json, write_text
from selfalign.data.captions import read_json, read_lines
from selfalign.errors import InputError

CAPTIONS_PER_IMAGE = 5


def split_files(feat_dir: str | os.PathLike, split: str) -> dict[str, Path]:
    """The paths of one split's files (ims, caps, ids, boxes, nregions)."""
    root = Path(feat_dir)
    names = {"ims": "ims.npy", "caps": "caps.txt", "ids": "ids.txt", "boxes": "boxes.npy", "nregions": "nregions.npy"}
    return {key: root / f"{split}_{name}" for key, name in names.items()}


@dataclass
class FeatureSplit:
    """One split of the store. ``images [N, R, D]`` (memory-mapped), ``captions`` 5N, ``image_ids`` N."""

    images: np.ndarray
    captions: list[str]
    image_ids: list[str]
    boxes: np.ndarray | None = None  # [N, R, 4] normalised x1,y1,x2,y2
    n_regions: np.ndarray | None = None  # [N] int; None: all R regions are valid

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def max_regions(self) -> int:
        return int(self.images.shape[1])

    @property
    def feature_dim(self) -> int:
        return int(self.images.shape[2])

    def region_mask(self) -> np.ndarray:
        """``[N, R]`` bool, True for real regions (False for zero padding)."""
        n, r = self.images.shape[:2]
        if self.n_regions is None:
            return np.ones((n, r), dtype=bool)
        return np.arange(r)[None, :] < np.asarray(self.n_regions)[:, None]


def _check_caption(caption: str, index: int) -> None:
    if not caption.strip():
        raise InputError(f"caption {index} (image {index // CAPTIONS_PER_IMAGE}) is empty")
    if "\n" in caption or "\r" in caption:
        raise InputError(f"caption {index} (image {index // CAPTIONS_PER_IMAGE}) contains a line break")


def write_feature_split(
    out_dir: str | os.PathLike,
    split: str,
    images: np.ndarray,
    captions: list[str],
    image_ids: list[str],
    boxes: np.ndarray | None = None,
    n_regions: np.ndarray | None = None,
) -> None:
    """Write one split: ``images [N, R, D]`` float16, 5N captions, N ids, optional ``boxes [N, R, 4]``, ``n_regions [N]``.

    Optional files of an older write that this one lacks are removed, so the split never mixes two extractions.
    """
    if images.ndim != 3:
        raise InputError(f"split '{split}': features must be [N, R, D], got shape {images.shape}")
    n, r, _ = images.shape
    if len(captions) != CAPTIONS_PER_IMAGE * n:
        raise InputError(f"split '{split}': {len(captions)} captions for {n} images (expected {CAPTIONS_PER_IMAGE * n})")
    if len(image_ids) != n:
        raise InputError(f"split '{split}': {len(image_ids)} image ids for {n} images")
    for i, caption in enumerate(captions):
        _check_caption(caption, i)
    for i, image_id in enumerate(image_ids):
        if not str(image_id).strip() or "\n" in str(image_id):
            raise InputError(f"split '{split}': image id {i} ({image_id!r}) is empty or contains a line break")
    if boxes is not None and boxes.shape != (n, r, 4):
        raise InputError(f"split '{split}': boxes have shape {boxes.shape}, expected {(n, r, 4)}")
    if n_regions is not None:
        n_regions = np.asarray(n_regions)
        if n_regions.shape != (n,) or (n and (n_regions.min() < 1 or n_regions.max() > r)):
            raise InputError(f"split '{split}': n_regions must be [N] = [{n}] with values in 1..{r}")

    files = split_files(out_dir, split)
    write_text(files["caps"], "".join(c + "\n" for c in captions))
    write_text(files["ids"], "".join(f"{i}\n" for i in image_ids))
    for key, value, dtype in (("boxes", boxes, np.float32), ("nregions", n_regions, np.int32)):
        if value is None:
            files[key].unlink(missing_ok=True)
        else:
            save_npy(files[key], np.ascontiguousarray(value, dtype=dtype))
    save_npy(files["ims"], np.ascontiguousarray(images, dtype=np.float16))


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"missing feature file: {path}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, EOFError, OSError, SyntaxError) as exc:
        # a truncated file (cut mid-write or mid-copy) fails in numpy's header parser or memmap size check
        raise InputError(f"{path}: not a readable .npy file, perhaps truncated ({exc})") from exc


def _read_captions(path: Path, n_images: int, ims_path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(f"missing caption file: {path}")
    lines = read_lines(path)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise InputError(f"{path}, line {number}: empty caption")
    expected = CAPTIONS_PER_IMAGE * n_images
    if len(lines) != expected:
        raise InputError(
            f"{path}: {len(lines)} captions for {n_images} images in {ims_path.name} "
            f"(expected {CAPTIONS_PER_IMAGE} per image = {expected})"
        )
    return [line.strip() for line in lines]


def _read_ids(path: Path, n_images: int) -> list[str]:
    if not path.exists():
        return [str(i) for i in range(n_images)]
    ids = [line.strip() for line in read_lines(path)]
    if len(ids) == CAPTIONS_PER_IMAGE * n_images and n_images:
        ids = ids[::CAPTIONS_PER_IMAGE]  # some SCAN releases list the image id once per caption
    if len(ids) != n_images:
        raise InputError(f"{path}: {len(ids)} ids for {n_images} images (expected {n_images} lines)")
    for number, image_id in enumerate(ids, start=1):
        if not image_id:
            raise InputError(f"{path}, line {number}: empty image id")
    return ids


def load_feature_split(feat_dir: str | os.PathLike, split: str, mmap: bool = True) -> FeatureSplit:
    """Read and validate one split of a store (ours, SCAN's or VSE∞'s); features are memory-mapped by default."""
    root = Path(feat_dir)
    if not root.is_dir():
        raise InputError(f"feature folder not found: {root}")
    files = split_files(root, split)
    images = _load_npy(files["ims"], mmap)
    if images.ndim == 2:  # one global vector per image (VSE++-style): a single region
        images = images[:, None, :]
    if images.ndim != 3 or not np.issubdtype(images.dtype, np.floating):
        raise InputError(f"{files['ims']}: expected float features [N, R, D], got {images.dtype} {images.shape}")
    n, r, _ = images.shape
    captions = _read_captions(files["caps"], n, files["ims"])
    image_ids = _read_ids(files["ids"], n)

    boxes = None
    if files["boxes"].exists():
        boxes = _load_npy(files["boxes"], mmap)
        if boxes.shape != (n, r, 4):
            raise InputError(f"{files['boxes']}: shape {boxes.shape}, expected {(n, r, 4)} to match {files['ims'].name}")
    n_regions = None
    if files["nregions"].exists():
        n_regions = np.asarray(_load_npy(files["nregions"], mmap=False))
        if n_regions.shape != (n,) or not np.issubdtype(n_regions.dtype, np.integer):
            raise InputError(f"{files['nregions']}: expected [{n}] integers, got {n_regions.dtype} {n_regions.shape}")
        bad = np.flatnonzero((n_regions < 1) | (n_regions > r))
        if bad.size:
            i = int(bad[0])
            raise InputError(f"{files['nregions']}: image {i} has {int(n_regions[i])} regions (must be 1..{r})")
        n_regions = n_regions.astype(np.int64)
    return FeatureSplit(images=images, captions=captions, image_ids=image_ids, boxes=boxes, n_regions=n_regions)


def mirror_split_name(split: str) -> str:
    """The store's name for ``split`` with every image mirrored left-right."""
    return f"{split}_mirror"


def load_mirror_split(feat_dir: str | os.PathLike, split: str, original: FeatureSplit) -> FeatureSplit:
    """The mirrored copy of ``split``, checked to hold the same images and captions as ``original`` in its order."""
    name = mirror_split_name(split)
    if not split_files(feat_dir, name)["ims"].exists():
        raise InputError(f"{feat_dir}: no mirrored copy of split '{split}' ({name}_ims.npy); create it with "
                         f"`selfalign extract ... --splits {split} --mirror`, or score one view per image "
                         f"(`selfalign evaluate --one-view`), or turn data.mirror_train/test off")
    mirrored = load_feature_split(feat_dir, name)
    if mirrored.image_ids != original.image_ids or mirrored.captions != original.captions:
        raise InputError(f"{feat_dir}: split '{name}' does not hold the images and captions of '{split}' in the "
                         f"same order; extract it again with --mirror")
    if mirrored.feature_dim != original.feature_dim:
        raise InputError(f"{feat_dir}: split '{name}' has {mirrored.feature_dim}-d features, '{split}' "
                         f"{original.feature_dim}-d")
    return mirrored


def load_split_views(feat_dir: str | os.PathLike, split: str, mirror: bool) -> tuple[FeatureSplit, FeatureSplit | None]:
    """A split of the store, and its checked mirrored copy when ``mirror`` (else None)."""
    features = load_feature_split(feat_dir, split)
    return features, load_mirror_split(feat_dir, split, features) if mirror else None


def check_finite(split: FeatureSplit, chunk: int = 1024) -> None:
    """Scan features (and boxes) chunk by chunk, never all in memory; error names the first bad image."""
    for name, array in (("features", split.images), ("boxes", split.boxes)):
        if array is None:
            continue
        for start in range(0, array.shape[0], chunk):
            finite = np.isfinite(np.asarray(array[start : start + chunk])).reshape(min(chunk, array.shape[0] - start), -1)
            bad = np.flatnonzero(~finite.all(axis=1))
            if bad.size:
                i = start + int(bad[0])
                raise InputError(f"{name} of image {i} (id {split.image_ids[i]}) contain NaN or infinite values")


def read_meta(feat_dir: str | os.PathLike) -> dict:
    """``FEAT/meta.json`` as a dict; empty when absent (e.g. a SCAN release)."""
    path = Path(feat_dir) / "meta.json"
    if not path.exists():
        return {}
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise InputError(f"{path}: expected a JSON object")
    return meta


def write_meta(feat_dir: str | os.PathLike, meta: dict) -> None:
    """Write ``FEAT/meta.json`` atomically."""
    write_json(Path(feat_dir) / "meta.json", meta)
