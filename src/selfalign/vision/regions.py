"""Images -> region features in memory: the whole image, feature-map cells, or boxes pooled with RoIAlign.

Region 0 of every image is the whole image (mean of the feature map). The other regions are, per ``regions``:
``grid`` every cell of the final feature map; ``boxes`` given boxes (a dataset's ground truth); ``detector``
YOLOX-Nano boxes. Boxes are stored normalised to [0, 1]; images are padded with zero regions to the largest count.

``tail`` is for a model that fine-tunes the backbone's top (``model.image_backbone_tail``): every cell of the
192-d map entering that top (:func:`selfalign.vision.backbone.stem_map`), no whole-image region — the model
computes the final cells and the whole image itself.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from selfalign.errors import ConfigError, InputError
from selfalign.vision.backbone import FEATURE_DIM, check_image_size, feature_map, preprocess, stem_map, to_rgb
from selfalign.vision.detector import Detector
from selfalign.vision.roi_align import pool_regions

REGION_KINDS = ("grid", "boxes", "detector", "tail")
ROI_OUTPUT = (2, 2)
ROI_SAMPLING = 2


MAX_IMAGE_PIXELS = 178_956_970  # PIL's default hard limit; an RGB image this size decodes to about 0.5 GB


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image (so truncation shows here), as RGB with EXIF rotation applied.

    An image above ``MAX_IMAGE_PIXELS`` (e.g. 20,000 x 20,000) is refused from its header, before any decoding: a
    decompression-bomb guard that keeps memory bounded. It is an InputError, so ``skip_bad`` skips and counts it.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InputError(f"{path}: {width}x{height} pixels is above the limit of {MAX_IMAGE_PIXELS:,} "
                                 f"(decompression-bomb guard); downscale the image first")
            image.load()
            return to_rgb(image)
    except FileNotFoundError:
        raise InputError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as exc:  # PIL's own guard, if its limit was set lower than ours
        raise InputError(f"{path}: too large to decode safely ({exc}); downscale the image first") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: cannot read image, corrupt or truncated ({exc})") from exc


def _grid_boxes(cells: int) -> np.ndarray:
    """Normalised boxes ``[G*G, 4]`` of the feature-map cells, row by row."""
    edges = np.arange(cells + 1, dtype=np.float32) / cells
    rows, cols = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    return np.stack([edges[cols], edges[rows], edges[cols + 1], edges[rows + 1]], axis=1)


def mirror_image(image: Image.Image, boxes: np.ndarray | None) -> tuple[Image.Image, np.ndarray | None]:
    """The image mirrored left-right, and its pixel boxes ``[n, 4]`` (x1,y1,x2,y2) mirrored with it."""
    if boxes is not None:
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        boxes = np.stack([image.width - boxes[:, 2], boxes[:, 1], image.width - boxes[:, 0], boxes[:, 3]], axis=1)
    return ImageOps.mirror(image), boxes


def _normalised(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel boxes ``[n, 4]`` (any corner order, maybe outside) -> clipped, normalised x1,y1,x2,y2."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    boxes = boxes[np.isfinite(boxes).all(axis=1)]
    xs = np.sort(boxes[:, [0, 2]], axis=1) / width
    ys = np.sort(boxes[:, [1, 3]], axis=1) / height
    return np.clip(np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1), 0.0, 1.0)


def batch_regions(
    backbone: torch.nn.Module,
    images: list[Image.Image],
    regions: str,
    image_size: int,
    device: torch.device,
    detector: Detector | None,
    pixel_boxes: list[np.ndarray] | None,
    max_regions: int | None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """RGB images -> per image (features ``[n_i, D]`` float32, normalised boxes ``[n_i, 4]``), region 0 = whole
    (but for ``tail``: the cells of the map entering the backbone's top, ``D`` = 192)."""
    pixels = preprocess(images, image_size).to(device)
    if regions == "tail":
        cells = stem_map(backbone, pixels).float()  # [B, 192, G, G]
        boxes = _grid_boxes(cells.shape[-1])
        feats = cells.flatten(2).transpose(1, 2).cpu().numpy()
        return [(feats[i], boxes) for i in range(len(images))]
    fmap = feature_map(backbone, pixels).float()  # [B, D, G, G]
    whole = fmap.mean(dim=(2, 3))
    cells = fmap.shape[-1]
    limit = max_regions or sys.maxsize
    full = np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32)
    if regions == "grid":
        grid = fmap.flatten(2).transpose(1, 2)  # [B, G*G, D]
        boxes = np.concatenate([full, _grid_boxes(cells)])[:limit]
        feats = torch.cat([whole[:, None], grid], dim=1)[:, :limit].cpu().numpy()
        return [(feats[i], boxes) for i in range(len(images))]

    per_image = []
    for i, image in enumerate(images):
        found = detector.detect(image)[0] if regions == "detector" else pixel_boxes[i]
        per_image.append(_normalised(found, *image.size)[: limit - 1])
    counts = [len(b) for b in per_image]
    pooled = torch.zeros(0, fmap.shape[1], device=device)
    if sum(counts):
        scaled = torch.from_numpy(np.concatenate(per_image) * image_size).to(device)
        index = torch.repeat_interleave(torch.arange(len(images), device=device), torch.tensor(counts, device=device))
        pooled = pool_regions(fmap, scaled, index, cells / image_size, ROI_OUTPUT, ROI_SAMPLING, aligned=True)
    parts = torch.split(pooled, counts)
    return [
        (torch.cat([whole[i : i + 1], parts[i]]).cpu().numpy(), np.concatenate([full, per_image[i]]))
        for i in range(len(images))
    ]


