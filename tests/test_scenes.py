"""The built-in scenes dataset: layout on disk, determinism, caching, caption truth and hard-negative groups."""

from __future__ import annotations

import collections
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfalign.data.scenes import generate_scenes, load_scenes
from selfalign.data.scenes_facts import caption_holds, check_fact, relation_holds
from selfalign.data.scenes_grammar import PLURALS, SHAPE_NOUNS, SIZE_WORDS, scene_captions
from selfalign.data.scenes_layout import LARGE_R, SMALL_R, plan_split
from selfalign.data.scenes_render import PALETTE, SceneObject
from selfalign.errors import InputError

TINY = dict(n_train=20, n_dev=5, n_test=5, image_size=64, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return generate_scenes(tmp_path_factory.mktemp("scenes") / "data", **TINY)


def _objects(ann: dict) -> list[SceneObject]:
    return [SceneObject(o["shape"], o["color"], o["size"], o["center"][0], o["center"][1], o["radius"], 0.0, (0, 0, 0))
            for o in ann["objects"]]


def _annotations(root: Path) -> dict:
    return json.loads((root / "annotations.json").read_text(encoding="utf-8"))


def test_layout_and_meta_written_last(tiny):
    for name in ("captions.txt", "boxes.json", "annotations.json", "meta.json", "splits/train.txt", "splits/dev.txt",
                 "splits/test.txt"):
        assert (tiny / name).is_file(), name
    assert sorted(p.name for p in (tiny / "images").iterdir())[:2] == ["scene_000000.png", "scene_000001.png"]
    meta = json.loads((tiny / "meta.json").read_text())
    assert meta["params"] == {"n_train": 20, "n_dev": 5, "n_test": 5, "seed": 0, "image_size": 64}
    assert meta["counts"]["images"] == 30 and meta["counts"]["captions"] == 150
    last = (tiny / "meta.json").stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= last for p in tiny.rglob("*") if p.is_file())
    assert not [p for p in tiny.parent.iterdir() if p.name.startswith(".data.")]  # no temp folders left


def test_load_scenes_splits_and_boxes(tiny):
    ann = _annotations(tiny)
    seen = set()
    for split, n in (("train", 20), ("dev", 5), ("test", 5)):
        s = load_scenes(tiny, split)
        assert len(s) == n and len(s.flat_captions()) == 5 * n and s.name == split
        seen |= set(s.image_ids)
        for image_id, path, boxes in zip(s.image_ids, s.image_paths, s.boxes):
            objs = ann[image_id]["objects"]
            assert 2 <= len(objs) <= 6 and boxes.shape == (len(objs), 4)
            np.testing.assert_allclose(boxes, [o["box"] for o in objs])
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert boxes.min() >= 0 and boxes.max() <= 64
            assert Image.open(path).size == (64, 64)
    assert len(seen) == 30
    assert load_scenes(tiny, "val").name == "dev"


def test_load_scenes_errors(tiny, tmp_path):
    with pytest.raises(InputError, match="unknown split 'holdout'"):
        load_scenes(tiny, "holdout")
    with pytest.raises(InputError, match="meta.json missing"):
        load_scenes(tmp_path, "train")


def test_deterministic_and_seed_dependent(tiny, tmp_path):
    again = generate_scenes(tmp_path / "again", **TINY)
    assert (again / "captions.txt").read_bytes() == (tiny / "captions.txt").read_bytes()
    assert (again / "boxes.json").read_bytes() == (tiny / "boxes.json").read_bytes()
    for name in ("scene_000000.png", "scene_000029.png"):
        a, b = np.asarray(Image.open(again / "images" / name)), np.asarray(Image.open(tiny / "images" / name))
        np.testing.assert_array_equal(a, b)
    other = generate_scenes(tmp_path / "other", **{**TINY, "seed": 1})
    assert (other / "captions.txt").read_bytes() != (tiny / "captions.txt").read_bytes()


