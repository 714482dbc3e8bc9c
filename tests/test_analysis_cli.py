"""End to end: a tiny scenes dataset, 64 px box features, two 1-epoch runs, then every `analyze` sub-command."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from selfalign.cli import main
from selfalign.config import load_config
from selfalign.data.scenes import generate_scenes, load_scenes
from selfalign.data.text import tokenize
from selfalign.train import train


def _extract(root: Path, feats: Path) -> None:
    try:
        from selfalign.pipeline import extract_features
        for split in ("train", "dev", "test"):
            extract_features("scenes", root, feats, split, "boxes", image_size=64, device="cpu", progress=False)
    except ModuleNotFoundError as exc:  # the dataset-format loaders may not be there yet: go to the extractor
        if "selfalign.data.formats" not in str(exc):
            raise
        from selfalign.vision.extract import extract_split
        for split in ("train", "dev", "test"):
            extract_split(load_scenes(root, split), feats, split, "boxes", device="cpu", image_size=64, progress=False)


@pytest.fixture(scope="session")
def scenes_runs(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("analysis")
    root = generate_scenes(base / "scenes", n_train=40, n_dev=8, n_test=8, image_size=64, progress=False)
    feats = base / "feats"
    _extract(root, feats)
    common = [f"data.features={feats}", f"data.root={root}", f"out_dir={base / 'runs'}", "model.image_dim=1280",
              "model.embed_dim=32", "model.word_dim=16", "model.image_context_heads=2", "align.codebook_size=16",
              "align.cra_negatives=32", "train.epochs=1", "train.batch_size=16", "train.device=cpu",
              "train.threads=1"]
    selfalign = train(load_config(None, common + ["name=sa"]), progress=False)
    plain = train(load_config(None, common + ["name=base", "align.lca=false", "align.cra=false"]), progress=False)
    return {"root": root, "feats": feats, "sa": selfalign, "base": plain, "base_dir": base}


def _png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def _sections(report: Path) -> list[str]:
    return re.findall(r"<!-- section:([^ ]+) -->", report.read_text())


def test_correspondences_draws_pairs_and_records_the_command(scenes_runs, tmp_path, capsys):
    out = tmp_path / "a"
    ids = (scenes_runs["feats"] / "test_ids.txt").read_text().split()
    assert main(["analyze", "correspondences", str(scenes_runs["sa"]), "--image", ids[1], "--caption", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert len(re.findall(r"^\s+\d\. ", printed, re.M)) == 5  # five distinct words
    figures = list((out / "figures").glob("correspondences_*.png"))
    assert len(figures) == 1
    _png(figures[0])
    html = (out / "report.html").read_text()
    assert f"--image {ids[1]} --caption 2" in html and "selfalign analyze correspondences" in html
    assert f'src="figures/{figures[0].name}"' in html  # linked relative to the report
    # --index picks the same image; a bad index is a clear user error
    assert main(["analyze", "correspondences", str(scenes_runs["sa"]), "--index", "1", "--caption", "2",
                 "--out", str(out)]) == 0
    assert len(_sections(out / "report.html")) == 1  # same pair: the section is replaced, not duplicated
    assert main(["analyze", "correspondences", str(scenes_runs["sa"]), "--index", "99", "--out", str(out)]) == 2
    assert "--index 99" in capsys.readouterr().err


def test_correspondence_accuracy_side_by_side(scenes_runs, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["analyze", "correspondence-accuracy", str(scenes_runs["base"]), str(scenes_runs["sa"]),
                 "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "base (base)" in table and "sa (SelfAlign)" in table
    data = json.loads((out / "correspondence_accuracy_test.json").read_text())
    assert [r["selfalign"] for r in data["runs"]] == [False, True]
    for r in data["runs"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 < r["chance"] < 1.0
        assert r["scored"] == r["scored_color"] + r["scored_shape"] > 20
        assert sum(r["skipped"].values()) == 0  # every mention of the scenes captions maps to a BiGRU token
    _png(out / "figures" / "correspondence_accuracy_test.png")


def test_correspondence_accuracy_needs_annotations(scenes_runs, tmp_path, capsys):
    assert main(["analyze", "correspondence-accuracy", str(scenes_runs["sa"]), "--root", str(tmp_path),
                 "--out", str(tmp_path)]) == 2
    assert "annotations.json" in capsys.readouterr().err


def test_codebook_usage_and_concepts(scenes_runs, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["analyze", "codebook", str(scenes_runs["sa"]), "--top", "4", "--crops", "3", "--out", str(out)]) == 0
    summary = json.loads((out / "codebook_sa_test.json").read_text())
    assert summary["codebook_size"] == 16
    captions = (scenes_runs["feats"] / "test_caps.txt").read_text().splitlines()
    n_captions_words = sum(len(tokenize(c)[:40]) for c in captions)
    assert summary["words"]["assigned"] == n_captions_words
    assert summary["regions"]["assigned"] == int(np.load(scenes_runs["feats"] / "test_nregions.npy").sum())
    for modality in ("words", "regions"):
        usage = summary[modality]
        assert 1.0 <= usage["perplexity"] <= 16 + 1e-6
        assert usage["used"] + usage["dead"] == 16 and sum(usage["counts"]) == usage["assigned"]
    assert 1 <= len(summary["top_concepts"]) <= 4
    for path in summary["figures"]:
        _png(Path(path))
    assert "perplexity" in capsys.readouterr().out
    # a run without LCA has no codebook: a clear error
    assert main(["analyze", "codebook", str(scenes_runs["base"]), "--out", str(out)]) == 2
    assert "no LCA codebook" in capsys.readouterr().err


def test_curves_and_examples_share_one_report(scenes_runs, tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["analyze", "curves", str(scenes_runs["sa"]), str(scenes_runs["base"]), "--out", str(out)]) == 0
    _png(out / "figures" / "curves_sa_base.png")
    rows = list(csv.DictReader(open(scenes_runs["sa"] / "log.csv")))
    assert f"best dev rsum {round(float(rows[0]['dev_rsum']), 2)}" in capsys.readouterr().out
    assert main(["analyze", "examples", str(scenes_runs["sa"]), "--n", "2", "--out", str(out), "--embed"]) == 0
    result = json.loads((out / "examples_sa_test.json").read_text())
    assert [len(q["top"]) for q in result["queries"]] == [5, 5]
    assert all(q["correct"] for q in result["queries"])  # split captions: their image is known
    _png(out / "figures" / "examples_sa_test.png")
    assert main(["analyze", "examples", str(scenes_runs["sa"]), "--queries", "a red circle", "two blue squares",
                 "--out", str(out)]) == 0
    report = out / "report.html"
    assert _sections(report) == ["curves-sa_base", "examples-sa-test"]
    html = report.read_text()
    assert "--queries &#x27;a red circle&#x27; &#x27;two blue squares&#x27;" in html  # the exact command, escaped
    assert "selfalign analyze curves" in html


def test_every_section_in_one_report(scenes_runs, tmp_path):
    out = tmp_path / "e"
    run = str(scenes_runs["sa"])
    for argv in (["correspondences", run, "--index", "0"], ["correspondence-accuracy", run], ["codebook", run],
                 ["curves", run], ["examples", run, "--n", "1"]):
        assert main(["analyze", *argv, "--out", str(out)]) == 0, argv
    sections = _sections(out / "report.html")
    for prefix in ("correspondences-", "correspondence-accuracy-", "codebook-", "curves-", "examples-"):
        assert any(s.startswith(prefix) for s in sections), prefix
    html = (out / "report.html").read_text()
    for src in re.findall(r'<img src="([^"]+)"', html):
        assert (out / src).is_file(), src  # every relative figure link resolves
