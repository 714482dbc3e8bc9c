"""Shared fixtures: small generated feature stores (no images, no backbone) for fast training tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from selfalign.data.precomp import write_feature_split

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
COLOURS = ["red", "blue", "green", "yellow"]
SHAPES = ["circle", "square", "star", "ring"]


def load_benchmark(name: str):
    """Import ``benchmarks/{name}.py`` (the scripts are no package) as module ``{name}``, registered in
    ``sys.modules`` so that the dataclasses and pickles inside it resolve."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_feature_store(root: Path, n_train: int = 64, n_dev: int = 16, n_test: int = 16, dim: int = 32,
                       seed: int = 0) -> Path:
    """A store whose regions encode (colour, shape) objects and whose captions name them: learnable in seconds."""
    rng = np.random.default_rng(seed)
    colour_vecs = rng.normal(size=(len(COLOURS), dim))
    shape_vecs = rng.normal(size=(len(SHAPES), dim))
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        n_obj = rng.integers(1, 4, size=n)
        regions = np.zeros((n, 4, dim), dtype=np.float16)
        captions, ids = [], []
        for i in range(n):
            objs = [(rng.integers(len(COLOURS)), rng.integers(len(SHAPES))) for _ in range(n_obj[i])]
            for r, (c, s) in enumerate(objs):
                regions[i, r + 1] = colour_vecs[c] + shape_vecs[s] + 0.1 * rng.normal(size=dim)
            regions[i, 0] = regions[i, 1: n_obj[i] + 1].mean(0)
            words = [f"{COLOURS[c]} {SHAPES[s]}" for c, s in objs]
            for k in range(5):
                order = rng.permutation(len(words))
                captions.append(("a picture of " if k % 2 else "there is ") + " and ".join(words[j] for j in order))
            ids.append(f"img{split}{i:03d}")
        write_feature_split(root, split, regions, captions, ids, boxes=None, n_regions=(n_obj + 1).astype(np.int32))
    return root


@pytest.fixture(scope="session")
def feature_store(tmp_path_factory) -> Path:
    return make_feature_store(tmp_path_factory.mktemp("features"))


def tiny_overrides(features: Path, out_dir: Path, name: str = "tiny") -> list[str]:
    return [f"data.features={features}", f"out_dir={out_dir}", f"name={name}", "model.image_dim=32",
            "model.embed_dim=32", "model.word_dim=16", "model.image_context_heads=2", "align.codebook_size=16",
            "align.cra_negatives=32", "train.epochs=2", "train.batch_size=16", "train.device=cpu",
            "train.threads=1", "data.dev_max_images=16"]


@pytest.fixture(scope="session")
def tiny_scenes_run(tmp_path_factory) -> dict:
    """A 64-px scenes dataset (40/8/8), its ground-truth-box features and a 1-epoch run on them (~15 s on CPU).

    Returns ``{"root", "features", "run_dir"}``; the run's model reads real 1280-d EfficientNet regions.
    """
    from selfalign.config import load_config
    from selfalign.data.scenes import generate_scenes, load_scenes
    from selfalign.train import train
    from selfalign.vision.backbone import load_backbone
    from selfalign.vision.extract import extract_split
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine one thread is ~3x faster for these tiny batches
    base = tmp_path_factory.mktemp("tiny_scenes")
    root, features = base / "data", base / "features"
    generate_scenes(root, 40, 8, 8, seed=0, image_size=64, progress=False, workers=1)
    backbone = load_backbone("cpu")
    for split in ("train", "dev", "test"):
        extract_split(load_scenes(root, split), features, split, "boxes", image_size=64, progress=False,
                      backbone=backbone)
    overrides = tiny_overrides(features, base / "runs", "tiny-scenes") + [
        "model.image_dim=1280", "train.epochs=1", f"data.root={root}", "data.image_size=64"]
    run_dir = train(load_config(None, overrides), progress=False)
    torch.set_num_threads(threads)
    return {"root": root, "features": features, "run_dir": run_dir}


@pytest.fixture(scope="session")
def tiny_gallery(tiny_scenes_run, tmp_path_factory) -> Path:
    """A gallery of the tiny run's test split (8 images + 40 captions), built from its feature store."""
    from selfalign.index.gallery_build import build_gallery

    out = tmp_path_factory.mktemp("tiny_gallery") / "gallery"
    build_gallery(tiny_scenes_run["run_dir"], out, dataset="scenes", root=tiny_scenes_run["root"], split="test",
                  progress=False)
    return out


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch thread for a test module: tiny batches on a shared 2-core machine run ~3x faster so."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
