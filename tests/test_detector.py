"""YOLOX-Nano wrapper: letterbox, output decoding, NMS, errors, and real boxes on Flickr8k photos."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfalign.errors import ConfigError, InputError
from selfalign.vision.detector import COCO_CLASSES, Detector, decode, letterbox, nms

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "yolox" / "yolox_nano.onnx"
FLICKR_IMAGES = SHARED / "data" / "flickr8k" / "images"


def test_letterbox_keeps_aspect_top_left_bgr():
    image = Image.new("RGB", (832, 416), (10, 20, 30))
    blob, ratio = letterbox(image)
    assert blob.shape == (1, 3, 416, 416) and blob.dtype == np.float32 and ratio == 0.5
    assert blob[0, :, 0, 0].tolist() == [30, 20, 10]  # BGR
    assert blob[0, :, 207, 5].tolist() == [30, 20, 10] and blob[0, :, 208, 5].tolist() == [114] * 3


def test_nms_suppresses_overlaps_only():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 9]], np.float32)
    scores = np.array([0.5, 0.9, 0.3, 0.1], np.float32)
    assert nms(boxes, scores, 0.45).tolist() == [1, 2]
    assert nms(boxes, scores, 0.95).tolist() == [1, 0, 2, 3]
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.45).tolist() == []


def test_decode_maps_anchor_to_original_pixels():
    out = np.zeros((1, 3549, 85), np.float32)
    out[0, :, 2:4] = -10.0  # tiny boxes everywhere, with zero score
    # stride-16 grid starts after 52*52 rows; cell (x=3, y=2) is row 2704 + 2*26 + 3
    row = 52 * 52 + 2 * 26 + 3
    out[0, row, :4] = [0.5, 0.5, np.log(4.0), np.log(2.0)]  # centre (56, 40), size 64 x 32 in input pixels
    out[0, row, 4] = 0.9
    out[0, row, 5 + 16] = 0.8  # dog
    out[0, row + 1, :5] = [0.5, 0.5, np.log(4.0), np.log(2.0), 0.9]  # overlaps the first, lower score
    out[0, row + 1, 5 + 16] = 0.5
    boxes, scores, classes = decode(out, ratio=0.5, image_size=(832, 832), score_threshold=0.1,
                                    iou_threshold=0.45, top_k=20)  # fmt: skip
    np.testing.assert_allclose(boxes, [[48.0, 48.0, 176.0, 112.0]], rtol=1e-5)
    np.testing.assert_allclose(scores, [0.72], rtol=1e-5)
    assert COCO_CLASSES[int(classes[0])] == "dog" and boxes.dtype == np.float32


def test_missing_model_and_missing_onnxruntime(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="nowhere.onnx.*detector_path"):
        Detector(tmp_path / "nowhere.onnx")
    with pytest.raises(InputError, match="not found"):
        Detector("")
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not a model")
    with pytest.raises(InputError, match="bogus.onnx: not a valid ONNX model"):
        Detector(bogus)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now fails
    with pytest.raises(ConfigError, match="pip install onnxruntime"):
        Detector(bogus)


@pytest.fixture(scope="module")
def detector():
    if not MODEL.exists() or not FLICKR_IMAGES.exists():
        pytest.skip(f"YOLOX-Nano or Flickr8k not available under {SHARED} (../shared is absent)")
    return Detector(MODEL, threads=1)


@pytest.mark.parametrize(
    "name,label",
    [
        ("1001773457_577c3a7d70.jpg", "dog"),  # "A black dog and a spotted dog are fighting"
        ("1000268201_693b08cb0e.jpg", "person"),  # "A child in a pink dress is climbing up a set of stairs ..."
        ("1003163366_44323f5815.jpg", "bench"),  # "A man lays on a bench while his dog sits by him ."
    ],
)
def test_finds_captioned_objects(detector, name, label):
    image = Image.open(FLICKR_IMAGES / name)
    boxes, scores, classes = detector.detect(image)
    assert 0 < len(boxes) <= detector.top_k and boxes.shape[1] == 4
    assert (scores[:-1] >= scores[1:]).all() and (scores >= detector.score_threshold).all()
    width, height = image.size
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    found = {COCO_CLASSES[int(c)] for c, s in zip(classes, scores) if s > 0.3}
    assert label in found, found


def test_boxes_follow_the_image_when_resized(detector):
    """Boxes come back in original pixels: the same photo at twice the size gives about twice the box."""
    image = Image.open(FLICKR_IMAGES / "1001773457_577c3a7d70.jpg").convert("RGB")
    small, _, _ = detector.detect(image)
    large, _, _ = detector.detect(image.resize((448, 448)))
    np.testing.assert_allclose(large[0], 2 * small[0], atol=6.0)
