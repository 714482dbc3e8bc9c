"""The command line end to end: extract a custom captioned folder (with mirrored copies), score a run on it."""

from __future__ import annotations

import json
import shutil

import pytest

from selfalign.cli import main
from selfalign.data.formats import load_dataset
from selfalign.data.precomp import load_feature_split, load_mirror_split

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_extract_a_new_folder_with_mirrors_and_evaluate_a_run_on_it(tiny_scenes_run, tmp_path, capsys):
    source = load_dataset("scenes", tiny_scenes_run["root"], "test")
    root = tmp_path / "photos"
    (root / "images").mkdir(parents=True)
    lines = ["image,caption"]
    for path, captions in zip(source.image_paths, source.captions):
        shutil.copy(path, root / "images" / path.name)
        lines += [f'{path.name},"{c}"' for c in captions]
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    store = tmp_path / "features"
    assert main(["extract", "--dataset", "folder", "--root", str(root), "--out", str(store),
                 "--size", "64", "--splits", "all", "--mirror", "--device", "cpu"]) == 0
    assert json.loads((store / "meta.json").read_text())["regions"] == "grid"  # photos have no boxes: the default
    split = load_feature_split(store, "all")
    assert split.num_images == len(source.image_ids) and load_mirror_split(store, "all", split).num_images == 8

    run = tmp_path / "run"
    shutil.copytree(tiny_scenes_run["run_dir"], run)
    files = sorted(p.name for p in run.iterdir())
    capsys.readouterr()
    assert main(["evaluate", str(run), "--features", str(store), "--split", "all", "--device", "cpu",
                 "--json", str(tmp_path / "plain.json")]) == 0
    assert "8 images / 40 captions" in capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    config["data"]["mirror_test"] = True  # the run now averages each image with its mirrored copy
    (run / "config.json").write_text(json.dumps(config))
    assert main(["evaluate", str(run), "--features", str(store), "--split", "all", "--device", "cpu",
                 "--json", str(tmp_path / "mirror.json")]) == 0
    plain, mirrored = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "mirror"))
    assert plain["t2i_meanr"] != mirrored["t2i_meanr"] or plain["i2t_meanr"] != mirrored["i2t_meanr"]
    assert sorted(p.name for p in run.iterdir()) == files  # scoring another store writes nothing into the run

    for path in store.glob("all_mirror_*"):  # a store extracted without --mirror
        path.unlink()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--features", str(store), "--split", "all", "--device", "cpu"]) == 2
    assert "all_mirror_ims.npy" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--features", str(store), "--split", "all", "--device", "cpu", "--one-view",
                 "--json", str(tmp_path / "one_view.json")]) == 0
    one_view = json.loads((tmp_path / "one_view.json").read_text())
    assert (one_view["views"], mirrored["views"]) == (1, 2)
    same = [k for k in plain if k.startswith(("i2t_", "t2i_", "rsum"))]
    assert same and all(one_view[k] == plain[k] for k in same)
