"""A run that fine-tunes the backbone's top (model.image_backbone_tail): training checks, galleries of new photos,
explain and the analysis tools see its regions (whole image first) and boxes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from selfalign.config import load_config
from selfalign.errors import InputError
from selfalign.index.gallery import Gallery, read_manifest
from selfalign.index.gallery_build import build_gallery
from selfalign.model.checkpoint import load_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def image_folder(tiny_scenes_run, tmp_path_factory) -> Path:
    """Four test images of the tiny scenes."""
    import shutil

    folder = tmp_path_factory.mktemp("tail_folder") / "photos"
    folder.mkdir()
    for path in sorted((tiny_scenes_run["root"] / "images").glob("*.png"))[-4:]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def tail_run(tiny_scenes_run, tmp_path_factory) -> Path:
    """A 1-epoch run of the tiny scenes that fine-tunes the backbone's top, on a regions=tail store (2 x 2 maps)."""
    from selfalign.data.scenes import load_scenes
    from selfalign.train import train
    from selfalign.vision.extract import extract_split

    from conftest import tiny_overrides

    root, base = tiny_scenes_run["root"], tmp_path_factory.mktemp("tail")
    for split in ("train", "dev", "test"):
        extract_split(load_scenes(root, split), base / "features", split, "tail", image_size=64, progress=False)
    cfg = load_config(None, tiny_overrides(base / "features", base / "runs", "tail") + [
        "data.regions=tail", "model.image_dim=192", "model.image_backbone_tail=true", "train.epochs=1",
        f"data.root={root}", "data.image_size=64", "align.codebook_init=data"])
    with pytest.raises(InputError, match="model.image_backbone_tail=true"):
        train(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_backbone_tail=False)), progress=False)
    with pytest.raises(InputError, match="--regions tail"):
        train(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, features=str(tiny_scenes_run["features"]))),
              progress=False)
    return train(cfg, progress=False)


def test_a_run_that_fine_tunes_the_backbone_top_indexes_new_images(tail_run, tiny_scenes_run, image_folder, tmp_path):
    """model.image_backbone_tail: trained on a regions=tail store, a gallery of new photos extracts the same map
    for them (plan mode tail), and an image query is embedded exactly as its gallery vector."""
    from selfalign.pipeline import evaluate_run

    run = tail_run
    model, _ = load_model(run)
    untouched = load_model(tiny_scenes_run["run_dir"])[0]  # a run that froze the backbone
    assert model.image_tail is not None and untouched.image_tail is None
    assert evaluate_run(run, "test", device="cpu")["rsum"] > 0
    build_gallery(run, tmp_path / "folder", image_folder, progress=False)
    gallery = Gallery.load(tmp_path / "folder")
    assert gallery.plan.mode == "tail" and read_manifest(tmp_path / "folder")["query_regions"]["mode"] == "tail"
    for record in gallery.images[:3]:  # the query's vector is the stored one: it finds itself, scored v . v
        vector = gallery.encode_image(record["path"])[0]
        hit = gallery.search_image(record["path"], 1)[0]
        assert hit["image_id"] == record["image_id"] and hit["score"] == pytest.approx(float(vector @ vector), abs=1e-4)
    cells = [list(map(float, b)) for b in gallery.images[0]["boxes"]]
    words = gallery.explain("a red circle", 0)["words"]  # region 0 is the whole image the model put first
    assert words and all(1 <= w["region"] <= len(cells) and w["box"] == pytest.approx(cells[w["region"] - 1], abs=1e-4)
                         for w in words)


def test_analysis_of_a_backbone_top_run_sees_the_whole_image_region_first(tail_run, tmp_path):
    """The codebook analysis pairs each encoded region (whole image first, then the 2 x 2 cells) with its box."""
    from selfalign.analysis.codebook import assign_split
    from selfalign.analysis.common import image_locals, load_run_split, require_boxes

    rs = load_run_split(tail_run, "test")
    free, mask = image_locals(rs.model, rs.split)
    boxes = require_boxes(rs)
    assert free.shape[:2] == mask.shape == boxes.shape[:2] == (8, 5) and mask.all()
    np.testing.assert_allclose(boxes[:, 0], np.tile([0, 0, 1, 1], (8, 1)))
    np.testing.assert_allclose(boxes[:, 1:], rs.split.boxes)
    assert len(assign_split(rs)["region_codes"]) == 8 * 5
