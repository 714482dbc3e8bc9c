"""The feature store: round trip, validation errors (each naming what is wrong), SCAN-style folders."""

from __future__ import annotations

import numpy as np
import pytest

from selfalign.data.precomp import (
    FeatureSplit, check_finite, load_feature_split, read_meta, split_files, write_feature_split, write_meta,
)  # fmt: skip
from selfalign.errors import InputError


def _store(tmp_path, n=3, r=4, d=6, with_optional=True):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((n, r, d)).astype(np.float16)
    captions = [f"image {i // 5} caption {i % 5}" for i in range(5 * n)]
    ids = [f"img{i}.jpg" for i in range(n)]
    boxes = rng.random((n, r, 4)).astype(np.float32) if with_optional else None
    n_regions = np.array([r, 1, 2][:n], dtype=np.int32) if with_optional else None
    write_feature_split(tmp_path, "test", images, captions, ids, boxes, n_regions)
    return images, captions, ids, boxes, n_regions


def test_round_trip_and_mask(tmp_path):
    images, captions, ids, boxes, n_regions = _store(tmp_path)
    split = load_feature_split(tmp_path, "test")
    assert isinstance(split.images, np.memmap) and split.images.dtype == np.float16
    np.testing.assert_array_equal(split.images, images)
    assert split.captions == captions and split.image_ids == ids
    np.testing.assert_array_equal(split.boxes, boxes)
    np.testing.assert_array_equal(split.n_regions, n_regions)
    assert (split.num_images, split.max_regions, split.feature_dim) == (3, 4, 6)
    mask = split.region_mask()
    assert mask.tolist() == [[True] * 4, [True, False, False, False], [True, True, False, False]]
    loaded = load_feature_split(tmp_path, "test", mmap=False)
    assert not isinstance(loaded.images, np.memmap)
    check_finite(split)


def test_rewrite_without_optional_files_removes_stale_ones(tmp_path):
    _store(tmp_path)
    _store(tmp_path, with_optional=False)
    split = load_feature_split(tmp_path, "test")
    assert split.boxes is None and split.n_regions is None
    assert split.region_mask().all()


def test_missing_files_are_named(tmp_path):
    _store(tmp_path)
    files = split_files(tmp_path, "test")
    with pytest.raises(InputError, match="train_ims.npy"):
        load_feature_split(tmp_path, "train")
    files["caps"].unlink()
    with pytest.raises(InputError, match="test_caps.txt"):
        load_feature_split(tmp_path, "test")
    with pytest.raises(InputError, match="not found"):
        load_feature_split(tmp_path / "nowhere", "test")


def test_caption_count_and_empty_line(tmp_path):
    _store(tmp_path)
    caps = split_files(tmp_path, "test")["caps"]
    lines = caps.read_text().splitlines()
    caps.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(InputError, match=r"14 captions for 3 images.*expected 5 per image = 15"):
        load_feature_split(tmp_path, "test")
    lines[6] = "   "
    caps.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"test_caps.txt, line 7: empty caption"):
        load_feature_split(tmp_path, "test")


def test_caption_lines_split_on_newline_only(tmp_path):
    _store(tmp_path)
    caps = split_files(tmp_path, "test")["caps"]
    lines = caps.read_text().splitlines()
    lines[0] = "a dog\u2028running"  # a Unicode line separator is text, not a line break
    caps.write_bytes(("\r\n".join(lines) + "\r\n").encode())  # and Windows line ends are fine
    split = load_feature_split(tmp_path, "test")
    assert split.captions[0] == "a dog\u2028running" and len(split.captions) == 15


