"""Gallery: build from a dataset split or a folder, add, search (text / image / captions), explain, safety."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfalign.config import load_config
from selfalign.data.precomp import load_feature_split
from selfalign.errors import InputError
from selfalign.evaluate.runner import encode_captions, encode_images
from selfalign.data.batches import RegionStore
from selfalign.index import gallery_build
from selfalign.index.gallery import Gallery, read_manifest
from selfalign.index.gallery_build import build_demo_index, build_gallery
from selfalign.index.gallery_regions import plan_regions
from selfalign.model.checkpoint import load_model


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def gallery(tiny_gallery) -> Gallery:
    return Gallery.load(tiny_gallery)


@pytest.fixture(scope="module")
def image_folder(tiny_scenes_run, tmp_path_factory) -> Path:
    """Six test images, one corrupt PNG and a text file, in a nested folder."""
    folder = tmp_path_factory.mktemp("folder") / "photos"
    (folder / "sub").mkdir(parents=True)
    images = sorted((tiny_scenes_run["root"] / "images").glob("*.png"))[-6:]
    for i, path in enumerate(images):
        shutil.copy(path, folder / ("sub" if i % 2 else "") / path.name)
    data = images[0].read_bytes()
    (folder / "broken.png").write_bytes(data[: len(data) // 3])
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(data)  # hidden files are not indexed
    return folder


@pytest.fixture(scope="module")
def folder_gallery(tiny_scenes_run, image_folder, tmp_path_factory) -> tuple[Path, gallery_build.BuildReport]:
    out = tmp_path_factory.mktemp("fg") / "gallery"
    return out, build_gallery(tiny_scenes_run["run_dir"], out, image_folder, progress=False)


def test_dataset_gallery_layout_and_manifest(tiny_gallery, tiny_scenes_run):
    manifest = read_manifest(tiny_gallery)
    assert manifest["images"] == 8 and manifest["captions"] == 40 and manifest["backend"] == "faiss"
    assert manifest["run_dir"] == str(Path(tiny_scenes_run["run_dir"]).resolve())
    assert manifest["query_regions"]["trained"] == "boxes"
    records = [json.loads(line) for line in (tiny_gallery / "images.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == list(range(8))
    assert all(Path(r["path"]).is_absolute() and Path(r["path"]).is_file() for r in records)
    regions = np.load(tiny_gallery / "regions.npy")
    assert regions.dtype == np.float16 and regions.shape[0] == 8 and regions.shape[2] == 1280
    assert all(r["boxes"][0] == [0.0, 0.0, 1.0, 1.0] for r in records)  # region 0 is the whole image
    assert not list(tiny_gallery.parent.glob(".gallery.tmp-*"))


def test_text_search_matches_brute_force(gallery, tiny_scenes_run):
    """The index returns exactly what one matrix product over the store's embeddings ranks first."""
    model, _ = load_model(tiny_scenes_run["run_dir"])
    split = load_feature_split(tiny_scenes_run["features"], "test")
    images = encode_images(model, RegionStore(split.images, split.region_mask()))
    query = split.captions[10]
    scores = (encode_captions(model, [query]) @ images.T)[0]
    expected = torch.argsort(scores, descending=True)[:5].tolist()
    hits = gallery.search_text(query, k=5)
    assert [split.image_ids[i] for i in expected] == [h["image_id"] for h in hits]
    assert np.allclose([h["score"] for h in hits], scores[expected].numpy(), atol=1e-4)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert len(gallery.search_text(query, k=50)) == 8  # fewer images than k: all of them, no padding


def test_image_to_captions_and_images(gallery):
    path = gallery.image_path(3)
    caps = gallery.search_image(path, k=7, target="captions")
    assert len(caps) == 7 and all(set(c) == {"id", "text", "image", "image_id", "score"} for c in caps)
    assert all(0 <= c["image"] < 8 for c in caps)
    images = gallery.search_image(Image.open(path), k=3)
    assert len(images) == 3 and {"id", "image_id", "score"} == set(images[0])


