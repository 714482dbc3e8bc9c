"""Shared fixtures: small generated feature stores (no images, no backbone) for fast training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from selfalign.data.precomp import write_feature_split

COLOURS = ["red", "blue", "green", "yellow"]
SHAPES = ["circle", "square", "star", "ring"]


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
