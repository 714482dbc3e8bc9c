"""Which regions a gallery extracts for images the run never saw, and a thread-safe extractor for them.

A run is trained on one kind of region (its feature store's ``meta.json``: grid, boxes or detector). Images that
arrive later — a plain folder, an uploaded query — must get regions of the same kind where possible:

* ``grid``     -> grid cells (any image has them);
* ``tail``     -> the cells of the map entering the backbone's top, which the run fine-tuned;
* ``detector`` -> YOLOX-Nano boxes (``data.detector_path``);
* ``boxes``    -> a new image has no ground-truth boxes: detector boxes if ``data.detector_path`` is configured,
  else the whole image plus grid cells — with a warning, since those regions differ from training.

A run evaluated with ``data.mirror_test`` embeds every image as the mean of its own and its mirrored copy's
embedding; the plan's ``mirror`` makes a gallery (and an image query) do the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from selfalign.config import RunConfig
from selfalign.data.precomp import read_meta
from selfalign.errors import InputError


@dataclass(frozen=True)
class RegionPlan:
    """How to turn a new image into regions: ``mode`` is ``grid``, ``tail`` or ``detector``; ``trained`` is the
    run's kind."""

    mode: str
    trained: str
    image_size: int
    max_regions: int | None = None
    detector_path: str = ""
    detector_top_k: int = 20
    warning: str = ""
    mirror: bool = False  # also embed each image mirrored left-right and average the two (data.mirror_test)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> "RegionPlan":
        try:
            plan = cls(**values)
        except TypeError as exc:
            raise InputError(f"{where}: field 'query_regions' is malformed ({exc})") from None
        if plan.mode not in ("grid", "tail", "detector"):
            raise InputError(f"{where}: query_regions.mode must be 'grid', 'tail' or 'detector', got {plan.mode!r}")
        return plan

    def cache_key(self) -> str:
        """What changes the features of an image (for the extraction cache)."""
        detector = (Path(self.detector_path).name, self.detector_top_k) if self.mode == "detector" else None
        key = (self.mode, self.image_size, self.max_regions, detector) + (("mirror",) if self.mirror else ())
        return repr(key)


def plan_regions(cfg: RunConfig) -> RegionPlan:
    """The region plan for new images of a run (reads the run's feature-store ``meta.json`` when it is there)."""
    meta: dict[str, Any] = {}
    if Path(cfg.data.features).is_dir():
        try:
            meta = read_meta(cfg.data.features)
        except InputError:
            meta = {}
    trained = meta.get("regions") or cfg.data.regions
    size = int(meta.get("image_size") or cfg.data.image_size)
    max_regions = meta.get("max_regions")
    base = {"trained": trained, "image_size": size, "max_regions": max_regions,
            "detector_top_k": cfg.data.detector_top_k, "mirror": cfg.data.mirror_test}
    if trained in ("grid", "tail"):
        return RegionPlan(mode=trained, **base)
    detector = cfg.data.detector_path
    if trained == "detector":
        if not detector:
            raise InputError("the run was trained on detector regions but its config has no data.detector_path")
        return RegionPlan(mode="detector", detector_path=str(Path(detector).resolve()), **base)
    if detector and Path(detector).is_file():
        return RegionPlan(mode="detector", detector_path=str(Path(detector).resolve()), warning=(
            "the run was trained on ground-truth boxes; new images get detector boxes instead "
            f"({Path(detector).name}), so their regions differ from training"), **base)
    return RegionPlan(mode="grid", warning=(
        "the run was trained on ground-truth boxes, which new images do not have, and no data.detector_path is "
        "configured: new images get the whole image plus grid cells, so their regions differ from training"), **base)


class RegionExtractor:
    """Loads the backbone (and detector) once; ``extract(images)`` is safe to call from many threads."""

    def __init__(self, plan: RegionPlan, device: str | torch.device = "cpu") -> None:
        from selfalign.vision.backbone import load_backbone

        self.plan = plan
        self.device = torch.device(device)
        self.backbone = load_backbone(self.device)
        self.detector = None
        if plan.mode == "detector":
            from selfalign.vision.detector import Detector

            self.detector = Detector(plan.detector_path, top_k=plan.detector_top_k)

    def extract(self, images: list[Image.Image], batch_size: int = 16,
                mirrored: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """RGB images -> (features ``[B, R, D]`` float16, n_regions ``[B]`` int32, boxes ``[B, R, 4]`` normalised).

        ``mirrored``: of the images mirrored left-right (boxes in the mirrored frame).

        No lock: the backbone runs under ``torch.inference_mode`` (no state changes) and onnxruntime's
        ``InferenceSession.run`` is documented as thread-safe.
        """
        from selfalign.vision.extract import extract_images
        from selfalign.vision.regions import mirror_image

        if mirrored:
            images = [mirror_image(image, None)[0] for image in images]
        return extract_images(images, self.backbone, self.plan.mode, self.plan.image_size, self.device,
                              detector=self.detector, max_regions=self.plan.max_regions, batch_size=batch_size)
