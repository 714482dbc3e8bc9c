"""Exact resume after SIGKILL, checkpoints that are never replaced by bad ones, and the NaN/inf guard."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import selfalign.train.trainer as trainer_module
from conftest import make_feature_store, tiny_overrides
from selfalign.cli import main
from selfalign.config import load_config
from selfalign.errors import InputError
from selfalign.model.checkpoint import build_model, read_run_config
from selfalign.train import TrainingDiverged, train
from selfalign.train.state import LAST_WEIGHTS, PENDING, STATE, Progress, load_state, read_state, save_state
from selfalign.train.trainer import build_optimizer, build_scheduler

RESUME = ["train.checkpoint_every_steps=4", "train.epochs=2"]


def _losses(run: Path) -> list[dict]:
    rows = list(csv.DictReader(open(run / "log.csv")))
    return [{k: v for k, v in r.items() if k.startswith("loss_") or k in ("epoch", "step")} for r in rows]


def _same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(tmp_path):
    features = make_feature_store(tmp_path / "features", n_train=48, n_dev=8, n_test=8)
    overrides = tiny_overrides(features, tmp_path) + RESUME + ["data.dev_max_images=8"]
    reference = train(load_config(None, overrides + ["name=reference"]), progress=False)

    run = tmp_path / "killed"
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "selfalign.cli", "train", str(config), *overrides, "name=killed", "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = None
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline:
        if (run / STATE).is_file():
            state = read_state(run)
            if state["step_in_epoch"] > 0:  # a mid-epoch checkpoint exists: kill without warning
                proc.send_signal(signal.SIGKILL)
                seen = state["global_step"]
                break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert seen is not None, f"no mid-epoch checkpoint was seen (rc {proc.returncode}): {proc.stderr.read()[-500:]}"
    assert proc.returncode == -signal.SIGKILL
    assert read_state(run)["epoch"] < 2  # the run really was cut short

    resumed = subprocess.run([sys.executable, "-m", "selfalign.cli", "train", "--resume", str(run), "--quiet"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-1000:]
    assert _same_tensors(reference / LAST_WEIGHTS, run / LAST_WEIGHTS)  # bit-exact
    assert _same_tensors(reference / "model.safetensors", run / "model.safetensors")
    assert _losses(reference) == _losses(run)
    print(f"killed after the checkpoint of global step {seen}; resumed weights are bit-identical")


def _tiny_state(features: Path, tmp: Path):
    cfg = load_config(None, tiny_overrides(features, tmp))
    from selfalign.data.text import Vocabulary

    model = build_model(cfg, Vocabulary(["red", "circle"]))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 10)
    return model, optimizer, scheduler


def test_kill_between_state_and_weights_rename_is_completed(feature_store, tmp_path):
    model, optimizer, scheduler = _tiny_state(feature_store, tmp_path)
    save_state(tmp_path, model, optimizer, scheduler, Progress(0, 3, 3))
    old = (tmp_path / LAST_WEIGHTS).read_bytes()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_state(tmp_path, model, optimizer, scheduler, Progress(0, 4, 4))
    # as if killed after the state was replaced but before the new weights were renamed into place
    (tmp_path / PENDING).write_bytes((tmp_path / LAST_WEIGHTS).read_bytes())
    (tmp_path / LAST_WEIGHTS).write_bytes(old)
    fresh, opt2, sched2 = _tiny_state(feature_store, tmp_path)
    assert load_state(tmp_path, fresh, opt2, sched2, "cpu").global_step == 4
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert not (tmp_path / PENDING).exists()
    export = load_file(str(tmp_path / LAST_WEIGHTS))
    assert all(torch.equal(export[k], v) for k, v in model.state_dict().items())
    (tmp_path / LAST_WEIGHTS).write_bytes(old)  # now without pending weights: a clear error, never a silent mix
    with pytest.raises(InputError, match="does not belong"):
        load_state(tmp_path, fresh, opt2, sched2, "cpu")


def test_non_finite_weights_are_never_saved(feature_store, tmp_path):
    model, optimizer, scheduler = _tiny_state(feature_store, tmp_path)
    save_state(tmp_path, model, optimizer, scheduler, Progress(0, 1, 1))
    before = (tmp_path / STATE).read_bytes(), (tmp_path / LAST_WEIGHTS).read_bytes()
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="is not finite"):
        save_state(tmp_path, model, optimizer, scheduler, Progress(0, 2, 2))
    assert ((tmp_path / STATE).read_bytes(), (tmp_path / LAST_WEIGHTS).read_bytes()) == before


def test_damaged_state_is_a_clear_error(feature_store, tmp_path):
    model, optimizer, scheduler = _tiny_state(feature_store, tmp_path)
    with pytest.raises(InputError, match="no resumable checkpoint"):
        load_state(tmp_path, model, optimizer, scheduler, "cpu")
    (tmp_path / STATE).write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read the checkpoint"):
        load_state(tmp_path, model, optimizer, scheduler, "cpu")


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(feature_store, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = trainer_module.hinge_triplet_loss

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(trainer_module, "hinge_triplet_loss", flaky)
    cfg = load_config(None, tiny_overrides(feature_store, tmp_path) + ["train.checkpoint_every_steps=3"])
    needle = r"the loss became nan at epoch 1, step 7 \(global step 7; parts"
    with pytest.raises(TrainingDiverged, match=needle) as info:
        train(cfg, progress=False)
    assert "last good checkpoint" in str(info.value)
    run = tmp_path / "tiny"
    state = read_state(run)
    assert state["global_step"] == 6  # the checkpoint before the NaN, untouched
    weights = load_file(str(run / LAST_WEIGHTS))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())
    assert not (run / PENDING).exists()


def test_cli_reports_divergence_in_one_line(feature_store, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: 1\n")
    assert main(["train", str(config), *tiny_overrides(feature_store, tmp_path), "train.lr=1e30", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error:") and "global step" in err and "train.lr" in err
    assert not (tmp_path / "tiny" / STATE).exists()  # nothing was saved after the divergence


def test_resume_may_change_how_a_run_executes_but_not_what_it_learns(feature_store, tmp_path, capsys):
    cfg = load_config(None, tiny_overrides(feature_store, tmp_path) + ["train.checkpoint_every_steps=2"])
    run = train(cfg, progress=False, stop_after_steps=2)  # interrupted after its step-2 checkpoint
    assert read_state(run)["global_step"] == 2
    refused = main(["train", "--resume", str(run), "train.threads=2", "train.lr=0.1", "--quiet"])
    assert refused == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "train.threads" in err  # names the refused key and the ones that may change
    assert read_state(run)["global_step"] == 2  # nothing ran

    assert main(["train", "--resume", str(run), "train.threads=2", "train.checkpoint_every_steps=0", "--quiet"]) == 0
    saved = read_run_config(run)
    assert (saved.train.threads, saved.train.checkpoint_every_steps) == (2, 0)  # the config records what ran
    assert saved.train.lr == cfg.train.lr
    assert read_state(run)["epoch"] == cfg.train.epochs
