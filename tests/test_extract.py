"""Feature extraction into the store: region layouts, caching, resuming after an interruption, bad images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfalign.data.captions import CaptionedSplit
from selfalign.data.precomp import load_feature_split, read_meta
from selfalign.errors import ConfigError, InputError
from selfalign.vision.backbone import load_backbone
from selfalign.vision.extract import extract_images, extract_split

SIZE = 64  # feature map 2 x 2


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("cpu")


def _make_split(root: Path, n: int = 5, with_boxes: bool = True) -> CaptionedSplit:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    paths, boxes = [], []
    for i in range(n):
        width, height = 64 + 8 * i, 96 - 8 * i
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        pixels[: height // 2, : width // 2] = (200, 40, 40)
        path = root / f"im{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
        count = i % 3  # 0, 1 or 2 ground-truth boxes
        boxes.append(np.array([[0, 0, width / 2, height / 2], [width / 4, 10, width, height]][:count], np.float32))
    captions = [[f"image {i} caption {k}" for k in range(5)] for i in range(n)]
    return CaptionedSplit(
        name="train", image_ids=[p.name for p in paths], image_paths=paths, captions=captions,
        boxes=boxes if with_boxes else None,
    )  # fmt: skip


def test_grid_regions(tmp_path, backbone):
    split = _make_split(tmp_path / "data")
    stats = extract_split(split, tmp_path / "feat", "train", "grid", image_size=SIZE, backbone=backbone, progress=False)
    assert stats["images"] == 5 and stats["regions"] == 5 and not stats["cached"] and stats["images_per_s"] > 0
    store = load_feature_split(tmp_path / "feat", "train")
    assert store.images.shape == (5, 5, 1280) and store.images.dtype == np.float16
    assert store.n_regions.tolist() == [5] * 5
    assert store.captions == split.flat_captions() and store.image_ids == split.image_ids
    np.testing.assert_allclose(store.boxes[0, 0], [0, 0, 1, 1])
    np.testing.assert_allclose(store.boxes[0, 1:], [[0, 0, .5, .5], [.5, 0, 1, .5], [0, .5, .5, 1], [.5, .5, 1, 1]])
    whole = store.images[:, 0].astype(np.float32)
    np.testing.assert_allclose(whole, store.images[:, 1:].astype(np.float32).mean(axis=1), atol=2e-2, rtol=1e-2)
    meta = read_meta(tmp_path / "feat")
    assert meta["regions"] == "grid" and meta["image_size"] == SIZE and meta["feature_dim"] == 1280
    assert meta["splits"]["train"]["images"] == 5 and not (tmp_path / "feat" / ".partial").exists()
    # the in-memory path for query images gives the stored rows
    feats, n_regions, boxes = extract_images(split.image_paths[:2], backbone, "grid", image_size=SIZE)
    np.testing.assert_array_equal(feats, store.images[:2])
    np.testing.assert_array_equal(boxes, store.boxes[:2])


def test_ground_truth_boxes(tmp_path, backbone):
    split = _make_split(tmp_path / "data")
    extract_split(split, tmp_path / "feat", "train", "boxes", image_size=SIZE, batch_size=2, backbone=backbone,
                  progress=False)  # fmt: skip
    store = load_feature_split(tmp_path / "feat", "train")
    assert store.images.shape == (5, 3, 1280)
    assert store.n_regions.tolist() == [1, 2, 3, 1, 2]
    assert not store.images[0, 1:].any() and not store.boxes[0, 1:].any()  # zero padding
    np.testing.assert_allclose(store.boxes[2, 1], [0, 0, 0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(store.boxes[2, 2], [0.25, 10 / 80, 1, 1], atol=1e-6)
    # a box over the whole 2 x 2 map pools (with 2 x 2 bins, 2 samples) to exactly the map mean = region 0
    whole_boxes = [np.array([[0, 0, *Image.open(p).size]], np.float32) for p in split.image_paths]
    feats, n_regions, _ = extract_images(split.image_paths, backbone, "boxes", SIZE, boxes=whole_boxes)
    assert n_regions.tolist() == [2] * 5
    np.testing.assert_allclose(feats[:, 1].astype(np.float32), feats[:, 0].astype(np.float32), atol=1e-2, rtol=1e-2)
    with pytest.raises(InputError, match="no ground-truth boxes"):
        extract_split(_make_split(tmp_path / "d2", with_boxes=False), tmp_path / "f2", "train", "boxes",
                      image_size=SIZE, backbone=backbone, progress=False)  # fmt: skip


class _FakeDetector:
    def describe(self) -> dict:
        return {"model": "fake"}

    def detect(self, image):
        width, height = image.size
        boxes = np.array([[0, 0, width, height / 2], [0, height / 2, width, height]], np.float32)
        return boxes, np.array([0.9, 0.5], np.float32), np.array([0, 16])


def test_detector_regions_and_max_regions(tmp_path, backbone):
    split = _make_split(tmp_path / "data", n=3)
    stats = extract_split(split, tmp_path / "feat", "train", "detector", image_size=SIZE, detector=_FakeDetector(),
                          max_regions=2, backbone=backbone, progress=False)  # fmt: skip
    store = load_feature_split(tmp_path / "feat", "train")
    assert stats["regions"] == 2 and store.n_regions.tolist() == [2, 2, 2]
    np.testing.assert_allclose(store.boxes[:, 1], [[0, 0, 1, 0.5]] * 3)
    assert read_meta(tmp_path / "feat")["detector"] == {"model": "fake"}
    with pytest.raises(ConfigError, match="detector"):
        extract_split(split, tmp_path / "feat", "train", "detector", image_size=SIZE, backbone=backbone)
    with pytest.raises(ConfigError, match="regions"):
        extract_split(split, tmp_path / "feat", "train", "pixels", image_size=SIZE, backbone=backbone)


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_and_cache(tmp_path, backbone):
    split = _make_split(tmp_path / "data", n=7)
    reference = tmp_path / "reference"
    extract_split(split, reference, "train", "boxes", image_size=SIZE, chunk_size=2, backbone=backbone, progress=False)

    def stop_after_second(chunk: int) -> None:
        if chunk == 1:
            raise _Interrupt

    out = tmp_path / "feat"
    with pytest.raises(_Interrupt):
        extract_split(split, out, "train", "boxes", image_size=SIZE, chunk_size=2, backbone=backbone,
                      progress=False, on_chunk=stop_after_second)  # fmt: skip
    partial = out / ".partial" / "train"
    assert sorted(p.name for p in partial.glob("chunk_*.npz")) == ["chunk_00000.npz", "chunk_00001.npz"]
    assert not (out / "train_ims.npy").exists()

    computed: list[int] = []
    stats = extract_split(split, out, "train", "boxes", image_size=SIZE, chunk_size=2, backbone=backbone,
                          progress=False, on_chunk=computed.append)  # fmt: skip
    assert computed == [2, 3] and stats["chunks_computed"] == 2 and stats["chunks_total"] == 4
    assert not partial.exists()
    for name in ("train_ims.npy", "train_boxes.npy", "train_nregions.npy", "train_caps.txt", "train_ids.txt"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name

    again = extract_split(split, out, "train", "boxes", image_size=SIZE, chunk_size=2, backbone=None, progress=False)
    assert again["cached"] and again["images"] == 7  # no backbone needed: nothing recomputed

    # other settings: extracted again, and the meta says so
    stats = extract_split(split, out, "train", "grid", image_size=SIZE, chunk_size=4, backbone=backbone, progress=False)
    assert not stats["cached"] and read_meta(out)["regions"] == "grid"
    assert load_feature_split(out, "train").images.shape == (7, 5, 1280)


def test_stale_chunks_of_other_settings_are_discarded(tmp_path, backbone):
    split = _make_split(tmp_path / "data", n=4)
    out = tmp_path / "feat"
    with pytest.raises(_Interrupt):
        extract_split(split, out, "train", "grid", image_size=SIZE, chunk_size=2, backbone=backbone, progress=False,
                      on_chunk=lambda c: (_ for _ in ()).throw(_Interrupt()))  # fmt: skip
    computed: list[int] = []
    extract_split(split, out, "train", "boxes", image_size=SIZE, chunk_size=2, backbone=backbone, progress=False,
                  on_chunk=computed.append)  # fmt: skip
    assert computed == [0, 1]
    assert load_feature_split(out, "train").images.shape[1] == 3


def test_corrupt_and_missing_images(tmp_path, backbone):
    split = _make_split(tmp_path / "data", n=5)
    data = split.image_paths[3].read_bytes()
    split.image_paths[3].write_bytes(data[: len(data) // 2])  # cut mid-file
    with pytest.raises(InputError, match="im3.png"):
        extract_split(split, tmp_path / "feat", "train", "grid", image_size=SIZE, backbone=backbone, progress=False)
    split.image_paths[1].unlink()
    with pytest.raises(InputError, match="im1.png"):
        extract_split(split, tmp_path / "feat", "train", "grid", image_size=SIZE, backbone=backbone, progress=False)

    stats = extract_split(split, tmp_path / "feat", "train", "boxes", image_size=SIZE, chunk_size=2, skip_bad=True,
                          backbone=backbone, progress=False)  # fmt: skip
    assert stats["skipped"] == 2 and stats["images"] == 3
    assert [Path(p).name for p in stats["skipped_files"]] == ["im1.png", "im3.png"]
    store = load_feature_split(tmp_path / "feat", "train")
    assert store.image_ids == ["im0.png", "im2.png", "im4.png"]
    assert store.captions[5] == "image 2 caption 0" and len(store.captions) == 15
    assert store.n_regions.tolist() == [1, 3, 2]
    meta = json.loads((tmp_path / "feat" / "meta.json").read_text())
    assert meta["splits"]["train"]["skipped"] == 2
    # a strict rerun does not silently reuse the store that lacks two images
    with pytest.raises(InputError, match="im1.png"):
        extract_split(split, tmp_path / "feat", "train", "boxes", image_size=SIZE, chunk_size=2, backbone=backbone,
                      progress=False)  # fmt: skip


def test_cache_follows_the_inputs_not_the_folder(tmp_path, backbone):
    split = _make_split(tmp_path / "data", n=3)
    out = tmp_path / "feat"
    extract_split(split, out, "train", "grid", image_size=SIZE, backbone=backbone, progress=False)
    moved = tmp_path / "moved"
    (tmp_path / "data").rename(moved)
    split.image_paths = [moved / p.name for p in split.image_paths]
    assert extract_split(split, out, "train", "grid", image_size=SIZE, backbone=None, progress=False)["cached"]
    Image.new("RGB", (64, 64), (0, 0, 255)).save(split.image_paths[1])  # regenerated under the same name
    stats = extract_split(split, out, "train", "grid", image_size=SIZE, backbone=backbone, progress=False)
    assert not stats["cached"] and stats["chunks_computed"] == 1


def test_unreadable_chunk_is_recomputed(tmp_path, backbone):
    split = _make_split(tmp_path / "data", n=4)
    out = tmp_path / "feat"
    with pytest.raises(_Interrupt):
        extract_split(split, out, "train", "grid", image_size=SIZE, chunk_size=2, backbone=backbone, progress=False,
                      on_chunk=lambda c: (_ for _ in ()).throw(_Interrupt()) if c == 1 else None)  # fmt: skip
    chunk = out / ".partial" / "train" / "chunk_00000.npz"
    chunk.write_bytes(chunk.read_bytes()[:100])  # damaged on disk
    computed: list[int] = []
    extract_split(split, out, "train", "grid", image_size=SIZE, chunk_size=2, backbone=backbone, progress=False,
                  on_chunk=computed.append)  # fmt: skip
    assert computed == [0]
    assert load_feature_split(out, "train").images.shape == (4, 5, 1280)


def test_changed_captions_are_rewritten(tmp_path, backbone):
    split = _make_split(tmp_path / "data", n=2)
    extract_split(split, tmp_path / "feat", "train", "grid", image_size=SIZE, backbone=backbone, progress=False)
    split.captions[1][2] = "a corrected caption"
    assert not extract_split(split, tmp_path / "feat", "train", "grid", image_size=SIZE, backbone=backbone,
                             progress=False)["cached"]  # fmt: skip
    assert load_feature_split(tmp_path / "feat", "train").captions[7] == "a corrected caption"


def test_mirrored_copy_is_the_mirrored_images_with_mirrored_boxes(tmp_path, backbone):
    from PIL import ImageOps

    from selfalign.data.precomp import load_mirror_split

    split, feat = _make_split(tmp_path / "data"), tmp_path / "feat"
    extract_split(split, feat, "train", "boxes", image_size=SIZE, backbone=backbone, progress=False)
    extract_split(split, feat, "train_mirror", "boxes", image_size=SIZE, backbone=backbone, progress=False,
                  mirror=True)  # fmt: skip
    original = load_feature_split(feat, "train")
    mirrored = load_mirror_split(feat, "train", original)
    flipped = [ImageOps.mirror(Image.open(p).convert("RGB")) for p in split.image_paths]
    flipped_boxes = [np.stack([im.width - b[:, 2], b[:, 1], im.width - b[:, 0], b[:, 3]], 1) if len(b) else b
                     for im, b in zip(flipped, split.boxes)]  # fmt: skip
    feats, n_regions, boxes = extract_images(flipped, backbone, "boxes", SIZE, boxes=flipped_boxes)
    np.testing.assert_array_equal(mirrored.images, feats)
    np.testing.assert_array_equal(mirrored.n_regions, original.n_regions)
    np.testing.assert_allclose(mirrored.boxes[2, 1], [0.5, 0, 1, 0.5], atol=1e-6)  # was [0, 0, 0.5, 0.5]
    assert not np.array_equal(mirrored.images, original.images)
    # both copies are cached side by side, each under its own entry
    assert extract_split(split, feat, "train", "boxes", image_size=SIZE, backbone=backbone, progress=False)["cached"]
    again = extract_split(split, feat, "train_mirror", "boxes", image_size=SIZE, backbone=backbone, progress=False,
                          mirror=True)  # fmt: skip
    assert again["cached"] and read_meta(feat)["splits"]["train_mirror"]["mirrored"] is True


def test_mirror_split_errors_name_the_fix(tmp_path, backbone):
    from selfalign.data.precomp import load_mirror_split, write_feature_split

    split, feat = _make_split(tmp_path / "data", n=2), tmp_path / "feat"
    extract_split(split, feat, "train", "grid", image_size=SIZE, backbone=backbone, progress=False)
    original = load_feature_split(feat, "train")
    with pytest.raises(InputError, match=r"--splits train --mirror"):
        load_mirror_split(feat, "train", original)
    write_feature_split(feat, "train_mirror", np.asarray(original.images), original.captions[::-1],
                        original.image_ids)  # fmt: skip
    with pytest.raises(InputError, match="same order"):
        load_mirror_split(feat, "train", original)


def test_tail_regions_are_the_map_entering_the_backbones_top(tmp_path, backbone):
    """regions=tail stores every cell of the 192-d map the model's backbone top reads, and nothing else."""
    from selfalign.vision.backbone import TAIL_IN_DIM, preprocess, stem_map
    from selfalign.vision.regions import load_image

    split = _make_split(tmp_path / "data", n=3)
    extract_split(split, tmp_path / "feat", "train", "tail", image_size=SIZE, backbone=backbone, progress=False)
    store = load_feature_split(tmp_path / "feat", "train")
    assert store.images.shape == (3, 4, TAIL_IN_DIM) and store.n_regions.tolist() == [4, 4, 4]
    assert read_meta(tmp_path / "feat")["feature_dim"] == TAIL_IN_DIM
    np.testing.assert_allclose(store.boxes[0], [[0, 0, .5, .5], [.5, 0, 1, .5], [0, .5, .5, 1], [.5, .5, 1, 1]])
    with torch.inference_mode():
        cells = stem_map(backbone, preprocess([load_image(split.image_paths[1])], SIZE))
    np.testing.assert_allclose(store.images[1].astype(np.float32), cells[0].flatten(1).T.numpy(), atol=1e-2, rtol=1e-2)
    feats, _, _ = extract_images(split.image_paths[:2], backbone, "tail", image_size=SIZE)
    np.testing.assert_array_equal(feats, store.images[:2])
    with pytest.raises(ConfigError, match="regions=tail keeps every cell"):
        extract_images(split.image_paths[:1], backbone, "tail", image_size=SIZE, max_regions=2)
