"""CaptionedSplit contract and the Flickr token-format reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfalign.data.captions import CaptionedSplit, load_token_dataset, read_json
from selfalign.errors import InputError


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    return path


def _fixture(tmp_path: Path, ids=("a.jpg", "b.jpg", "c.jpg"), split=("a.jpg", "b.jpg")) -> tuple[Path, Path, Path]:
    images = tmp_path / "images"
    for i in ids:
        _png(images / i)
    lines = [f"{i}#{k}\t  caption {k} of {i}  " for i in ids for k in range(5)]
    caps = tmp_path / "captions.txt"
    caps.write_text("\n".join(lines) + "\n", encoding="utf-8")
    split_file = tmp_path / "split.txt"
    split_file.write_text("".join(s + "\n" for s in split), encoding="utf-8")
    return caps, split_file, images


def _split(tmp_path: Path, n: int = 2) -> CaptionedSplit:
    ids = [f"im{i}.png" for i in range(n)]
    paths = [_png(tmp_path / i) for i in ids]
    return CaptionedSplit("s", ids, paths, [[f"cap {i} {k}" for k in range(5)] for i in range(n)], None)


def test_flat_captions_order_and_len(tmp_path):
    s = _split(tmp_path, 3)
    assert len(s) == 3
    flat = s.flat_captions()
    assert len(flat) == 15
    for j, cap in enumerate(flat):
        assert cap == f"cap {j // 5} {j % 5}"  # caption j belongs to image j // 5
    assert s.validate() is s


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.captions[1].pop(), "has 4 captions"),
        (lambda s: s.captions[0].__setitem__(2, "   "), "caption 2 of image 'im0.png' is empty"),
        (lambda s: s.image_ids.__setitem__(1, "im0.png"), "appears twice"),
        (lambda s: s.image_paths[1].unlink(), "image file for 'im1.png' not found"),
        (lambda s: setattr(s, "boxes", [np.zeros((2, 4), np.float32), np.zeros((3,), np.float32)]), "shape"),
        (lambda s: setattr(s, "boxes", [np.zeros((2, 4), np.float32)]), "box arrays"),
    ],
)
def test_validate_errors(tmp_path, mutate, message):
    s = _split(tmp_path)
    mutate(s)
    with pytest.raises(InputError, match=message):
        s.validate()


def test_load_token_dataset(tmp_path):
    caps, split_file, images = _fixture(tmp_path)
    s = load_token_dataset(caps, split_file, images)
    assert s.image_ids == ["a.jpg", "b.jpg"]
    assert s.image_paths == [images / "a.jpg", images / "b.jpg"]
    assert s.captions[1] == [f"caption {k} of b.jpg" for k in range(5)]  # stripped, inner text kept
    assert s.stats["lines_outside_split"] == 5  # c.jpg is not in the split
    assert s.name == "split" and s.boxes is None


def test_caption_order_follows_index_and_non_ascii(tmp_path):
    _png(tmp_path / "images" / "x.jpg")
    lines = [f"x.jpg#{k}\tcafé №{k} 狗" for k in (3, 1, 0, 4, 2)]
    (tmp_path / "c.txt").write_text("\ufeff" + "\r\n".join(lines), encoding="utf-8")  # BOM and CRLF tolerated
    (tmp_path / "s.txt").write_text("x.jpg\n\n", encoding="utf-8")
    s = load_token_dataset(tmp_path / "c.txt", tmp_path / "s.txt", tmp_path / "images", name="mine")
    assert s.captions[0] == [f"café №{k} 狗" for k in range(5)] and s.name == "mine"


def test_flickr_quirk_line_outside_split_is_ignored(tmp_path):
    caps, split_file, images = _fixture(tmp_path)
    with open(caps, "a", encoding="utf-8") as fh:
        fh.write("q.jpg.1#0\tpeople waiting\n")  # Flickr8k's bogus line; q.jpg has only 4 captions
        fh.writelines(f"q.jpg#{k}\tx\n" for k in range(1, 5))
    s = load_token_dataset(caps, split_file, images)
    assert len(s) == 2 and s.stats["lines_outside_split"] == 10


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("a.jpg#0 no tab here", r"captions.txt:16: .*no tab"),
        ("a.jpg\tno index", r"captions.txt:16: expected 'IMAGE#k'"),
        ("a.jpg#x\tbad index", r"captions.txt:16: caption index .* 'x'"),
        ("a.jpg#2\tagain", r"captions.txt:16: caption #2 of image 'a.jpg' appears twice \(first on line 3\)"),
        ("b.jpg#7\tsix", r"captions.txt:6: image 'b.jpg' has 6 captions"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, bad_line, message):
    caps, split_file, images = _fixture(tmp_path)
    with open(caps, "a", encoding="utf-8") as fh:
        fh.write(bad_line + "\n")
    with pytest.raises(InputError, match=message):
        load_token_dataset(caps, split_file, images)


def test_empty_caption_and_missing_caption(tmp_path):
    caps, split_file, images = _fixture(tmp_path)
    text = caps.read_text(encoding="utf-8").replace("b.jpg#3\t  caption 3 of b.jpg  ", "b.jpg#3\t   ")
    caps.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=r"captions.txt:9: empty caption for image 'b.jpg'"):
        load_token_dataset(caps, split_file, images)
    caps.write_text("\n".join(ln for ln in text.splitlines() if not ln.startswith("b.jpg#3")), encoding="utf-8")
    with pytest.raises(InputError, match=r"image 'b.jpg' has 4 captions \(indices \[0, 1, 2, 4\]\)"):
        load_token_dataset(caps, split_file, images)


def test_split_id_without_captions_and_missing_image(tmp_path):
    caps, split_file, images = _fixture(tmp_path, split=("a.jpg", "zzz.jpg"))
    with pytest.raises(InputError, match=r"split.txt: image 'zzz.jpg' has no captions"):
        load_token_dataset(caps, split_file, images)
    split_file.write_text("a.jpg\nb.jpg\n", encoding="utf-8")
    (images / "b.jpg").unlink()
    with pytest.raises(InputError, match=r"image 'b.jpg' not found at .*b.jpg"):
        load_token_dataset(caps, split_file, images)


def test_split_file_errors(tmp_path):
    caps, split_file, images = _fixture(tmp_path, split=("a.jpg", "b.jpg", "a.jpg"))
    with pytest.raises(InputError, match=r"split.txt:3: image id 'a.jpg' is listed twice \(first on line 1\)"):
        load_token_dataset(caps, split_file, images)
    split_file.write_text("\n \n", encoding="utf-8")
    with pytest.raises(InputError, match="lists no image ids"):
        load_token_dataset(caps, split_file, images)
    split_file.write_text("a.jpg\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"file not found: .*nope.txt"):
        load_token_dataset(tmp_path / "nope.txt", split_file, images)
    caps.write_bytes(b"a.jpg#0\t\xff\xfe bad\n")
    with pytest.raises(InputError, match="not valid UTF-8"):
        load_token_dataset(caps, split_file, images)


def test_boxes_file(tmp_path):
    caps, split_file, images = _fixture(tmp_path)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"a.jpg": [[0, 0, 4, 4], [1, 2, 3, 4]], "b.jpg": []}), encoding="utf-8")
    s = load_token_dataset(caps, split_file, images, boxes_file=boxes)
    assert s.boxes[0].dtype == np.float32 and s.boxes[0].shape == (2, 4) and s.boxes[1].shape == (0, 4)
    np.testing.assert_array_equal(s.boxes[0][1], [1, 2, 3, 4])
    boxes.write_text(json.dumps({"a.jpg": [[0, 0, 4, 4]]}), encoding="utf-8")
    with pytest.raises(InputError, match=r"boxes.json: no boxes for image 'b.jpg'"):
        load_token_dataset(caps, split_file, images, boxes_file=boxes)
    boxes.write_text('{"a.jpg": [[0, 0, 4]],\n "b.jpg": [[1, 2, 3, 4]]}', encoding="utf-8")
    with pytest.raises(InputError, match=r"boxes of 'a.jpg' are not a list"):
        load_token_dataset(caps, split_file, images, boxes_file=boxes)
    boxes.write_text('{"a.jpg": \n [[0, 0, 4, 4]', encoding="utf-8")
    with pytest.raises(InputError, match=r"boxes.json:2: invalid JSON"):
        load_token_dataset(caps, split_file, images, boxes_file=boxes)


def test_read_json_names_the_file_and_line(tmp_path):
    good = tmp_path / "ok.json"
    good.write_text('{"a": [1, 2]}', encoding="utf-8")
    assert read_json(good) == {"a": [1, 2]}
    with pytest.raises(InputError, match=r"boxes file not found: .*missing.json"):
        read_json(tmp_path / "missing.json", "boxes file")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n"a": [1,\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.json:3: invalid JSON"):
        read_json(bad)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"caf\xe9": 1}')
    with pytest.raises(InputError, match=r"latin.json: not valid UTF-8 text \(byte 5\)"):
        read_json(latin)
