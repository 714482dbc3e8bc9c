"""``selfalign index`` and ``selfalign search`` through the real command line entry point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from selfalign.cli import main
from selfalign.index.gallery import Gallery

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def dataset_index(tiny_scenes_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "idx"
    rc = main(["index", str(tiny_scenes_run["run_dir"]), "--dataset", "scenes", "--root", str(tiny_scenes_run["root"]),
               "--split", "test", "--out", str(out), "--device", "cpu", "--quiet"])
    assert rc == 0
    return out


def test_index_dataset_then_search_text(dataset_index, capsys):
    capsys.readouterr()
    assert main(["search", str(dataset_index), "a red circle", "-k", "3", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:4] == ["rank", "score", "id", "image"] and len(lines) == 4
    assert main(["search", str(dataset_index), "a red circle", "-k", "3", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target"] == "images" and len(out["results"]) == 3
    assert [float(line.split()[1]) for line in lines[1:]] == pytest.approx([r["score"] for r in out["results"]],
                                                                           abs=1e-4)
    assert all(Path(r["path"]).is_file() for r in out["results"])


def test_search_image_to_captions(dataset_index, tiny_scenes_run, capsys):
    image = sorted((tiny_scenes_run["root"] / "images").glob("*.png"))[-1]
    capsys.readouterr()
    assert main(["search", str(dataset_index), "--image", str(image), "--target", "captions", "-k", "4",
                 "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target"] == "captions" and len(out["results"]) == 4 and all(r["text"] for r in out["results"])
    assert main(["search", str(dataset_index), "--image", str(image), "--target", "captions", "-k", "2",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["rank", "score", "image", "caption"]


def test_folder_index_reports_skips_and_add(tiny_scenes_run, tmp_path, capsys):
    folder = tmp_path / "pics"
    folder.mkdir()
    images = sorted((tiny_scenes_run["root"] / "images").glob("*.png"))
    for path in images[:3]:
        shutil.copy(path, folder)
    (folder / "zz_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "idx"
    run = str(tiny_scenes_run["run_dir"])
    capsys.readouterr()
    assert main(["index", run, str(folder), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "3 image(s) added" in captured.out and "1 skipped" in captured.out
    assert "zz_bad.jpg" in captured.err and "regions differ from training" in captured.err
    assert f"{folder / 'zz_bad.jpg'}: cannot read image" in captured.err
    assert f"{folder / 'zz_bad.jpg'}: {folder / 'zz_bad.jpg'}" not in captured.err  # the path is said once
    # a plain folder has no captions: image -> text says so and fails cleanly
    assert main(["search", str(out), "--image", str(images[0]), "--target", "captions", "--device", "cpu"]) == 2
    assert "no captions" in capsys.readouterr().err
    more = tmp_path / "more"
    more.mkdir()
    shutil.copy(images[3], more)
    assert main(["index", run, str(more), "--out", str(out), "--add", "--device", "cpu", "--quiet"]) == 0
    assert "1 image(s) added" in capsys.readouterr().out
    assert main(["search", str(out), "--image", str(images[3]), "-k", "1", "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["image_id"] == images[3].name
    # a forgotten --add is refused and the gallery keeps its 4 images; --overwrite replaces it
    assert main(["index", run, str(more), "--out", str(out), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already holds a gallery of 4 image(s)" in err and "--add" in err and "--overwrite" in err
    assert len(Gallery.load(out)) == 4
    assert main(["index", run, str(more), "--out", str(out), "--overwrite", "--device", "cpu", "--quiet"]) == 0
    assert "1 image(s) added, 1 in total" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["search", "{idx}"], "QUERY or --image"),
    (["search", "{idx}", "red", "--image", "x.png"], "QUERY or --image"),
    (["search", "{idx}", "red", "-k", "0"], "k must be"),
    (["search", "{tmp}/nowhere", "red"], "does not exist"),
    (["index", "{run}", "--out", "{tmp}/o"], "either an image folder or a dataset"),
    (["index", "{run}", "{tmp}", "--dataset", "scenes", "--root", "{tmp}", "--out", "{tmp}/o"], "not both"),
    (["index", "{run}", "--dataset", "scenes", "--out", "{tmp}/o"], "--dataset needs --root"),
    (["index", "{run}", "{tmp}/missing", "--out", "{tmp}/o"], "no such image folder"),
    (["index", "{run}", "{tmp}", "--out", "{tmp}/o", "--add"], "gallery folder does not exist"),
    (["index", "{run}", "{tmp}", "--out", "{idx}", "--add", "--overwrite"], "not both"),
])
def test_bad_arguments_are_clear_errors(argv, message, dataset_index, tiny_scenes_run, tmp_path, capsys):
    fill = {"idx": str(dataset_index), "run": str(tiny_scenes_run["run_dir"]), "tmp": str(tmp_path)}
    assert main([a.format(**fill) for a in argv] + ["--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


def test_index_uses_the_runs_query_bank_unless_told_not_to(tiny_scenes_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_scenes_run["run_dir"], run)
    assert main(["querybank", str(run), "--betas", "4,40", "--device", "cpu"]) == 0
    if "no bank written" in capsys.readouterr().out:
        pytest.fail("the tiny scenes run's bank should help at least one direction on dev")
    common = ["--dataset", "scenes", "--root", str(tiny_scenes_run["root"]), "--device", "cpu", "--quiet"]
    assert main(["index", str(run), *common, "--out", str(tmp_path / "qb")]) == 0
    assert main(["index", str(run), *common, "--out", str(tmp_path / "plain"), "--no-querybank"]) == 0
    bank = Gallery.load(tmp_path / "qb").querybank
    assert {bank["beta_images"], bank["beta_captions"]} & {4.0, 40.0}
    assert Gallery.load(tmp_path / "plain").querybank is None
    capsys.readouterr()
    for name in ("qb", "plain"):
        assert main(["search", str(tmp_path / name), "a red circle", "-k", "8", "--json", "--device", "cpu"]) == 0
        assert len(json.loads(capsys.readouterr().out)["results"]) == 8
