"""Distillation from a teacher run or ensemble (train.distill_from): targets, caching, resume, errors."""

import csv

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_overrides
from selfalign.config import load_config
from selfalign.data.precomp import load_feature_split
from selfalign.errors import ConfigError, InputError
from selfalign.evaluate.runner import encode_split
from selfalign.model.checkpoint import load_model, make_ensemble, model_hash
from selfalign.train import train
from selfalign.train import distill
from selfalign.train.distill import SHARED, TEACHER


@pytest.fixture(scope="module")
def teachers(feature_store, tmp_path_factory):
    """Two tiny trained runs (seeds 0 and 1) and their ensemble folder."""
    out = tmp_path_factory.mktemp("teachers")
    runs = [train(load_config(None, tiny_overrides(feature_store, out, f"t{seed}") + [f"train.seed={seed}"]),
                  progress=False) for seed in (0, 1)]
    return runs, make_ensemble(runs, out / "ens").parent


def _student(feature_store, tmp_path, teacher, *extra):
    return load_config(None, tiny_overrides(feature_store, tmp_path, "student")
                       + [f"train.distill_from={teacher}", *extra])


def test_student_learns_from_an_ensemble_and_keeps_its_targets(feature_store, teachers, tmp_path):
    runs, ens = teachers
    run = train(_student(feature_store, tmp_path, ens), progress=False)
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert float(rows[-1]["loss_distill"]) < float(rows[0]["loss_distill"])
    with safe_open(str(run / TEACHER), framework="pt") as fh:
        assert fh.metadata()["model_hash"] == model_hash(ens)
        images, captions = fh.get_tensor("images").float(), fh.get_tensor("captions").float()
    model, _ = load_model(ens)
    emb = encode_split(model, load_feature_split(feature_store, "train"))
    assert images.shape == emb.images.shape and captions.shape == emb.captions.shape
    # the teacher's similarities, kept in half precision
    assert torch.allclose(images @ captions.T, emb.images @ emb.captions.T, atol=5e-3)


def test_a_second_student_of_the_same_teacher_reuses_its_targets(feature_store, teachers, tmp_path, monkeypatch):
    runs, _ = teachers
    first = train(_student(feature_store, tmp_path / "a", runs[1], "train.epochs=1"), progress=False)
    kept = list((runs[1] / SHARED).glob("*.safetensors"))
    assert len(kept) == 1 and kept[0].read_bytes() == (first / TEACHER).read_bytes()

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher's targets were recomputed")

    with monkeypatch.context() as patch:  # the next seed reads the teacher's copy instead of encoding again
        patch.setattr(distill, "_compute", refuse)
        second = train(_student(feature_store, tmp_path / "b", runs[1], "train.epochs=1", "train.seed=1"),
                       progress=False)
    assert (second / TEACHER).read_bytes() == (first / TEACHER).read_bytes()
    kept[0].unlink()  # the runs' hard links keep the targets; the teacher's copy is now a broken file
    kept[0].write_bytes(b"damaged")  # a cache miss: recomputed and replaced, not an error
    third = train(_student(feature_store, tmp_path / "c", runs[1], "train.epochs=1"), progress=False)
    assert (third / TEACHER).read_bytes() == kept[0].read_bytes()
    with safe_open(str(third / TEACHER), framework="pt") as new, safe_open(str(first / TEACHER), framework="pt") as old:
        assert new.metadata() == old.metadata()  # (safetensors orders a header's keys freely: compare them as dicts)
        assert all(torch.equal(new.get_tensor(k), old.get_tensor(k)) for k in ("images", "captions"))


def test_zero_weight_leaves_the_student_exactly_as_without_a_teacher(feature_store, teachers, tmp_path):
    runs, _ = teachers
    plain = train(load_config(None, tiny_overrides(feature_store, tmp_path, "plain")), progress=False)
    taught = train(_student(feature_store, tmp_path, runs[0], "train.distill_weight=0"), progress=False)
    a, b = load_model(plain)[0].state_dict(), load_model(taught)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # loading the teacher moved no random stream


def test_resume_refuses_a_changed_teacher(feature_store, teachers, tmp_path):
    runs, _ = teachers
    cfg = _student(feature_store, tmp_path, runs[0], "train.checkpoint_every_steps=1")
    run = train(cfg, progress=False, stop_after_steps=2)
    train(cfg, resume=True, run_dir=run, progress=False, stop_after_steps=1)  # same teacher: its file is reused
    moved = _student(feature_store, tmp_path, runs[1], "train.checkpoint_every_steps=1")
    with pytest.raises(InputError, match="another teacher"):
        train(moved, resume=True, run_dir=run, progress=False)


@pytest.mark.parametrize("override, error, needle", [
    ("train.distill_temperature=0", ConfigError, "train.distill_temperature"),
    ("train.distill_weight=-1", ConfigError, "train.distill_weight"),
    ("data.regions=grid", InputError, "reads regions=boxes .* holds regions=grid"),
])
def test_bad_distillation_settings_are_named(feature_store, teachers, tmp_path, override, error, needle):
    runs, _ = teachers
    with pytest.raises(error, match=needle):
        train(_student(feature_store, tmp_path, runs[0], override), progress=False)


def test_missing_teacher_is_named_before_anything_is_written(feature_store, tmp_path):
    with pytest.raises(InputError, match="train.distill_from: .*nowhere"):
        train(_student(feature_store, tmp_path, tmp_path / "nowhere"), progress=False)
    assert not (tmp_path / "student").exists()