def test_explain_boxes_come_from_the_stored_regions(gallery):
    out = gallery.explain("a red circle and a blue square", 2)
    record = gallery.record(2)
    assert [w["word"] for w in out["words"]] == ["a", "red", "circle", "and", "a", "blue", "square"]
    for word in out["words"]:
        assert 1 <= word["region"] < len(record["boxes"])  # the whole image (region 0) is not an answer
        assert word["box"] == pytest.approx(record["boxes"][word["region"]], abs=1e-4)
        assert -1.0 <= word["score"] <= 1.0
    # both occurrences of "a" are the same context-free word: same region, same score
    assert out["words"][0]["region"] == out["words"][4]["region"]
    assert out["score"] == pytest.approx(gallery.search_text("a red circle and a blue square", 8)[
        [h["id"] for h in gallery.search_text("a red circle and a blue square", 8)].index(2)]["score"], abs=1e-4)


def test_bad_queries(gallery):
    with pytest.raises(InputError, match="empty"):
        gallery.search_text("   ")
    with pytest.raises(InputError, match="k must be"):
        gallery.search_text("red", k=0)
    with pytest.raises(InputError, match="unknown image id"):
        gallery.explain("red", 99)
    with pytest.raises(InputError, match="target"):
        gallery.search_image(gallery.image_path(0), target="words")
    with pytest.raises(InputError, match="cannot read image"):
        gallery.search_image(gallery.directory / "gallery.json")


def test_folder_gallery_skips_unreadable_files(folder_gallery, image_folder):
    out, report = folder_gallery
    assert report.added == 6 and report.total == 6 and report.captions == 0
    assert sorted(Path(p).name for p, _ in report.skipped) == ["broken.png", "notes.txt"]
    assert any("regions differ from training" in w for w in report.warnings)
    gallery = Gallery.load(out)
    ids = sorted(r["image_id"] for r in gallery.images)
    assert any(i.startswith("sub/") for i in ids) and ".hidden.png" not in ids
    with pytest.raises(InputError, match="no captions"):
        gallery.search_image(gallery.image_path(0), target="captions")
    # grid regions for queries too: a gallery image finds itself first
    for gid in (0, 4):
        assert gallery.search_image(gallery.image_path(gid), k=1)[0]["id"] == gid


def test_add_appends_without_touching_old_images(tiny_scenes_run, image_folder, tmp_path):
    run = tiny_scenes_run["run_dir"]
    out = tmp_path / "g"
    build_gallery(run, out, image_folder / "sub", progress=False)
    before = Gallery.load(out)
    old = {r["id"]: r["path"] for r in before.images}
    old_hits = before.search_text("a green star", 3)
    report = build_gallery(run, out, image_folder, add=True, progress=False)
    assert report.added == 3 and report.already_indexed == 3 and report.total == 6
    after = Gallery.load(out)
    assert {r["id"]: r["path"] for r in after.images if r["id"] in old} == old
    assert sorted(r["id"] for r in after.images) == list(range(6))
    hits = after.search_text("a green star", 6)
    assert all(h in hits for h in old_hits)  # old vectors kept as they were
    again = build_gallery(run, out, image_folder, add=True, progress=False)
    assert again.added == 0 and again.already_indexed == 6
    # captions of a dataset split can join a folder gallery
    build_gallery(run, out, dataset="scenes", root=tiny_scenes_run["root"], split="dev", add=True, progress=False)
    mixed = Gallery.load(out)
    assert len(mixed) == 14 and len(mixed.captions) == 40
    assert all(c["image"] >= 6 for c in mixed.captions)