def test_test_split_does_not_depend_on_train_size(tiny, tmp_path):
    bigger = generate_scenes(tmp_path / "bigger", **{**TINY, "n_train": 24})
    caps = lambda root: [c for i in load_scenes(root, "test").captions for c in i]  # noqa: E731
    assert caps(bigger) == caps(tiny)


def test_cached_then_regenerated_with_new_params(tmp_path):
    root = generate_scenes(tmp_path / "d", **{**TINY, "n_train": 6, "n_dev": 2, "n_test": 2})
    stamp = (root / "meta.json").stat().st_mtime_ns
    assert generate_scenes(root, **{**TINY, "n_train": 6, "n_dev": 2, "n_test": 2}) == root
    assert (root / "meta.json").stat().st_mtime_ns == stamp  # cached: nothing rewritten
    generate_scenes(root, **{**TINY, "n_train": 7, "n_dev": 2, "n_test": 2})
    assert len(load_scenes(root, "train")) == 7
    assert len(list((root / "images").iterdir())) == 11  # the old images went with the old folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="refusing to overwrite"):
        generate_scenes(tmp_path / "mine", **TINY)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(InputError, match="n_dev must be an integer >= 1"):
        generate_scenes(tmp_path / "x", **{**TINY, "n_dev": 0})


def test_pixels_show_the_objects(tiny):
    """The colour at each filled object's centre is its palette colour (what the captions call it)."""
    ann = _annotations(tiny)
    checked = 0
    for image_id, a in list(ann.items())[:10]:
        img = np.asarray(Image.open(tiny / "images" / image_id).convert("RGB")).astype(int)
        for o in a["objects"]:
            if o["shape"] == "ring":
                continue
            x, y = (int(v * 64) for v in o["center"])
            assert np.abs(img[y, x] - np.array(PALETTE[o["color"]])).max() <= 20, (image_id, o)
            checked += 1
    assert checked >= 20


