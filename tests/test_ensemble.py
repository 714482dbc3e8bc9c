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
    with pytest.raises(InputError, match="48-d but the run's model.image_dim is 32"):
        evaluate_run(two_runs[0], "test", device="cpu", features=wide)