def test_failed_build_leaves_the_old_gallery(tiny_scenes_run, image_folder, tmp_path, monkeypatch):
    out = tmp_path / "g"
    build_gallery(tiny_scenes_run["run_dir"], out, image_folder / "sub", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gallery_build, "_append_vectors", crash)
    with pytest.raises(RuntimeError):
        build_gallery(tiny_scenes_run["run_dir"], out, image_folder, add=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_model_mismatch_and_damaged_gallery(tiny_scenes_run, tiny_gallery, tmp_path):
    run_copy = tmp_path / "run"
    shutil.copytree(tiny_scenes_run["run_dir"], run_copy)
    (run_copy / "config.json").write_text((run_copy / "config.json").read_text() + "\n")
    with pytest.raises(InputError, match="not the one this gallery was built with"):
        Gallery.load(tiny_gallery, run_dir=str(run_copy))
    with pytest.raises(InputError, match="another model"):
        build_gallery(run_copy, tiny_gallery, tiny_scenes_run["root"] / "images", add=True, progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_gallery, broken)
    (broken / "gallery.json").write_text("{not json")
    with pytest.raises(InputError, match="gallery.json"):
        Gallery.load(broken)
    with pytest.raises(InputError, match="not a gallery"):
        build_gallery(tiny_scenes_run["run_dir"], tiny_scenes_run["root"], dataset="scenes",
                      root=tiny_scenes_run["root"], progress=False)
    with pytest.raises(InputError, match="either an image folder or a dataset"):
        build_gallery(tiny_scenes_run["run_dir"], tmp_path / "x", progress=False)


def test_region_plan_follows_training(tiny_scenes_run, tmp_path):
    cfg = load_config(None, [f"data.features={tmp_path / 'none'}", "data.regions=grid", "data.image_size=96"])
    plan = plan_regions(cfg)
    assert (plan.mode, plan.image_size, plan.warning) == ("grid", 96, "")
    boxes = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, regions="boxes"))
    assert plan_regions(boxes).mode == "grid" and "differ from training" in plan_regions(boxes).warning
    detector = tmp_path / "yolox_nano.onnx"
    detector.write_bytes(b"x")
    with_detector = dataclasses.replace(boxes, data=dataclasses.replace(boxes.data, detector_path=str(detector)))
    assert plan_regions(with_detector).mode == "detector"
    stored = load_config(None, [f"data.features={tiny_scenes_run['features']}", "data.regions=grid"])
    assert plan_regions(stored).trained == "boxes"  # the store's meta.json wins over the config


def test_demo_index(tiny_scenes_run, tmp_path):
    command = build_demo_index(tiny_scenes_run["run_dir"], tiny_scenes_run["root"], tmp_path / "demo", device="cpu")
    assert command == f"selfalign serve {(tmp_path / 'demo').resolve()}"
    assert read_manifest(tmp_path / "demo")["images"] == 8


def test_milvus_backend_gives_the_same_results(tiny_scenes_run, gallery, tmp_path):
    pytest.importorskip("pymilvus", reason="the milvus extra (pymilvus, milvus-lite) is not installed")
    pytest.importorskip("milvus_lite", reason="milvus-lite is not installed")
    out = tmp_path / "mg"
    build_gallery(tiny_scenes_run["run_dir"], out, dataset="scenes", root=tiny_scenes_run["root"], split="test",
                  backend="milvus", uri=str(tmp_path / "gallery.db"), progress=False)
    milvus = Gallery.load(out)
    assert read_manifest(out)["backend"] == "milvus"
    query = "a small red circle"
    assert [h["id"] for h in milvus.search_text(query, 5)] == [h["id"] for h in gallery.search_text(query, 5)]
    caps = milvus.search_image(gallery.image_path(1), 3, target="captions")
    assert [c["id"] for c in caps] == [c["id"] for c in gallery.search_image(gallery.image_path(1), 3, "captions")]
    milvus.image_index.close()
    milvus.caption_index.close()