def pad_regions(results: list[tuple[np.ndarray, np.ndarray]],
                width: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image regions -> (features ``[B, R, D]`` float16, n_regions ``[B]`` int32, boxes ``[B, R, 4]``); R is
    ``width``, by default the most regions of any image (at least 1)."""
    width = max((len(f) for f, _ in results), default=1) if width is None else width
    dim = results[0][0].shape[1] if results else FEATURE_DIM
    feats = np.zeros((len(results), width, dim), dtype=np.float16)
    boxes = np.zeros((len(results), width, 4), dtype=np.float32)
    counts = np.zeros(len(results), dtype=np.int32)
    for i, (f, b) in enumerate(results):
        feats[i, : len(f)], boxes[i, : len(b)], counts[i] = f, b, len(f)
    return feats, counts, boxes


def check_settings(regions: str, image_size: int, detector: Detector | None, max_regions: int | None) -> None:
    """Reject a region kind, image size, detector or region limit that cannot work, naming the config key."""
    if regions not in REGION_KINDS:
        raise ConfigError(f"data.regions must be one of {list(REGION_KINDS)}, got {regions!r}")
    check_image_size(image_size)
    if regions == "detector" and detector is None:
        raise ConfigError("regions=detector needs a detector (config data.detector_path)")
    if regions == "tail" and max_regions is not None:
        raise ConfigError("regions=tail keeps every cell of the map (the model runs convolutions over it); "
                          f"max_regions must be unset, got {max_regions}")
    if max_regions is not None and max_regions < 1:
        raise ConfigError(f"max_regions must be at least 1 (the whole image), got {max_regions}")


def extract_images(
    paths: Sequence[str | os.PathLike | Image.Image],
    backbone: torch.nn.Module,
    regions: str,
    image_size: int = 224,
    device: str | torch.device = "cpu",
    detector: Detector | None = None,
    boxes: list[np.ndarray] | None = None,
    max_regions: int | None = None,
    batch_size: int = 8,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (paths or PIL) -> (features ``[B, R, D]`` float16, n_regions ``[B]``, boxes ``[B, R, 4]``), no store.

    The features are rounded to float16 exactly as in the store, so a query image is encoded like a gallery image.
    ``boxes`` (pixel x1,y1,x2,y2 per image) is needed for ``regions="boxes"``.
    """
    check_settings(regions, image_size, detector, max_regions)
    if regions == "boxes" and (boxes is None or len(boxes) != len(paths)):
        raise InputError("regions=boxes needs one [n, 4] box array per image")
    images = [to_rgb(p) if isinstance(p, Image.Image) else load_image(p) for p in paths]
    results: list[tuple[np.ndarray, np.ndarray]] = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            part = boxes[start : start + batch_size] if boxes is not None else None
            results += batch_regions(
                backbone, images[start : start + batch_size], regions, image_size, torch.device(device),
                detector, part, max_regions,
            )  # fmt: skip
    return pad_regions(results)


