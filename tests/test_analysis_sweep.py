"""The codebook-size sweep benchmark (1 epoch on the tiny generated store) and `analyze sweep` on its results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_benchmark, tiny_overrides
from selfalign.analysis.sweep import markdown_table, summarise
from selfalign.cli import main


def _tiny_set(feature_store: Path, tmp_path: Path) -> list[str]:
    keep = [o for o in tiny_overrides(feature_store, tmp_path)
            if not o.startswith(("train.epochs", "name=", "out_dir"))]
    return ["--set", *keep]


def test_sweep_trains_evaluates_resumes_and_plots(feature_store, tmp_path, monkeypatch, capsys):
    sweep = load_benchmark("codebook_sweep")
    out = tmp_path / "sweep"
    argv = ["--features", str(feature_store), "--ks", "8,32", "--seeds", "0,1", "--epochs", "1", "--out", str(out),
            "--device", "cpu", "--dataset", "tiny", *_tiny_set(feature_store, tmp_path)]
    path = sweep.main(argv)
    data = json.loads(path.read_text())
    assert data["variant_name"] == "codebook_size" and "--ks 8,32" in data["command"]
    assert sorted((r["variant"], r["seed"]) for r in data["runs"]) == [(8, 0), (8, 1), (32, 0), (32, 1)]
    for run in data["runs"]:
        assert 0 <= run["rsum"] <= 600 and len(run["log"]) == 1 and "loss_lca" in run["log"][0]
        cfg = json.loads((Path(run["run_dir"]) / "config.json").read_text())
        assert cfg["align"]["codebook_size"] == run["variant"] and cfg["train"]["seed"] == run["seed"]
    assert all(Path(r["run_dir"]).name.startswith("tiny-") for r in data["runs"])
    rows = summarise(data)
    assert [r["variant"] for r in rows] == [8, 32] and all(r["rsum_std"] >= 0 for r in rows)
    assert "| tiny | 8 |" in (out / "results.md").read_text()

    # finished runs are skipped; a run whose result was lost is evaluated again from its checkpoint
    first = {r["run_dir"]: r["rsum"] for r in data["runs"]}
    lost = Path(data["runs"][0]["run_dir"]) / "result.json"
    lost.unlink()
    import selfalign.train

    def no_new_training(cfg, resume=False, **kwargs):
        assert resume, "a finished run must not be trained from scratch"
        return real_train(cfg, resume=resume, **kwargs)

    real_train = selfalign.train.train
    monkeypatch.setattr(selfalign.train, "train", no_new_training)
    again = json.loads(sweep.main(argv).read_text())
    assert {r["run_dir"]: r["rsum"] for r in again["runs"]} == first and lost.is_file()

    # a later invocation with another seed keeps the runs recorded before and only trains the new one
    more = argv.copy()
    more[more.index("--seeds") + 1] = "2"
    more[more.index("--ks") + 1] = "8"
    monkeypatch.setattr(selfalign.train, "train", real_train)
    grown = json.loads(sweep.main(more).read_text())
    assert sorted((r["variant"], r["seed"]) for r in grown["runs"]) == [(8, 0), (8, 1), (8, 2), (32, 0), (32, 1)]
    assert {r["run_dir"]: r["rsum"] for r in grown["runs"] if r["seed"] < 2} == first
    assert len(grown["commands"]) == 2 and "--seeds 2" in grown["commands"][-1]

    report = tmp_path / "analysis"
    assert main(["analyze", "sweep", str(path), "--out", str(report)]) == 0
    for name in ("sweep_sweep_rsum.png", "sweep_sweep_curves.png"):
        assert (report / "figures" / name).read_bytes()[:4] == b"\x89PNG"
    assert (report / "sweep_sweep.md").read_text() == markdown_table(grown)
    html = (report / "report.html").read_text()
    assert "<!-- section:sweep-sweep -->" in html and "selfalign analyze sweep" in html


def test_sweep_rejects_bad_results(tmp_path, capsys):
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"runs": [{"dataset": "scenes", "variant": 8}]}))
    assert main(["analyze", "sweep", str(bad), "--out", str(tmp_path)]) == 2
    assert "lacks seed, rsum" in capsys.readouterr().err
    bad.write_text("{not json")
    assert main(["analyze", "sweep", str(bad), "--out", str(tmp_path)]) == 2


def test_sweep_table_of_named_variants_keeps_their_order():
    data = {"variant_name": "lca_words", "runs": [
        {"dataset": "scenes", "variant": v, "seed": s, "rsum": r, "metrics": {"i2t_r1": 1.0, "t2i_r1": 2.0}}
        for v, s, r in (("noun", 0, 300.0), ("noun", 1, 310.0), ("all", 0, 320.0))]}
    rows = summarise(data)
    assert [r["variant"] for r in rows] == ["noun", "all"]
    assert rows[0]["rsum_mean"] == 305.0 and rows[0]["rsum_std"] == pytest.approx(7.0710678)
    assert "| scenes | noun | 305.0 ± 7.1 | 1.0 | 2.0 | 0,1 |" in markdown_table(data)


def test_sweep_refuses_a_folder_of_another_sweep(tmp_path):
    from selfalign.analysis.sweep import run_sweep
    from selfalign.errors import InputError

    (tmp_path / "results.json").write_text(json.dumps({"variant_name": "lca_words", "command": "x", "runs": [
        {"dataset": "scenes", "variant": "noun", "seed": 0, "rsum": 300.0, "run_dir": "r/scenes-noun-s0"}]}))
    with pytest.raises(InputError, match="a sweep of 'lca_words', not 'codebook_size'"):
        run_sweep([], tmp_path, "codebook_size", "cmd", None, [])