def test_a_mirroring_run_indexes_and_queries_the_mean_of_both_views(tiny_scenes_run, image_folder, tmp_path):
    """data.mirror_test: gallery vectors (folder and dataset sources) and image queries average the two views."""
    from selfalign.data.precomp import load_mirror_split
    from selfalign.evaluate.runner import average_views

    run = tmp_path / "run"
    shutil.copytree(tiny_scenes_run["run_dir"], run)
    config = json.loads((run / "config.json").read_text())
    config["data"]["mirror_test"] = True
    (run / "config.json").write_text(json.dumps(config))

    def check_scores(gallery: Gallery, expected: dict[str, np.ndarray]) -> None:
        query = "a red circle"
        text = gallery.encode_text([query])[0]
        hits = gallery.search_text(query, k=len(expected))
        np.testing.assert_allclose([h["score"] for h in hits], [expected[h["image_id"]] @ text for h in hits],
                                   atol=1e-4)

    # a folder: an image query is embedded exactly as the gallery's images were
    build_gallery(run, tmp_path / "folder", image_folder, progress=False)
    gallery = Gallery.load(tmp_path / "folder")
    assert gallery.plan.mirror and read_manifest(tmp_path / "folder")["query_regions"]["mirror"] is True
    extractor, expected, one_view = gallery.extractor(), {}, []
    for record in gallery.images:
        image = Image.open(record["path"]).convert("RGB")
        views = [gallery.encode_regions(*extractor.extract([image], mirrored=m)[:2]) for m in (False, True)]
        expected[record["image_id"]] = average_views(*map(torch.from_numpy, views))[0].numpy()
        np.testing.assert_allclose(gallery.encode_image(record["path"])[0], expected[record["image_id"]], atol=1e-5)
        one_view.append(views[0][0])
    assert not np.allclose(np.stack(one_view), np.stack(list(expected.values())), atol=1e-3)  # the mirror mattered
    check_scores(gallery, expected)

    # a dataset split: its ground-truth boxes and their mirrored copies, extracted into the cache
    build_gallery(run, tmp_path / "dataset", dataset="scenes", root=tiny_scenes_run["root"], split="test",
                  progress=False)
    gallery = Gallery.load(tmp_path / "dataset")
    store = load_feature_split(tmp_path / "dataset.cache" / "dataset", "scenes_test")
    mirrored = load_mirror_split(tmp_path / "dataset.cache" / "dataset", "scenes_test", store)
    views = [encode_images(gallery.model, RegionStore(s.images, s.region_mask())) for s in (store, mirrored)]
    check_scores(gallery, dict(zip(store.image_ids, average_views(*views).numpy())))


def _save_bank(run: Path, features: Path, beta_images, beta_captions):
    """A query bank of the run's training split with the βs given (what `selfalign querybank` would choose on dev)."""
    from selfalign.evaluate.querybank import QueryBank
    from selfalign.model.checkpoint import model_hash

    model, _ = load_model(run)
    train_split = load_feature_split(features, "train")
    bank = QueryBank(encode_captions(model, list(train_split.captions)),
                     encode_images(model, RegionStore(train_split.images, train_split.region_mask())),
                     beta_images, beta_captions, {"model_hash": model_hash(run), "split": "train"})
    bank.save(run)
    return bank


def test_milvus_stores_and_applies_the_query_bank_discount_too(tiny_scenes_run, tmp_path):
    pytest.importorskip("pymilvus", reason="the milvus extra (pymilvus, milvus-lite) is not installed")
    pytest.importorskip("milvus_lite", reason="milvus-lite is not installed")
    run = tmp_path / "run"
    shutil.copytree(tiny_scenes_run["run_dir"], run)
    _save_bank(run, tiny_scenes_run["features"], 3.0, 3.0)
    common = dict(dataset="scenes", root=tiny_scenes_run["root"], split="test", progress=False)
    build_gallery(run, tmp_path / "faiss", **common)
    build_gallery(run, tmp_path / "milvus", backend="milvus", uri=str(tmp_path / "gallery.db"), **common)
    faiss_gallery, milvus = Gallery.load(tmp_path / "faiss"), Gallery.load(tmp_path / "milvus")
    for query in ("a small red circle", "two blue squares"):
        want, got = faiss_gallery.search_text(query, 5), milvus.search_text(query, 5)
        assert [h["id"] for h in got] == [h["id"] for h in want]
        np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in want], atol=1e-4)
    image = faiss_gallery.image_path(1)
    want = faiss_gallery.search_image(image, 3, target="captions")
    assert [c["id"] for c in milvus.search_image(image, 3, target="captions")] == [c["id"] for c in want]
    milvus.image_index.close()
    milvus.caption_index.close()


