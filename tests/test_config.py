import json

import pytest

from selfalign.config import RunConfig, config_from_dict, config_to_dict, load_config, resume_config
from selfalign.errors import ConfigError


def test_defaults_round_trip_through_json():
    cfg = RunConfig()
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ntrain:\n  lr: 0.001\n  epochs: 3\nalign:\n  lca: false\n")
    cfg = load_config(path, ["train.epochs=5", "model.pooling=mean", "align.cra=false"])
    assert (cfg.name, cfg.train.lr, cfg.train.epochs) == ("x", 0.001, 5)
    assert cfg.model.pooling == "mean" and not cfg.align.lca and not cfg.align.cra


@pytest.mark.parametrize("text,key", [
    ("trian:\n  lr: 1\n", "trian"),
    ("train:\n  lrr: 1\n", "train.lrr"),
])
def test_unknown_key_is_named(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'") as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("override,msg", [
    ("train.epochs=abc", "train.epochs': expected an integer"),
    ("train.lr=fast", "train.lr': expected a number"),
    ("align.lca=maybe", "align.lca': expected true/false"),
    ("model.pooling=max", "model.pooling'"),
    ("train=3", "train'"),
])
def test_wrong_types_are_named(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


@pytest.mark.parametrize("text,msg", [
    ("train:\n  epochs: 1.5\n", "train.epochs': expected an integer, got 1.5"),
    ("train:\n  epochs: true\n", "train.epochs': expected an integer, got True"),
    ("train:\n  lr: [0.1]\n", r"train.lr': expected a number, got \[0.1\]"),
    ("train:\n  lr: false\n", "train.lr': expected a number, got False"),
])
def test_yaml_values_of_the_wrong_type_are_named(tmp_path, text, msg):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=msg):
        load_config(path)


def test_yaml_numbers_are_coerced(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 4\n  lr: 1\n")
    cfg = load_config(path)
    assert cfg.train.epochs == 4 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(Exception):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_resume_config_takes_only_execution_keys():
    cfg = load_config(None, ["train.threads=1", "train.lr=0.001"])
    resumed = resume_config(cfg, ["train.threads=2", "train.checkpoint_every_steps=50"])
    assert (resumed.train.threads, resumed.train.checkpoint_every_steps, resumed.train.lr) == (2, 50, 0.001)
    for key in ("train.lr=0.1", "model.embed_dim=64", "name=other", "train.threads.x=1"):
        with pytest.raises(ConfigError, match="may change on --resume"):
            resume_config(cfg, [key])
    with pytest.raises(ConfigError, match="train.threads"):
        resume_config(cfg, ["train.threads=two"])  # an allowed key still gets its type checked
