"""Loaders for user formats: Flickr folders, Karpathy JSON, CSV/JSONL tables, and the dispatcher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from selfalign.data.formats import load_caption_table, load_dataset, load_flickr, load_karpathy
from selfalign.data.scenes import generate_scenes
from selfalign.errors import ConfigError, InputError

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def _flickr(root: Path, token_name: str = "Flickr8k.token.txt", prefix: str = "Flickr_8k") -> Path:
    ids = {"train": ["t1.jpg", "t2.jpg"], "dev": ["d1.jpg"], "test": ["e1.jpg"]}
    (root / "text").mkdir(parents=True)
    lines = []
    for split, names in ids.items():
        (root / "text" / f"{prefix}.{split}Images.txt").write_text("\n".join(names) + "\n")
        for n in names:
            _png(root / "images" / n)
            lines += [f"{n}#{k}\t{split} caption {k} ." for k in range(5)]
    lines.append("odd.jpg.1#0\tpeople waiting for the subway")
    (root / "text" / token_name).write_text("\n".join(lines) + "\n")
    return root


def test_load_flickr(tmp_path):
    root = _flickr(tmp_path / "f8k")
    train = load_flickr(root, "train")
    assert train.image_ids == ["t1.jpg", "t2.jpg"] and train.name == "train"
    assert train.captions[1][4] == "train caption 4 ." and train.stats["lines_outside_split"] == 11
    assert load_flickr(root, "val").image_ids == ["d1.jpg"]


def test_load_flickr30k_token_name(tmp_path):
    root = _flickr(tmp_path / "f30k", token_name="results_20130124.token", prefix="Flickr_30k")
    assert load_flickr(root, "test").captions[0][0] == "test caption 0 ."


def test_load_flickr_errors(tmp_path):
    with pytest.raises(InputError, match="folder not found"):
        load_flickr(tmp_path / "nope", "test")
    root = _flickr(tmp_path / "f")
    (root / "text" / "Flickr_8k.testImages.txt").unlink()
    with pytest.raises(InputError, match=r"no list of the 'test' split .*Flickr_8k.testImages.txt"):
        load_flickr(root, "test")
    (root / "text" / "Flickr8k.token.txt").unlink()
    with pytest.raises(InputError, match="no caption token file"):
        load_flickr(root, "train")


def _karpathy(tmp_path: Path, coco: bool = False) -> tuple[Path, Path]:
    images = tmp_path / "imgs"
    entries = []
    for i, split in enumerate(["train", "restval", "val", "test", "test"]):
        sub = ("train2014" if split == "train" else "val2014") if coco else ""
        name = f"im{i}.jpg"
        _png(images / sub / name)
        n = 7 if i == 3 else 5  # COCO images sometimes have more than 5
        entry = {"split": split, "filename": name, "sentences": [{"raw": f" {name} says {j} "} for j in range(n)]}
        if coco:
            entry["filepath"] = sub
        entries.append(entry)
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco" if coco else "flickr8k"}))
    return path, images


@pytest.mark.parametrize("coco", [False, True])
def test_load_karpathy(tmp_path, coco):
    path, images = _karpathy(tmp_path, coco)
    train = load_karpathy(path, images, "train")
    assert train.image_ids == ["im0.jpg", "im1.jpg"]  # restval belongs to train
    assert load_karpathy(path, images, "dev").image_ids == ["im2.jpg"]
    test = load_karpathy(path, images, "test")
    assert test.image_ids == ["im3.jpg", "im4.jpg"] and test.stats["sentences_dropped"] == 2
    assert test.captions[0] == [f"im3.jpg says {j}" for j in range(5)]
    if coco:
        assert test.image_paths[0] == images / "val2014" / "im3.jpg"


def test_load_karpathy_errors(tmp_path):
    path, images = _karpathy(tmp_path)
    data = json.loads(path.read_text())
    data["images"][4]["sentences"] = data["images"][4]["sentences"][:4]
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"images\[4\] \('im4.jpg'\): 4 sentences, at least 5"):
        load_karpathy(path, images, "test")
    data["images"][4]["sentences"][1] = {"raw": "  "}
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"images\[4\].sentences\[1\] \('im4.jpg'\): missing or empty 'raw'"):
        load_karpathy(path, images, "test")
    (images / "im2.jpg").unlink()
    with pytest.raises(InputError, match=r"images\[2\]: image 'im2.jpg' not found"):
        load_karpathy(path, images, "dev")
    path.write_text('{"images": [\n  {"split": "test",}\n]}')
    with pytest.raises(InputError, match=r"dataset.json:2: invalid JSON"):
        load_karpathy(path, images, "test")
    path.write_text('{"pictures": []}')
    with pytest.raises(InputError, match="'images' list"):
        load_karpathy(path, images, "test")
    with pytest.raises(InputError, match="unknown split 'holdout'"):
        load_karpathy(path, images, "holdout")


def _images(root: Path, names) -> Path:
    for n in names:
        _png(root / n)
    return root


def test_caption_table_csv(tmp_path):
    images = _images(tmp_path / "images", ["a.png", "b.png"])
    rows = ["caption,image,extra"] + [f'"a dog, running {k}",a.png,x' for k in range(6)] + [
        f"cat {k},b.png,y" for k in range(5)]
    table = tmp_path / "caps.csv"
    table.write_text("\n".join(rows) + "\n")
    s = load_caption_table(images, table)
    assert s.image_ids == ["a.png", "b.png"] and s.name == "caps"
    assert s.captions[0][0] == "a dog, running 0" and s.stats["captions_dropped"] == 1
    split = tmp_path / "mine.txt"
    split.write_text("b.png\n")
    assert load_caption_table(images, table, split).image_ids == ["b.png"]


def test_caption_table_jsonl(tmp_path):
    images = _images(tmp_path / "images", ["a.png", "b.png"])
    lines = [json.dumps({"image": "a.png", "captions": [f"a {k}" for k in range(5)]})] + [
        json.dumps({"image": "b.png", "caption": f"b {k}"}) for k in range(5)]
    table = tmp_path / "caps.jsonl"
    table.write_text("\n".join(lines) + "\n\n")
    s = load_caption_table(images, table)
    assert s.captions == [[f"a {k}" for k in range(5)], [f"b {k}" for k in range(5)]]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("t.csv", "img,text\na.png,x\n", r"t.csv:1: the header must name the columns 'image' and 'caption'"),
        ("t.csv", "image,caption\n" + "a.png,x\n" * 4 + "a.png\n", r"t.csv:6: 1 columns, expected 2"),
        ("t.csv", "image,caption\n" + "a.png,x\n" * 3 + "a.png, \n", r"t.csv:5: empty caption for image 'a.png'"),
        ("t.csv", "image,caption\n" + "a.png,x\n" * 4, r"t.csv:2: image 'a.png' has 4 captions, at least 5"),
        ("t.csv", "image,caption\n" + "zz.png,x\n" * 5, r"t.csv:2: image 'zz.png' not found"),
        ("t.jsonl", '{"image": "a.png", "caption": "x"}\n{"image": "a.png", caption}\n', r"t.jsonl:2: invalid JSON"),
        ("t.jsonl", '{"image": "a.png"}\n', r"t.jsonl:1: needs 'caption'"),
        ("t.jsonl", '{"img": "a.png", "caption": "x"}\n', r"t.jsonl:1: expected an object with an 'image'"),
        ("t.txt", "a.png x\n", "unknown table format"),
    ],
)
def test_caption_table_errors(tmp_path, name, content, message):
    images = _images(tmp_path / "images", ["a.png"])
    (tmp_path / name).write_text(content)
    with pytest.raises(InputError, match=message):
        load_caption_table(images, tmp_path / name)


def test_caption_table_split_without_captions(tmp_path):
    images = _images(tmp_path / "images", ["a.png"])
    (tmp_path / "t.csv").write_text("image,caption\n" + "a.png,x\n" * 5)
    (tmp_path / "s.txt").write_text("a.png\nb.png\n")
    with pytest.raises(InputError, match=r"s.txt: image 'b.png' has no captions"):
        load_caption_table(images, tmp_path / "t.csv", tmp_path / "s.txt")


def test_load_dataset_dispatch(tmp_path):
    scenes = generate_scenes(tmp_path / "scenes", n_train=3, n_dev=2, n_test=2, image_size=32, progress=False)
    assert len(load_dataset("scenes", scenes, "test")) == 2
    assert len(load_dataset("flickr", _flickr(tmp_path / "f8k"), "train")) == 2
    path, images = _karpathy(tmp_path)
    assert len(load_dataset("karpathy", images, "test", json_path=path)) == 2
    with pytest.raises(ConfigError, match="karpathy_json"):
        load_dataset("karpathy", images, "test")
    folder = tmp_path / "folder"
    _images(folder / "images", ["a.png", "b.png"])
    (folder / "captions.csv").write_text("image,caption\n" + "".join(f"{i},c {k}\n" for i in ("a.png", "b.png")
                                                                   for k in range(5)))
    assert len(load_dataset("folder", folder, "all")) == 2
    with pytest.raises(InputError, match="no split list"):
        load_dataset("folder", folder, "test")
    (folder / "splits").mkdir()
    (folder / "splits" / "dev.txt").write_text("b.png\n")
    assert load_dataset("folder", folder, "val").image_ids == ["b.png"]
    with pytest.raises(ConfigError, match="unknown dataset kind 'coco'"):
        load_dataset("coco", folder, "test")


def test_real_flickr8k_test_split():
    root = SHARED / "data" / "flickr8k"
    if not (root / "text" / "Flickr8k.token.txt").is_file():
        pytest.skip(f"real Flickr8k not available at {root} (only beside the development checkout)")
    s = load_flickr(root, "test")
    assert len(s) == 1000 and len(s.flat_captions()) == 5000
    assert all(len(c) == 5 for c in s.captions)
    assert "2258277193_586949ec62.jpg" not in s.image_ids