def test_a_gallery_with_a_query_bank_searches_the_normalised_scores(tiny_scenes_run, image_folder, tmp_path):
    """Vectors carry the bank's discount: text -> image and image -> caption scores are ``s - discount`` (one
    inner product, checked against the brute-force normalisation), image -> image stays plain."""
    from selfalign.evaluate.querybank import QueryBank

    run = tmp_path / "run"
    shutil.copytree(tiny_scenes_run["run_dir"], run)  # the shared run must stay without a bank

    def save_bank(beta_images, beta_captions) -> QueryBank:
        return _save_bank(run, tiny_scenes_run["features"], beta_images, beta_captions)

    bank = save_bank(3.0, 3.0)
    out = tmp_path / "g"
    build_gallery(run, out, dataset="scenes", root=tiny_scenes_run["root"], split="test", progress=False)
    manifest = read_manifest(out)
    assert manifest["querybank"]["beta_images"] == 3.0 and manifest["querybank"]["sha256"] == QueryBank.file_hash(run)
    gallery = Gallery.load(out)
    split = load_feature_split(tiny_scenes_run["features"], "test")
    images = encode_images(gallery.model, RegionStore(split.images, split.region_mask()))
    query = split.captions[10]
    text = encode_captions(gallery.model, [query])
    normalised = (text @ images.T)[0] - bank.image_discount(images)
    expected = torch.argsort(normalised, descending=True)[:5]
    hits = gallery.search_text(query, k=5)
    assert [split.image_ids[i] for i in expected.tolist()] == [h["image_id"] for h in hits]
    # every score is shifted by the gallery's mean discount, which keeps the extra coordinate small
    offset = manifest["querybank"]["image_offset"]
    assert offset == pytest.approx(float(bank.image_discount(images).mean()), abs=1e-5)
    np.testing.assert_allclose([h["score"] for h in hits], normalised[expected].numpy() + offset, atol=1e-4)

    path = gallery.image_path(3)
    vector = torch.from_numpy(gallery.encode_image(path))
    captions = encode_captions(gallery.model, list(split.captions))
    to_captions = (vector @ captions.T)[0] - bank.caption_discount(captions) + manifest["querybank"]["caption_offset"]
    caps = gallery.search_image(path, k=4, target="captions")
    np.testing.assert_allclose([c["score"] for c in caps], torch.sort(to_captions, descending=True)[0][:4].numpy(),
                               atol=1e-4)
    plain = torch.sort((vector @ images.T)[0], descending=True)[0][:3].numpy()
    np.testing.assert_allclose([h["score"] for h in gallery.search_image(path, k=3)], plain, atol=1e-4)

    # --add keeps the gallery's choice, and refuses a bank that changed since
    build_gallery(run, out, image_folder, add=True, progress=False)
    after = {h["id"]: h["score"] for h in Gallery.load(out).search_text(query, k=20)}
    assert len(after) == 14 and all(after[h["id"]] == pytest.approx(h["score"], abs=1e-4) for h in hits)
    assert read_manifest(out)["querybank"]["image_offset"] == offset  # the offset a gallery was built with stays
    with pytest.raises(InputError, match="built with a query bank"):
        build_gallery(run, out, image_folder, add=True, querybank=False, progress=False)
    save_bank(5.0, None)
    with pytest.raises(InputError, match="not the one the gallery was built with"):
        build_gallery(run, out, image_folder, add=True, progress=False)
    # a direction the bank leaves off: its vectors stay plain, its queries score plainly
    build_gallery(run, tmp_path / "half", dataset="scenes", root=tiny_scenes_run["root"], split="test",
                  progress=False)
    half = Gallery.load(tmp_path / "half")
    plain_captions = torch.sort((vector @ captions.T)[0], descending=True)[0][:4].numpy()
    np.testing.assert_allclose([c["score"] for c in half.search_image(path, k=4, target="captions")],
                               plain_captions, atol=1e-4)
    build_gallery(run, tmp_path / "plain", image_folder, querybank=False, progress=False)
    assert read_manifest(tmp_path / "plain")["querybank"] is None
    with pytest.raises(InputError, match="selfalign querybank"):
        build_gallery(tiny_scenes_run["run_dir"], tmp_path / "none", image_folder, querybank=True, progress=False)
