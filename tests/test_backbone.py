"""EfficientNet-Lite0: loading, preprocessing of every PIL mode, feature-map shape, and a real-photo sanity check."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfalign.errors import ConfigError
from selfalign.vision.backbone import (
    FEATURE_DIM, TAIL_IN_DIM, BackboneTail, feature_map, load_backbone, preprocess, stem_map, to_rgb,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
FLICKR_IMAGES = SHARED / "data" / "flickr8k" / "images"


@pytest.fixture(scope="module")
def backbone():
    started = time.perf_counter()
    model = load_backbone("cpu")
    print(f"backbone loaded in {time.perf_counter() - started:.2f} s")
    return model


def _scaled(value: float) -> float:
    return (value - 127.0) / 128.0


def test_scaling_is_tflite_not_imagenet():
    image = Image.new("RGB", (10, 20), (0, 127, 255))
    x = preprocess([image], 32)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 5, 5], torch.tensor([_scaled(0), 0.0, _scaled(255)]))


def test_every_mode_becomes_rgb():
    gray = Image.new("L", (8, 8), 200)
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))  # fully transparent: shows the white background
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink: white
    deep = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))  # I;16 full scale: white, not clipped noise
    mid16 = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # 32896 / 257 = 128
    floats = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32))  # F in [0, 1]
    binary = Image.new("1", (8, 8), 1)
    assert deep.mode.startswith("I;16") and floats.mode == "F"
    expected = [200, 255, 127, (255, 0, 0), 255, 255, 128, 128, 255]
    images = [gray, rgba, half, palette, cmyk, deep, mid16, floats, binary]
    for image, want in zip(images, expected):
        rgb = to_rgb(image)
        assert rgb.mode == "RGB", image.mode
        got = rgb.getpixel((3, 3))
        want = want if isinstance(want, tuple) else (want,) * 3
        assert all(abs(g - w) <= 1 for g, w in zip(got, want)), (image.mode, got, want)
    assert preprocess(images, 32).shape == (len(images), 3, 32, 32)


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (40, 20))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: the camera was turned; display rotated by 90 degrees
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    buffer.seek(0)
    assert to_rgb(Image.open(buffer)).size == (20, 40)


def test_image_size_must_be_multiple_of_32():
    with pytest.raises(ConfigError, match="multiple of 32"):
        preprocess([Image.new("RGB", (8, 8))], 100)


def test_feature_map_shape_and_eval_mode(backbone):
    assert not backbone.training
    assert all(not p.requires_grad for p in backbone.parameters())
    x = preprocess([Image.new("RGB", (70, 50), (30, 90, 160)), Image.new("L", (64, 64), 9)], 96)
    with torch.inference_mode():
        fmap = feature_map(backbone, x)
    assert fmap.shape == (2, FEATURE_DIM, 3, 3)
    assert torch.isfinite(fmap).all() and fmap.abs().sum() > 0


def test_recognises_a_dog_photo(backbone):
    """With the TF-Lite scaling the ImageNet head calls a Flickr8k dog photo a dog (ImageNet classes 151-268)."""
    path = FLICKR_IMAGES / "1001773457_577c3a7d70.jpg"  # "A black dog and a spotted dog are fighting"
    if not path.exists():
        pytest.skip(f"Flickr8k images not available at {FLICKR_IMAGES} (../shared is absent)")
    with torch.inference_mode():
        logits = backbone(preprocess([Image.open(path)], 224))
    assert 151 <= int(logits.argmax()) <= 268


def test_the_tail_of_the_stem_map_is_the_feature_map(backbone):
    """The trainable top (model.image_backbone_tail) reproduces the frozen network exactly, keeps its batch-norm
    statistics when the model trains, and passes gradients to its weights."""
    x = preprocess([Image.new("RGB", (90, 70), (200, 30, 60)), Image.new("RGB", (64, 64), (10, 120, 40))], 96)
    tail = BackboneTail()
    with torch.no_grad():
        cells = stem_map(backbone, x)
        assert cells.shape == (2, TAIL_IN_DIM, 3, 3)
        torch.testing.assert_close(tail(cells), feature_map(backbone, x), rtol=0, atol=0)
    tail.train()
    assert not any(m.training for m in tail.modules())
    tail(cells).sum().backward()
    assert all(p.grad is not None for p in tail.parameters())
    assert sum(p.numel() for p in tail.parameters()) == 2_446_080
    assert torch.equal(tail.blocks[0]._bn0.running_mean, BackboneTail().blocks[0]._bn0.running_mean)
