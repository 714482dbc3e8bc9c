import csv
import json

import pytest
import torch

from conftest import tiny_overrides
from selfalign.cli import main
from selfalign.config import load_config
from selfalign.errors import SelfAlignError
from selfalign.model.checkpoint import load_model
from selfalign.pipeline import evaluate_run
from selfalign.train import train


def test_train_writes_a_complete_run_and_learns(feature_store, tmp_path):
    cfg = load_config(None, tiny_overrides(feature_store, tmp_path) + ["train.epochs=4"])
    run = train(cfg, progress=False)
    for name in ("config.json", "vocab.json", "model.safetensors", "last.safetensors", "train_state.pt", "log.csv"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["loss_rank"]) < float(rows[0]["loss_rank"])
    assert "loss_lca" in rows[0] and "loss_cra" in rows[0]
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["epochs"] == 4 and saved["model"]["embed_dim"] == 32
    metrics = evaluate_run(run, "test", device="cpu")
    assert metrics["rsum"] > 200  # chance is ~12 rsum points on 16 images
    assert json.loads((run / "eval.json").read_text())["rsum"] == metrics["rsum"]


def test_training_is_deterministic(feature_store, tmp_path):
    losses = []
    for name in ("a", "b"):
        cfg = load_config(None, tiny_overrides(feature_store, tmp_path, name) + ["train.epochs=1"])
        run = train(cfg, progress=False)
        losses.append(list(csv.DictReader(open(run / "log.csv")))[0]["loss_rank"])
        model, _ = load_model(run)
        losses.append(sum(p.double().sum().item() for p in model.parameters()))
    assert losses[0] == losses[2] and losses[1] == losses[3]


def test_data_initialised_codebook_starts_from_region_locals(feature_store, tmp_path):
    import torch.nn.functional as F

    from selfalign.data.batches import RegionStore
    from selfalign.data.precomp import load_feature_split
    from selfalign.model.checkpoint import build_model
    from selfalign.train.trainer import init_codebook_from_regions

    cfg = load_config(None, tiny_overrides(feature_store, tmp_path) + ["align.codebook_init=data"])
    split = load_feature_split(feature_store, "train")
    store = RegionStore(split.images, split.region_mask())
    model = build_model(cfg, None if cfg.model.text_encoder != "bigru" else _vocab(split))
    init_codebook_from_regions(model, store, seed=0, device=torch.device("cpu"))
    regions, mask = store.get(list(range(len(split.image_ids))))
    with torch.no_grad():
        free = model.encode_image(regions, mask).free[mask]
    codebook = model.align.lca.codebook.detach()
    best = (codebook @ F.normalize(free, dim=1).t()).max(dim=1).values
    assert float(best.min()) > 0.99  # each prototype is (a hair from) one training region's context-free local
    run = train(cfg, progress=False)  # and a run with it trains and logs LCA
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert float(rows[0]["loss_lca"]) > 0
    assert json.loads((run / "config.json").read_text())["align"]["codebook_init"] == "data"


def _vocab(split):
    from selfalign.data.text import Vocabulary

    return Vocabulary.build(list(split.captions))


def test_refuses_to_overwrite_a_run(feature_store, tmp_path):
    cfg = load_config(None, tiny_overrides(feature_store, tmp_path) + ["train.epochs=1"])
    train(cfg, progress=False)
    with pytest.raises(SelfAlignError, match="already holds a run"):
        train(cfg, progress=False)