def test_ids_boxes_nregions_validation(tmp_path):
    _store(tmp_path)
    files = split_files(tmp_path, "test")
    files["ids"].write_text("a\nb\n")
    with pytest.raises(InputError, match=r"test_ids.txt: 2 ids for 3 images"):
        load_feature_split(tmp_path, "test")
    files["ids"].write_text("a\nb\nc\n")
    np.save(files["boxes"], np.zeros((3, 2, 4), np.float32))
    with pytest.raises(InputError, match=r"test_boxes.npy: shape \(3, 2, 4\)"):
        load_feature_split(tmp_path, "test")
    files["boxes"].unlink()
    np.save(files["nregions"], np.array([1, 5, 1], np.int32))
    with pytest.raises(InputError, match=r"test_nregions.npy: image 1 has 5 regions"):
        load_feature_split(tmp_path, "test")
    np.save(files["nregions"], np.array([1.0, 2.0, 1.0]))
    with pytest.raises(InputError, match=r"test_nregions.npy: expected \[3\] integers"):
        load_feature_split(tmp_path, "test")


@pytest.mark.parametrize("keep", [0, 50, -7])
def test_truncated_npy_is_an_input_error(tmp_path, keep):
    _store(tmp_path)
    ims = split_files(tmp_path, "test")["ims"]
    data = ims.read_bytes()
    ims.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    for mmap in (True, False):
        with pytest.raises(InputError, match="test_ims.npy"):
            load_feature_split(tmp_path, "test", mmap=mmap)


def test_write_validates(tmp_path):
    images = np.zeros((2, 3, 4), np.float16)
    caps = ["a caption"] * 10
    with pytest.raises(InputError, match="9 captions for 2 images"):
        write_feature_split(tmp_path, "x", images, caps[:9], ["a", "b"])
    with pytest.raises(InputError, match="caption 3 .image 0. is empty"):
        write_feature_split(tmp_path, "x", images, caps[:3] + [" "] + caps[4:], ["a", "b"])
    with pytest.raises(InputError, match="line break"):
        write_feature_split(tmp_path, "x", images, ["two\nlines"] + caps[1:], ["a", "b"])
    with pytest.raises(InputError, match="n_regions"):
        write_feature_split(tmp_path, "x", images, caps, ["a", "b"], n_regions=np.array([0, 1]))
    with pytest.raises(InputError, match="boxes have shape"):
        write_feature_split(tmp_path, "x", images, caps, ["a", "b"], boxes=np.zeros((2, 4)))
    assert not list(tmp_path.iterdir())  # nothing written on a validation error


def test_scan_style_folder(tmp_path):
    """SCAN / VSE∞ releases: float32 features, no nregions, ids absent or one per caption."""
    ims = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    np.save(tmp_path / "dev_ims.npy", ims)
    (tmp_path / "dev_caps.txt").write_text("".join(f"caption {i}\n" for i in range(10)))
    split = load_feature_split(tmp_path, "dev")
    assert split.images.dtype == np.float32 and split.image_ids == ["0", "1"]
    assert split.boxes is None and split.n_regions is None and split.region_mask().shape == (2, 3)
    (tmp_path / "dev_ids.txt").write_text("".join(f"{391895 + i // 5}\n" for i in range(10)))
    assert load_feature_split(tmp_path, "dev").image_ids == ["391895", "391896"]
    np.save(tmp_path / "dev_ims.npy", ims[:, 0])  # one global vector per image
    assert load_feature_split(tmp_path, "dev").images.shape == (2, 1, 4)
    assert read_meta(tmp_path) == {}


def test_check_finite_names_image(tmp_path):
    images = np.zeros((7, 2, 3), np.float16)
    images[5, 1, 2] = np.inf
    split = FeatureSplit(images, ["c"] * 35, [f"id{i}" for i in range(7)])
    with pytest.raises(InputError, match=r"image 5 \(id id5\)"):
        check_finite(split, chunk=2)
    images[5, 1, 2] = 0
    boxes = np.zeros((7, 2, 4), np.float32)
    boxes[3, 0, 0] = np.nan
    with pytest.raises(InputError, match=r"boxes of image 3"):
        check_finite(FeatureSplit(images, ["c"] * 35, [f"id{i}" for i in range(7)], boxes), chunk=4)


def test_meta_round_trip_and_bad_json(tmp_path):
    write_meta(tmp_path, {"regions": "grid", "splits": {}})
    assert read_meta(tmp_path)["regions"] == "grid"
    (tmp_path / "meta.json").write_text("{broken")
    with pytest.raises(InputError, match="meta.json"):
        read_meta(tmp_path)
