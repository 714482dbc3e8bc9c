"""What every analysis needs: a run's model + one feature split, the context-free locals, images and figures."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from selfalign import atomic
from selfalign.config import RunConfig
from selfalign.data.batches import RegionStore
from selfalign.data.precomp import FeatureSplit, load_feature_split
from selfalign.errors import InputError
from selfalign.model.model import RetrievalModel

DPI = 110


@dataclass
class RunSplit:
    """A loaded run (model in eval mode) and one split of its feature store; ``root`` is the dataset folder."""

    run_dir: Path
    model: RetrievalModel
    cfg: RunConfig
    split_name: str
    split: FeatureSplit
    root: Path

    @property
    def label(self) -> str:
        """``name (SelfAlign)`` or ``name (base)``: which kind of model this run trained."""
        kind = "SelfAlign" if self.cfg.align.lca or self.cfg.align.cra else "base"
        return f"{self.run_dir.name} ({kind})"

    def image_path(self, index: int) -> Path:
        """The image file of image ``index`` (dataset layout ``ROOT/images/<id>``)."""
        path = self.root / "images" / self.split.image_ids[index]
        if not path.is_file():
            raise InputError(f"image file {path} not found (dataset root from the run config or --root: {self.root})")
        return path

    def image_index(self, image_id: str) -> int:
        try:
            return self.split.image_ids.index(image_id)
        except ValueError:
            raise InputError(f"image '{image_id}' is not in split '{self.split_name}' of {self.features}") from None

    @property
    def features(self) -> Path:
        return Path(self.cfg.data.features)


def load_run_split(run_dir: str | Path, split: str = "test", device: str = "cpu", features: str | None = None,
                   root: str | None = None) -> RunSplit:
    """Load ``run_dir``'s best model and split ``split`` of its feature store (``features``/``root`` override the
    paths of the run config, which may be relative to another working directory)."""
    import dataclasses

    from selfalign.model.checkpoint import load_model
    from selfalign.train.trainer import resolve_device

    from selfalign.model.ensemble import is_ensemble

    run_dir = Path(run_dir)
    if is_ensemble(run_dir):
        raise InputError(f"{run_dir} is an ensemble; the analyses read one model's alignment: pass a member run")
    model, cfg = load_model(run_dir, resolve_device(device))
    if features or root:
        data = dataclasses.replace(cfg.data, features=features or cfg.data.features, root=root or cfg.data.root)
        cfg = dataclasses.replace(cfg, data=data)
    data_split = load_feature_split(cfg.data.features, split)
    if data_split.images.shape[-1] != cfg.model.image_dim:
        raise InputError(f"{cfg.data.features}: features are {data_split.images.shape[-1]}-d but the model of "
                         f"{run_dir} expects {cfg.model.image_dim}-d (model.image_dim)")
    return RunSplit(run_dir, model.eval(), cfg, split, data_split, Path(cfg.data.root))


@torch.inference_mode()
def image_locals(model: RetrievalModel, split: FeatureSplit, indices: np.ndarray | None = None,
                 batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Context-free region locals of the images ``indices`` (default all): ``free [N, R, d]``, ``mask [N, R]``."""
    indices = np.arange(split.num_images) if indices is None else np.asarray(indices)
    store = RegionStore(split.images, split.region_mask())
    free, mask = [], []
    for start in range(0, len(indices), batch_size):
        regions, m = store.get(indices[start:start + batch_size], model.device)
        encoded = model.encode_image(regions, m)  # its mask: a backbone-top run adds the whole image
        free.append(encoded.free.float().cpu())
        mask.append(encoded.mask.cpu())
    return torch.cat(free), torch.cat(mask)


@torch.inference_mode()
def caption_locals(model: RetrievalModel, captions: list[str],
                   batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
    """Context-free word locals: ``free [M, L, d]``, ``mask [M, L]`` and the model's tokens of each caption."""
    free, mask, words = [], [], []
    for start in range(0, len(captions), batch_size):
        tokens = model.tokenize(captions[start:start + batch_size]).to(model.device)
        enc = model.encode_text(tokens)
        free.append(enc.free.float().cpu())
        mask.append(enc.mask.bool().cpu())
        words += tokens.words
    length = max(f.shape[1] for f in free)
    free = [torch.nn.functional.pad(f, (0, 0, 0, length - f.shape[1])) for f in free]
    mask = [torch.nn.functional.pad(m, (0, length - m.shape[1])) for m in mask]
    return torch.cat(free), torch.cat(mask), words


def load_rgb(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as exc:
        raise InputError(f"{path}: cannot read image ({exc})") from None


def crop(image, box: np.ndarray, size: int = 64):
    """Crop a PIL image by a normalised ``x1, y1, x2, y2`` box and resize the crop to ``size`` × ``size``."""
    w, h = image.size
    x1, y1, x2, y2 = (float(v) for v in box)
    left, top = int(np.floor(x1 * w)), int(np.floor(y1 * h))
    right, bottom = max(left + 1, int(np.ceil(x2 * w))), max(top + 1, int(np.ceil(y2 * h)))
    return image.crop((left, top, right, bottom)).resize((size, size))


def require_boxes(split: RunSplit) -> np.ndarray:
    """Boxes ``[N, R, 4]`` of the regions the run's model encodes (region r of ``image_locals``)."""
    if split.split.boxes is None:
        raise InputError(f"{split.features}: split '{split.split_name}' has no {split.split_name}_boxes.npy "
                         f"(region boxes are needed to draw or crop regions)")
    return np.stack([split.model.region_boxes(b) for b in np.asarray(split.split.boxes)])


def new_figure(*args, **kwargs):
    """``plt.subplots`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def safe_name(text: str) -> str:
    """A file-name-safe version of an id (``scene_000001.png`` -> ``scene_000001_png``)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object at the top level")
    return data
