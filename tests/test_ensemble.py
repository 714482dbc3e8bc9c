"""Ensemble evaluation: the mean of several runs' similarity matrices on one split."""

import json

import numpy as np
import pytest

from conftest import make_feature_store, tiny_overrides
from selfalign.cli import main
from selfalign.config import load_config
from selfalign.data.precomp import load_feature_split
from selfalign.errors import InputError
from selfalign.evaluate.metrics import retrieval_metrics
from selfalign.evaluate.runner import encode_split, similarity_matrix
from selfalign.model.checkpoint import load_model
from selfalign.pipeline import evaluate_ensemble
from selfalign.train import train


@pytest.fixture(scope="module")
def two_runs(feature_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("ens")
    runs = [train(load_config(None, tiny_overrides(feature_store, out, f"s{seed}") + [f"train.seed={seed}"]),
                  progress=False) for seed in (0, 1)]
    return runs


def test_ensemble_scores_the_mean_of_the_runs_similarities(two_runs, feature_store):
    split = load_feature_split(feature_store, "test")
    mats = [similarity_matrix(encode_split(load_model(r, "cpu")[0], split)).numpy() for r in two_runs]
    assert not np.allclose(mats[0], mats[1])  # two seeds, two different models
    expected = retrieval_metrics((mats[0].astype(np.float64) + mats[1]) / 2)
    metrics = evaluate_ensemble(two_runs, "test", device="cpu")
    for key in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r10", "rsum"):
        assert metrics[key] == pytest.approx(expected[key])
    assert metrics["ensemble"] == [str(r) for r in two_runs] and metrics["protocol"] == "16_images"
    assert not any((r / "eval.json").exists() for r in two_runs)  # an ensemble writes into no run


def test_ensemble_cli_prints_and_writes_json(two_runs, tmp_path, capsys):
    out = tmp_path / "ens.json"
    assert main(["evaluate", *map(str, two_runs), "--device", "cpu", "--json", str(out)]) == 0
    assert "ensemble of 2 runs" in capsys.readouterr().out
    assert len(json.loads(out.read_text())["ensemble"]) == 2


def test_ensemble_refuses_runs_of_different_splits(two_runs, feature_store, tmp_path):
    other = make_feature_store(tmp_path / "other", seed=7)
    run = train(load_config(None, tiny_overrides(other, tmp_path, "other")), progress=False)
    with pytest.raises(InputError, match="same images and captions"):
        evaluate_ensemble([two_runs[0], run], "test", device="cpu")
    with pytest.raises(InputError, match="at least two runs"):
        evaluate_ensemble([two_runs[0]], "test", device="cpu")


def test_sims_and_runs_together_is_an_error(two_runs, tmp_path, capsys):
    assert main(["evaluate", str(two_runs[0]), "--sims", str(tmp_path / "s.npy")]) == 2
    assert "not both" in capsys.readouterr().err


def test_average_views_keeps_the_length_and_the_direction_of_the_mean():
    import torch

    from selfalign.evaluate.runner import average_views

    a = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    mean = average_views(a, b)
    torch.testing.assert_close(mean.norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(mean, torch.nn.functional.normalize(a + b, dim=-1))
    torch.testing.assert_close(average_views(3 * a, 3 * a), 3 * a)


def test_evaluate_on_another_store_scores_it_and_writes_nothing_into_the_run(two_runs, tmp_path, capsys):
    from selfalign.pipeline import evaluate_run

    other = make_feature_store(tmp_path / "other", seed=9)
    model = load_model(two_runs[0], "cpu")[0]
    expected = retrieval_metrics(similarity_matrix(encode_split(model, load_feature_split(other, "test"))).numpy())
    before = sorted(p.name for p in two_runs[0].iterdir())
    metrics = evaluate_run(two_runs[0], "test", device="cpu", features=other)
    assert metrics["rsum"] == pytest.approx(expected["rsum"]) and metrics["features"] == str(other)
    assert sorted(p.name for p in two_runs[0].iterdir()) == before
    ensemble = evaluate_ensemble(two_runs, "test", device="cpu", features=other)
    assert ensemble["n_images"] == 16
    assert main(["evaluate", str(two_runs[0]), "--features", str(other), "--device", "cpu"]) == 0
    assert "rsum" in capsys.readouterr().out
    assert main(["evaluate", "--sims", str(tmp_path / "s.npy"), "--features", str(other)]) == 2
    wide = make_feature_store(tmp_path / "wide", dim=48)
    with pytest.raises(InputError, match=r"48-d but the run's model.image_dim is 32: it was trained on "
                                         r"data.regions=\w+ features \(extract new photos with"):
        evaluate_run(two_runs[0], "test", device="cpu", features=wide)


# ------------------------------------------------------------------------------------------------
# An ensemble folder (`selfalign ensemble`): the members as one model, evaluated, indexed and searched as a run.

def test_average_views_by_parts_averages_each_part_alone():
    import torch

    from selfalign.evaluate.runner import average_views

    a, b = torch.randn(5, 7), torch.randn(5, 7)
    whole = average_views(a, b, (3, 4))
    torch.testing.assert_close(whole[:, :3], average_views(a[:, :3], b[:, :3]))
    torch.testing.assert_close(whole[:, 3:], average_views(a[:, 3:], b[:, 3:]))
    torch.testing.assert_close(average_views(a, b, (7,)), average_views(a, b))


def test_an_ensemble_folder_scores_as_the_ensemble_evaluation(two_runs, tmp_path, capsys):
    from selfalign.model.ensemble import EnsembleModel
    from selfalign.pipeline import evaluate_run

    ens = tmp_path / "ens"
    assert main(["ensemble", *map(str, two_runs), "--out", str(ens)]) == 0
    out = capsys.readouterr().out
    assert "ensemble of 2 runs" in out and "192-d embeddings: 96 + 96" in out
    model, cfg = load_model(ens, "cpu")
    assert isinstance(model, EnsembleModel) and cfg.data.features == load_model(two_runs[0], "cpu")[1].data.features
    expected = evaluate_ensemble(two_runs, "test", device="cpu")
    metrics = evaluate_run(ens, "test", device="cpu")
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r10", "rsum"):
        assert metrics[key] == pytest.approx(expected[key])
    assert (ens / "eval.json").is_file()
    # one inner product of the concatenated embeddings is the mean of the members' scores
    import torch

    queries = ["red circle", "a picture of blue star"]
    with torch.no_grad():
        text = model.encode_text(model.tokenize(queries)).embedding
        members = [m.encode_text(m.tokenize(queries)).embedding for m in model.members]
    assert (text @ text.T).numpy() == pytest.approx((sum(t @ t.T for t in members) / 2).numpy(), abs=1e-5)


def test_an_ensemble_folder_uses_its_members_query_banks(two_runs, tmp_path):
    from selfalign.evaluate.querybank import EnsembleBank, QueryBank
    from selfalign.model.checkpoint import make_ensemble
    from selfalign.pipeline import build_querybank, evaluate_run

    ens = make_ensemble(two_runs, tmp_path / "ens").parent
    assert not QueryBank.exists(ens)
    for run, beta in zip(two_runs, (2.0, 8.0)):
        build_querybank(run, betas=(beta,), device="cpu", max_captions=60)
    assert QueryBank.exists(ens) and isinstance(QueryBank.load(ens), EnsembleBank)
    expected = evaluate_ensemble(two_runs, "test", device="cpu", querybank=True)
    metrics = evaluate_run(ens, "test", device="cpu", querybank=True)
    for key in ("i2t_r1", "t2i_r1", "t2i_r5", "rsum"):
        assert metrics[key] == pytest.approx(expected[key])
    assert metrics["querybank"]["runs"] == expected["querybank"]["runs"]
    with pytest.raises(InputError, match="uses its members' banks"):
        build_querybank(ens, device="cpu")
    with pytest.raises(InputError, match="drawn from the 'train' split"):
        evaluate_run(ens, "train", device="cpu", querybank=True)
    for run in two_runs:
        QueryBank.remove(run)


def test_ensemble_refusals(two_runs, feature_store, tmp_path):
    from selfalign.analysis.common import load_run_split
    from selfalign.model.checkpoint import make_ensemble, read_run_config

    with pytest.raises(InputError, match="at least two runs"):
        make_ensemble(two_runs[:1], tmp_path / "one")
    wide = train(load_config(None, tiny_overrides(make_feature_store(tmp_path / "w", dim=48), tmp_path, "wide")
                             + ["model.image_dim=48"]), progress=False)
    with pytest.raises(InputError, match="model.image_dim=48 but .* has 32"):
        make_ensemble([two_runs[0], wide], tmp_path / "mixed")
    ens = make_ensemble(two_runs, tmp_path / "ens").parent
    with pytest.raises(InputError, match="already holds an ensemble; pass --overwrite"):
        make_ensemble(two_runs, ens)
    assert make_ensemble(list(reversed(two_runs)), ens, overwrite=True).is_file()
    with pytest.raises(InputError, match="is an ensemble of runs"):
        make_ensemble([ens, two_runs[0]], tmp_path / "nested")
    with pytest.raises(InputError, match="is an ensemble of runs"):
        read_run_config(ens)  # `train --resume ENS` and friends
    with pytest.raises(InputError, match="not an ensemble folder"):
        make_ensemble(two_runs, two_runs[0])
    with pytest.raises(InputError, match="pass a member run"):
        load_run_split(ens)
    # a member retrained (here: its weights changed) after the ensemble was made
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(two_runs[1], copy)
    ens2 = make_ensemble([two_runs[0], copy], tmp_path / "ens2").parent
    shutil.copy(two_runs[0] / "model.safetensors", copy / "model.safetensors")
    with pytest.raises(InputError, match="not the model the ensemble was made with"):
        load_model(ens2, "cpu")
    (ens2 / "ensemble.json").write_text('{"format": "selfalign-ensemble", "version": 1, "members": []}')
    with pytest.raises(InputError, match="at least two"):
        load_model(ens2, "cpu")


def test_an_ensemble_gallery_searches_by_the_mean_of_its_members_scores(tiny_scenes_run, tmp_path):
    import torch

    from selfalign.index.gallery import Gallery
    from selfalign.index.gallery_build import build_gallery
    from selfalign.model.checkpoint import make_ensemble

    overrides = tiny_overrides(tiny_scenes_run["features"], tmp_path, "seed1") + [
        "model.image_dim=1280", "train.epochs=1", f"data.root={tiny_scenes_run['root']}", "data.image_size=64",
        "train.seed=1"]
    torch.set_num_threads(1)
    second = train(load_config(None, overrides), progress=False)
    ens = make_ensemble([tiny_scenes_run["run_dir"], second], tmp_path / "ens").parent
    report = build_gallery(ens, tmp_path / "gallery", dataset="scenes", root=tiny_scenes_run["root"],
                           split="test", progress=False)
    assert report.total == 8 and report.captions == 40
    gallery = Gallery.load(tmp_path / "gallery")
    hits = gallery.search_text("a red circle", k=3)
    regions = np.asarray(gallery.regions, dtype=np.float32)
    counts = np.array([len(r["boxes"]) for r in gallery.images])
    expected = []
    for run in (tiny_scenes_run["run_dir"], second):
        member = load_model(run, "cpu")[0]
        from selfalign.data.batches import RegionStore
        from selfalign.evaluate.runner import encode_captions, encode_images

        images = encode_images(member, RegionStore.from_counts(regions, counts))
        expected.append(encode_captions(member, ["a red circle"]) @ images.T)
    mean = (sum(expected) / 2)[0]
    row = {int(r["id"]): i for i, r in enumerate(gallery.images)}
    for hit in hits:
        assert hit["score"] == pytest.approx(float(mean[row[hit["id"]]]), abs=1e-4)
    assert [h["id"] for h in hits] == [int(gallery.images[i]["id"]) for i in torch.argsort(mean, descending=True)[:3]]
    assert gallery.search_image(gallery.image_path(hits[0]["id"]), k=2, target="captions")
    assert gallery.explain("a red circle", hits[0]["id"])["words"]
