"""Model files: ``model.safetensors`` (weights) + ``config.json`` (resolved run config) + ``vocab.json``.

Loading is strict: a key that is missing or unexpected is an error, never silently ignored.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from selfalign import atomic
from selfalign.config import RunConfig, config_from_dict, config_to_dict
from selfalign.data.text import Vocabulary
from selfalign.errors import InputError, SelfAlignError
from selfalign.model.model import RetrievalModel

WEIGHTS, CONFIG, VOCAB = "model.safetensors", "config.json", "vocab.json"


def build_model(cfg: RunConfig, vocab: Vocabulary | None, init_pretrained: bool = True) -> RetrievalModel:
    return RetrievalModel(cfg.model, cfg.align, vocab, init_pretrained)


def save_weights(model: RetrievalModel, path: str | Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic.atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


def save_run_files(run_dir: str | Path, cfg: RunConfig, vocab: Vocabulary | None) -> None:
    run_dir = Path(run_dir)
    atomic.write_json(run_dir / CONFIG, config_to_dict(cfg))
    if vocab is not None:
        vocab.save(run_dir / VOCAB)


def file_digest(path: str | Path, digest=None):
    """``digest`` (a new sha256 by default) updated with the bytes of ``path``, read 1 MiB at a time."""
    digest = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest


def model_hash(run_dir: str | Path) -> str:
    """sha256 over the run's config, vocabulary and weights: what was derived from a model (a gallery, a query bank)
    is only valid for that model."""
    digest = hashlib.sha256()
    for name in (CONFIG, VOCAB, WEIGHTS):
        path = Path(run_dir) / name
        if path.is_file():
            digest.update(name.encode() + b"\0")
            file_digest(path, digest)
    return digest.hexdigest()


def read_run_config(run_dir: str | Path) -> RunConfig:
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not run_dir.is_dir() or not path.is_file():
        raise InputError(f"{run_dir} is not a run directory (no {CONFIG})")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    return config_from_dict(values)


def load_model(run_dir: str | Path, device: str | torch.device = "cpu",
               weights: str = WEIGHTS) -> tuple[RetrievalModel, RunConfig]:
    """Rebuild the model of a run directory and load its weights strictly."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    vocab = Vocabulary.load(run_dir / VOCAB) if cfg.model.text_encoder == "bigru" else None
    weights_path = run_dir / weights
    if not weights_path.is_file():
        raise InputError(f"{run_dir} has no {weights} (was training interrupted before the first checkpoint?)")
    model = build_model(cfg, vocab, init_pretrained=False)
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise InputError(f"{weights_path}: cannot read weights ({exc})") from None
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise SelfAlignError(f"{weights_path} does not match {run_dir / CONFIG}: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), cfg