def test_captions_are_true_distinct_and_mentions_match(tiny):
    ann = _annotations(tiny)
    colour_words = set(PALETTE)
    shape_of = {w: s for s, ws in SHAPE_NOUNS.items() for n in ws for w in (n, PLURALS.get(n, n + "s"))}
    lines = (tiny / "captions.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 150
    for image_id, a in ann.items():
        objs = _objects(a)
        texts = [c["text"] for c in a["captions"]]
        assert len(set(texts)) == 5
        assert [ln.split("\t")[1] for ln in lines if ln.startswith(image_id + "#")] == texts
        for c in a["captions"]:
            assert all(check_fact(objs, f) for f in c["facts"]), c
            assert caption_holds(objs, c["facts"])
            toks = c["text"].split(" ")
            for t, w in enumerate(toks):  # every colour and shape word is tied to an object
                if w in colour_words or w in shape_of:
                    assert any(m["token"] == t for m in c["mentions"]), (c["text"], w)
            for m in c["mentions"]:
                assert toks[m["token"]] == m["word"] and c["text"][m["start"]:].startswith(m["word"])
                obj = a["objects"][m["object"]]
                if m["kind"] == "color":
                    assert m["word"] == obj["color"]
                elif m["kind"] == "shape":
                    assert shape_of[m["word"]] == obj["shape"]
                else:
                    assert m["word"] in SIZE_WORDS[obj["size"]]


def test_groups_stay_in_one_split_and_confuse_bag_of_words(tiny):
    ann = _annotations(tiny)
    groups = collections.defaultdict(list)
    for image_id, a in ann.items():
        if a["group"] is not None:
            groups[a["group"]].append(image_id)
    assert groups
    for members in groups.values():
        assert len(members) >= 2 and len({ann[m]["split"] for m in members}) == 1
        bags = {m: sorted((o["shape"], o["color"], o["size"]) for o in ann[m]["objects"]) for m in members}
        shapes = {m: sorted(o["shape"] for o in ann[m]["objects"]) for m in members}
        colours = {m: sorted(o["color"] for o in ann[m]["objects"]) for m in members}
        assert len({tuple(v) for v in shapes.values()}) == 1 and len({tuple(v) for v in colours.values()}) == 1
        layouts = {m: sorted((o["shape"], o["color"], tuple(o["center"])) for o in ann[m]["objects"]) for m in members}
        assert len({tuple(v) for v in layouts.values()}) == len(members)  # members really differ
        if ann[members[1]]["variant"] == "spatial":
            assert len({tuple(v) for v in bags.values()}) == 1
        for m in members:  # a caption identifies its own image within the group
            for c in ann[m]["captions"]:
                if not c.get("shared"):
                    assert not any(caption_holds(_objects(ann[o]), c["facts"]) for o in members if o != m)


def test_planned_statistics():
    """Without rendering: hard-negative share, sizes, backgrounds far from object colours, paraphrase variety."""
    scenes = plan_split(random.Random("stats"), 400, "train")
    share = sum(s.group is not None for s in scenes) / len(scenes)
    assert 0.35 <= share <= 0.55
    radii = collections.defaultdict(list)
    for s in scenes:
        for o in s.objects:
            radii[o.size].append(o.r)
            for c in s.background["colors"]:
                assert sum((a - b) ** 2 for a, b in zip(c, o.rgb)) ** 0.5 > 60
    assert max(radii["small"]) < 1.2 * SMALL_R and min(radii["large"]) > 0.9 * LARGE_R
    assert {s.background["kind"] for s in scenes} == {"solid", "gradient", "stripes", "noise", "clouds"}
    vocab = collections.Counter()
    starts = collections.Counter()
    for k, s in enumerate(scenes[:150]):
        for c in scene_captions(random.Random(k), s.objects, s.background):
            vocab.update(c["text"].split())
            starts[" ".join(c["text"].split()[:2])] += 1
    for w in ("box", "block", "disc", "dot", "little", "tiny", "big", "left", "right", "above", "below", "two",
              "three", "there", "image", "picture", "background", "next", "beside"):
        assert vocab[w] > 0, w
    assert len(starts) > 40  # many different openings, not one template


def test_relations_have_margins():
    a = SceneObject("circle", "red", "small", 0.2, 0.5, SMALL_R, 0, (0, 0, 0))
    b = SceneObject("square", "blue", "small", 0.6, 0.55, SMALL_R, 0, (0, 0, 0))
    c = SceneObject("star", "green", "small", 0.25, 0.52, SMALL_R, 0, (0, 0, 0))
    objs = [a, b, c]
    assert relation_holds(objs, 0, 1, "left") and relation_holds(objs, 1, 0, "right")
    assert not relation_holds(objs, 0, 1, "above") and not relation_holds(objs, 0, 2, "left")  # too close to tell
    assert relation_holds(objs, 0, 2, "next") and not relation_holds(objs, 0, 1, "next")


def test_parallel_rendering_matches_serial(tiny, tmp_path):
    par = generate_scenes(tmp_path / "par", **TINY, workers=2)
    assert (par / "captions.txt").read_bytes() == (tiny / "captions.txt").read_bytes()
    assert (par / "annotations.json").read_bytes() == (tiny / "annotations.json").read_bytes()
    for name in ("scene_000003.png", "scene_000027.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(par / "images" / name)),
                                      np.asarray(Image.open(tiny / "images" / name)))


def test_failed_generation_leaves_old_dataset(tmp_path, monkeypatch):
    root = generate_scenes(tmp_path / "d", **{**TINY, "n_train": 3, "n_dev": 2, "n_test": 2})
    before = (root / "captions.txt").read_bytes()

    def boom(job):
        raise RuntimeError("disk full")

    monkeypatch.setattr("selfalign.data.scenes._build_one", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_scenes(root, **{**TINY, "n_train": 4, "n_dev": 2, "n_test": 2})
    assert (root / "captions.txt").read_bytes() == before and (root / "meta.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