def test_cli_train_and_evaluate(feature_store, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: 1\n")
    assert main(["train", str(config), *tiny_overrides(feature_store, tmp_path, "cli"), "train.epochs=1",
                 "--quiet"]) == 0
    assert main(["evaluate", str(tmp_path / "cli"), "--split", "test", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "rsum" in out


@pytest.mark.parametrize("args,needle", [
    (["train", "MISSING.yaml"], "does not exist"),
    (["evaluate", "/nonexistent/run"], "is not a run directory"),
])
def test_cli_errors_are_one_line_and_nonzero(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err


def test_unknown_override_key_fails_cleanly(feature_store, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: 1\n")
    assert main(["train", str(config), "train.epocs=2"]) == 2
    assert "unknown config key 'train.epocs'" in capsys.readouterr().err


def test_feature_dim_mismatch_is_named(feature_store, tmp_path):
    cfg = load_config(None, tiny_overrides(feature_store, tmp_path) + ["model.image_dim=64"])
    with pytest.raises(SelfAlignError, match="32-d but model.image_dim is 64"):
        train(cfg, progress=False)
    assert torch.get_num_threads() >= 1


def _with_mirrored_copies(feature_store, root):
    """A copy of the store plus '{split}_mirror' splits: the same images, features perturbed, one region more."""
    import shutil

    import numpy as np

    from selfalign.data.precomp import load_feature_split, write_feature_split

    shutil.copytree(feature_store, root)
    rng = np.random.default_rng(5)
    for name in ("train", "dev", "test"):
        split = load_feature_split(root, name)
        feats = np.asarray(split.images, np.float32)
        feats = np.concatenate([feats, feats[:, :1]], axis=1) + 0.05 * rng.normal(size=(1, 1, feats.shape[2]))
        write_feature_split(root, f"{name}_mirror", feats.astype(np.float16), split.captions, split.image_ids,
                            n_regions=split.n_regions + 1)
    return root


def test_mirror_augmentation_and_test_time_averaging(feature_store, tmp_path):
    store = _with_mirrored_copies(feature_store, tmp_path / "store")
    plain = train(load_config(None, tiny_overrides(store, tmp_path, "plain") + ["train.epochs=1"]), progress=False)
    cfg = load_config(None, tiny_overrides(store, tmp_path, "mirror") + ["train.epochs=1", "data.mirror_train=true",
                                                                          "data.mirror_test=true"])
    run = train(cfg, progress=False)
    rows = [list(csv.DictReader(open(r / "log.csv")))[0] for r in (plain, run)]
    assert rows[0]["loss_rank"] != rows[1]["loss_rank"]  # the mirrored copies were trained on
    with_views = evaluate_run(run, "test", device="cpu")
    assert with_views["rsum"] > 0
    # the test split's two views are averaged: turning that off in the saved config changes the scores
    saved = json.loads((run / "config.json").read_text())
    saved["data"]["mirror_test"] = False
    (run / "config.json").write_text(json.dumps(saved))
    assert evaluate_run(run, "test", device="cpu")["t2i_meanr"] != with_views["t2i_meanr"]


def test_mirror_without_mirrored_copies_names_the_command(feature_store, tmp_path):
    cfg = load_config(None, tiny_overrides(feature_store, tmp_path) + ["data.mirror_train=true"])
    with pytest.raises(SelfAlignError, match="--splits train --mirror"):
        train(cfg, progress=False)


def test_mirroring_warns_when_many_captions_say_left_or_right(feature_store, tmp_path, capsys):
    from selfalign.data.text import sided_fraction
    from selfalign.train.trainer import _warn_if_captions_are_sided

    assert sided_fraction(["a dog on the left", "a cat", "Right-hand side", "the leftmost cup"]) == 0.75
    assert sided_fraction([]) == 0.0
    sided = ["a red square left of a blue circle"] * 3 + ["a red square"] * 7
    on = load_config(None, tiny_overrides(feature_store, tmp_path) + ["data.mirror_train=true"])
    _warn_if_captions_are_sided(on, sided, is_main=True)
    assert "30.0% of the training captions say left or right" in capsys.readouterr().err
    _warn_if_captions_are_sided(on, ["a red square"] * 10, is_main=True)
    _warn_if_captions_are_sided(load_config(None, tiny_overrides(feature_store, tmp_path)), sided, is_main=True)
    assert capsys.readouterr().err == ""
