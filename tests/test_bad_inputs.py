"""Every kind of bad input: a clear error naming the file/line/index, a counted skip, or (image modes, odd captions)
correct handling.

Large-image policy: an image above ``selfalign.vision.regions.MAX_IMAGE_PIXELS`` (~179 MP, PIL's default hard limit)
is refused from its header, before decoding, so memory stays bounded (a 179 MP RGB image decodes to ~0.5 GB);
``extract_split(skip_bad=True)`` skips and counts it like a corrupt file.
"""

from __future__ import annotations

import io
import json
import resource
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_feature_store, tiny_overrides
from selfalign.cli import main
from selfalign.config import load_config
from selfalign.data.captions import CaptionedSplit, load_token_dataset
from selfalign.data.formats import load_caption_table
from selfalign.data.precomp import load_feature_split
from selfalign.data.text import Vocabulary
from selfalign.errors import ConfigError, InputError
from selfalign.model.checkpoint import build_model
from selfalign.train import train
from selfalign.vision.backbone import FEATURE_DIM, load_backbone
from selfalign.vision.extract import extract_split
from selfalign.vision.regions import extract_images, load_image

SIZE = 32  # a 1 x 1 feature map: the backbone runs in milliseconds


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("cpu")


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares ``width x height`` RGB pixels; its pixel data is never written."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _mode_images(root: Path) -> dict[str, tuple[Path, tuple[int, int, int]]]:
    """One file per awkward mode -> (path, expected RGB of pixel (0, 0))."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}

    def save(name, image, expected, **kw):
        image.save(root / name, **kw)
        out[name] = (root / name, expected)

    save("gray.png", Image.new("L", (40, 30), 90), (90, 90, 90))
    save("rgba.png", Image.new("RGBA", (40, 30), (10, 20, 30, 0)), (255, 255, 255))  # transparent over white
    save("la.png", Image.new("LA", (40, 30), (50, 255)), (50, 50, 50))
    save("cmyk.jpg", Image.new("CMYK", (40, 32), (0, 0, 0, 0)), (255, 255, 255), quality=95)
    save("gray16.png", Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16)), (255, 255, 255))
    palette = Image.new("P", (40, 30), 1)
    palette.putpalette([0, 0, 0, 200, 30, 10] + [0, 0, 0] * 254)
    save("palette.png", palette, (200, 30, 10))
    save("palette.gif", palette, (200, 30, 10))
    save("one_pixel.png", Image.new("RGB", (1, 1), (1, 2, 3)), (1, 2, 3))
    save("binary.png", Image.new("1", (40, 30), 1), (255, 255, 255))
    return out


def test_every_image_mode_is_converted_to_rgb_and_extracted(tmp_path, backbone):
    images = _mode_images(tmp_path)
    for name, (path, expected) in images.items():
        image = load_image(path)
        assert image.mode == "RGB", name
        assert all(abs(a - b) <= 3 for a, b in zip(image.getpixel((0, 0)), expected)), (name, image.getpixel((0, 0)))
    paths = [p for p, _ in images.values()]
    feats, n_regions, boxes = extract_images(paths, backbone, "grid", image_size=SIZE, batch_size=4)
    assert feats.shape == (len(paths), 2, FEATURE_DIM) and np.isfinite(feats).all()
    assert n_regions.tolist() == [2] * len(paths)


@pytest.mark.parametrize("make,needle", [
    (lambda p: p.write_bytes(b""), "cannot read image"),
    (lambda p: p.write_bytes(np.random.default_rng(0).bytes(2000)), "cannot read image"),
    (lambda p: p.write_bytes(_jpeg_bytes()[:400]), "corrupt or truncated"),
    (lambda p: _png_header_only(p, 20_000, 20_000), "too large"),
])
def test_unreadable_images_are_named(tmp_path, make, needle):
    path = tmp_path / "bad.img"
    make(path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InputError, match=needle) as info:
        load_image(path)
    assert str(path) in str(info.value)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200  # the huge images were refused before decoding


def test_size_guard_holds_even_if_pil_limit_is_disabled(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # some libraries switch PIL's own guard off
    path = tmp_path / "wide.png"
    _png_header_only(path, 60_000, 60_000)  # would decode to 10.8 GB
    with pytest.raises(InputError, match="60000x60000 pixels is above the limit"):
        load_image(path)


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_bad_images_are_skipped_and_counted(tmp_path, backbone):
    images = _mode_images(tmp_path / "ok")
    good = [p for p, _ in images.values()][:3]
    corrupt, huge = tmp_path / "corrupt.jpg", tmp_path / "huge.png"
    corrupt.write_bytes(_jpeg_bytes()[:300])
    _png_header_only(huge, 20_000, 20_000)
    paths = good[:1] + [corrupt] + good[1:] + [huge]
    split = CaptionedSplit("train", [p.name for p in paths], paths, [[f"caption {k}"] * 5 for k in range(len(paths))])
    with pytest.raises(InputError, match="corrupt.jpg"):
        extract_split(split, tmp_path / "feat", "train", "grid", image_size=SIZE, backbone=backbone, progress=False)
    stats = extract_split(split, tmp_path / "feat", "train", "grid", image_size=SIZE, backbone=backbone,
                          progress=False, skip_bad=True)
    assert stats["skipped"] == 2 and stats["images"] == 3
    assert sorted(Path(p).name for p in stats["skipped_files"]) == ["corrupt.jpg", "huge.png"]
    assert load_feature_split(tmp_path / "feat", "train").image_ids == [p.name for p in good]


def _token_dataset(root: Path, captions: list[str]) -> tuple[Path, Path, Path]:
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "images" / "a.png")
    (root / "split.txt").write_text("a.png\n")
    lines = [f"a.png#{k}\t{c}" for k, c in enumerate(captions)]
    (root / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "captions.txt", root / "split.txt", root / "images"


@pytest.mark.parametrize("bad", ["", "   ", " \t "])
def test_empty_or_blank_caption_names_file_and_line(tmp_path, bad):
    captions = ["a dog", "a cat", bad, "a cow", "a hen"]
    with pytest.raises(InputError, match=r"captions.txt:3: empty caption"):
        load_token_dataset(*_token_dataset(tmp_path, captions))


def test_non_ascii_emoji_and_unicode_separators_are_kept(tmp_path):
    captions = ["Ein Hund läuft über die Straße", "一只狗在草地上奔跑", "a dog 🐶 running 🏃‍♂️",
                "café\u2028crème", "naïve\x85line"]
    split = load_token_dataset(*_token_dataset(tmp_path, captions))
    assert split.captions[0] == captions  # U+2028 / U+0085 do not end a line
    vocab = Vocabulary.build(captions)
    tokens = vocab.encode(captions, max_words=40)
    assert tokens.words[2] == ["a", "dog", "running"] and tokens.words[1] == ["一只狗在草地上奔跑"]
    assert tokens.words[3] == ["café", "crème"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_blank_caption_in_a_table_names_the_line(tmp_path, suffix):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    captions = ["one", "two", "   ", "four", "five"]
    table = tmp_path / f"captions{suffix}"
    if suffix == ".csv":
        table.write_text("image,caption\n" + "".join(f"a.png,{c}\n" for c in captions))
    else:
        table.write_text("".join(json.dumps({"image": "a.png", "caption": c}) + "\n" for c in captions))
    line = 4 if suffix == ".csv" else 3  # the CSV has a header line
    with pytest.raises(InputError, match=rf"captions{suffix}:{line}: empty caption"):
        load_caption_table(tmp_path / "images", table)


def test_over_long_and_emoji_only_captions_tokenize(feature_store, tmp_path):
    cfg = load_config(None, tiny_overrides(feature_store, tmp_path) + ["model.max_words=8"])
    model = build_model(cfg, Vocabulary.build(["red circle"]))
    tokens = model.tokenize(["red " * 500, "🐶🐱🐭", "red circle"])
    assert tokens.ids.shape == (3, 8)  # truncated at model.max_words
    assert tokens.mask.sum(1).tolist() == [8, 1, 2]  # emoji only: one <unk> token, not an error
    assert tokens.ids[1, 0] == 1


def test_nan_in_features_names_the_image(tmp_path):
    features = make_feature_store(tmp_path / "f", n_train=16, n_dev=8, n_test=8)
    ims = np.load(features / "train_ims.npy")
    ims[11, 2, 5] = np.nan
    np.save(features / "train_ims.npy", ims)
    with pytest.raises(InputError, match=r"split 'train': features of image 11 \(id imgtrain011\)"):
        train(load_config(None, tiny_overrides(features, tmp_path)), progress=False)
    assert not (tmp_path / "tiny" / "train_state.pt").exists()


def test_feature_file_truncated_mid_write(tmp_path, capsys):
    features = make_feature_store(tmp_path / "f", n_train=16, n_dev=8, n_test=8)
    data = (features / "dev_ims.npy").read_bytes()
    (features / "dev_ims.npy").write_bytes(data[: len(data) // 2])
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    assert main(["train", str(config), *tiny_overrides(features, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dev_ims.npy" in err and "truncated" in err


@pytest.mark.parametrize("text,needle", [
    ("train:\n  epochs: ten\n", "config key 'train.epochs': expected an integer, got 'ten'"),
    ("train:\n  lr: [1, 2]\n", "config key 'train.lr': expected a number"),
    ("train:\n  amp: maybe\n", "config key 'train.amp': expected true/false"),
    ("model: 5\n", "config key 'model': expected a mapping"),
    ("train:\n  device: tpu\n", "'train.device': 'tpu' is not one of"),
    ("- a\n- b\n", "the top level must be a mapping"),
])
def test_config_with_wrong_types(tmp_path, text, needle, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match="c.yaml") as info:
        load_config(config)
    assert needle in str(info.value)
    assert main(["train", str(config)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
