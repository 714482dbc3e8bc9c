"""Typed run configuration: frozen dataclasses loaded from YAML with ``section.key=value`` overrides.

Unknown keys and values of the wrong type are errors that name the key. Every run saves its resolved
configuration as ``config.json`` so that the run can be reproduced and its model rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from selfalign.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    """Where the captioned images and their extracted features live."""

    dataset: Literal["scenes", "flickr", "karpathy", "precomp", "folder"] = "scenes"
    root: str = "data/scenes"  # the dataset (images + captions + splits); unused for precomp
    features: str = "features/scenes"  # the feature store ({split}_ims.npy, ...)
    # tail: the 192-d map entering the backbone's top, for model.image_backbone_tail (extract --regions tail)
    regions: Literal["grid", "boxes", "detector", "tail"] = "boxes"
    detector_path: str = ""  # YOLOX-Nano ONNX file, for regions=detector
    detector_top_k: int = 20
    image_size: int = 224
    karpathy_json: str = ""  # for dataset=karpathy
    train_split: str = "train"
    dev_split: str = "dev"
    test_split: str = "test"
    dev_max_images: int = 1000  # validation uses at most this many dev images (VSE∞ truncates to 1K)
    region_dropout: float = 0.2  # VSE∞ size augmentation: drop this fraction of regions in training
    # Left-right flips, from the store's mirrored copies ({split}_mirror, `selfalign extract --mirror`): in training
    # each pair's image is its mirrored copy with probability 1/2; in evaluation (and in an index) an image's
    # embedding is the mean of its own and its mirrored copy's. Images are flipped, words are not: keep both off
    # when captions say left or right (training warns above 2 %; the built-in scenes: 45 %, Flickr8k: 0.4 %).
    mirror_train: bool = False
    mirror_test: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """The dual encoder: region-feature image encoder and word-sequence text encoder."""

    embed_dim: int = 512
    image_dim: int = 1280  # input region feature width (EfficientNet-Lite0: 1280; BUTD: 2048)
    image_context_layers: int = 1  # self-attention layers over regions (contextual image locals)
    image_context_heads: int = 4
    # A linear path from the mean of the input regions straight into the pooled image embedding, beside the
    # region encoder: with frozen features and little data the mean feature carries most of the signal.
    image_mean_skip: bool = False
    # Fine-tune EfficientNet-Lite0's top (its last stride-32 blocks and head, 2.4 M weights) inside the image
    # encoder, at backbone_lr_scale x the learning rate; needs a store of regions=tail (image_dim 192).
    image_backbone_tail: bool = False
    backbone_lr_scale: float = 0.1
    text_encoder: Literal["bigru", "minilm"] = "bigru"
    word_dim: int = 300
    glove: bool = False  # initialise word embeddings from GloVe 6B 50d (projected), bigru only
    gru_layers: int = 1
    max_words: int = 40
    minilm_lr_scale: float = 0.1  # the pretrained transformer trains at this fraction of the learning rate
    # fine-tune only the top N transformer layers (-1: all, with the embeddings; 0: none). The frozen lower layers
    # run without gradients and their outputs are cached per caption, which makes MiniLM affordable on a CPU
    minilm_trainable_layers: int = -1
    pooling: Literal["gpo", "mean"] = "gpo"
    dropout: float = 0.1
    # How a pair is scored. "dot": the dual encoder (one dot product of embeddings; indexable). "scan": the
    # cross-attention baseline (SCAN t2i over both encoders' contextual locals): every pair needs its own
    # attention, so nothing can be indexed; SelfAlign (align.*) is not used in such runs.
    similarity: Literal["dot", "scan"] = "dot"
    scan_pooling: Literal["lse", "mean"] = "lse"  # SCAN: how the per-word scores pool (LogSumExp or mean)
    scan_lambda_softmax: float = 9.0  # SCAN: inverse temperature of each word's attention over regions
    scan_lambda_lse: float = 6.0  # SCAN: LogSumExp sharpness (scan_pooling=lse)


@dataclass(frozen=True)
class AlignConfig:
    """SelfAlign: LCA (concept codebook) and CRA (context alignment)."""

    lca: bool = True
    cra: bool = True
    codebook_size: int = 1024
    sinkhorn_iters: int = 3
    sinkhorn_epsilon: float = 0.05
    student_temperature: float = 0.1
    # text_to_image is the default: on scenes it tied with symmetric (333.1 vs 333.6 rsum, 3 seeds each, inside
    # the seed spread) at ~10 % less step time; docs/RESULTS.md has the measurement.
    lca_direction: Literal["text_to_image", "symmetric"] = "text_to_image"
    lca_words: Literal["all", "noun", "adj", "verb"] = "all"
    freeze_codebook_epochs: int = 0
    # random: PyTorch's default init, as the official code. data: the prototypes start as a sample of the training
    # regions' context-free locals, so the first Sinkhorn codes are sharp (random prototypes give near-uniform ones).
    codebook_init: Literal["random", "data"] = "random"
    cra_temperature: float = 0.7
    cra_negatives: int = 512
    # each: every local of the pair is its own positive against the shared hard negatives (the official code);
    # pooled: the pair's locals share one numerator (multi-positive NCE), so words every caption has ("a", "the")
    # need not each beat their copies in other captions.
    cra_positives: Literal["each", "pooled"] = "each"
    lca_weight: float = 1.0
    cra_weight: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 1e-4
    lr_schedule: Literal["step", "cosine"] = "cosine"
    lr_decay_epoch: int = 15  # step schedule: ×0.1 from this epoch on
    warmup_epochs: int = 1  # sum-over-negatives before switching to the hardest negative (VSE∞)
    margin: float = 0.2
    grad_clip: float = 2.0
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # mixed precision (CUDA only)
    num_workers: int = 0  # unused: the trainer reads the feature store from memory; kept so older runs load
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    validate_every_epochs: int = 1
    checkpoint_every_steps: int = 0  # also write a resumable checkpoint every N steps (0: per epoch only)
    max_steps_per_epoch: int = 0  # 0: the whole training split
    # Distillation: a trained run or ensemble folder whose similarities the student also learns to reproduce
    # (losses.distillation_loss, weighted; "" = off). Its embeddings of the training split are computed once.
    distill_from: str = ""
    distill_weight: float = 1.0
    distill_temperature: float = 0.05


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs."""

    name: str = "run"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp``; strings from the command line are parsed."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"config key '{key}': union types are not supported")  # none are declared
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int or tp is float:
        # a float is no integer (1.5 would truncate silently); an int is a valid float
        accepted = (int, str) if tp is int else (int, float, str)
        expected = "an integer" if tp is int else "a number"
        if not isinstance(value, bool) and isinstance(value, accepted):
            try:
                return tp(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected {expected}, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, values[f.name], f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(values[f.name], tp, prefix + f.name)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if value is None:
        value = raw
    return key.strip().split("."), value


def merge_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides to a nested dict (values parsed as YAML scalars)."""
    values = json.loads(json.dumps(values))  # deep copy of plain data
    for text in overrides:
        path, value = _parse_override(text)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
        node[path[-1]] = value
    return values


def config_from_dict(values: dict, cls: type = RunConfig) -> Any:
    """Build a frozen config from nested plain data; unknown keys and wrong types raise ConfigError."""
    return _build(cls, values or {}, "")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a RunConfig from a YAML (or JSON) file plus ``section.key=value`` overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML ({exc})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping")
    try:
        return config_from_dict(merge_overrides(values, overrides or []))
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


# What a resumed run may change: how it executes, never what it learns.
RESUME_OVERRIDABLE = ("train.threads", "train.checkpoint_every_steps")


def resume_config(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A resumed run's saved config with ``section.key=value`` overrides of the keys in RESUME_OVERRIDABLE only
    (e.g. more threads once the machine is free); any other key is a ConfigError that names it."""
    for text in overrides:
        key = ".".join(_parse_override(text)[0])
        if key not in RESUME_OVERRIDABLE:
            raise ConfigError(f"config key '{key}': a resumed run keeps the config it started with; only "
                              f"{', '.join(RESUME_OVERRIDABLE)} may change on --resume")
    return config_from_dict(merge_overrides(config_to_dict(cfg), overrides))


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def replace(cfg: Any, **changes: Any) -> Any:
    """Return a copy of a frozen config with top-level fields replaced."""
    return dataclasses.replace(cfg, **changes)
