"""Model files: ``model.safetensors`` (weights) + ``config.json`` (resolved run config) + ``vocab.json``.

Loading is strict: a key that is missing or unexpected is an error, never silently ignored. A folder with an
``ensemble.json`` (:mod:`selfalign.model.ensemble`) loads as one model made of its member runs.
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
from selfalign.model.ensemble import ENSEMBLE, EnsembleModel, check_members, is_ensemble, read_members, write_ensemble
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
    is only valid for that model. An ensemble's: over its ``ensemble.json`` and its members' hashes now."""
    digest = hashlib.sha256()
    if is_ensemble(run_dir):
        file_digest(Path(run_dir) / ENSEMBLE, digest)
        for member in read_members(run_dir):
            digest.update(model_hash(member["run_dir"]).encode())
        return digest.hexdigest()
    for name in (CONFIG, VOCAB, WEIGHTS):
        path = Path(run_dir) / name
        if path.is_file():
            digest.update(name.encode() + b"\0")
            file_digest(path, digest)
    return digest.hexdigest()


def read_run_config(run_dir: str | Path) -> RunConfig:
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if is_ensemble(run_dir):
        raise InputError(f"{run_dir} is an ensemble of runs ({ENSEMBLE}), not a training run")
    if not run_dir.is_dir() or not path.is_file():
        raise InputError(f"{run_dir} is not a run directory (no {CONFIG})")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    return config_from_dict(values)


def _ensemble_members(ens_dir: Path) -> tuple[list[Path], list[RunConfig]]:
    """An ensemble's member runs and configs, refused when a member was retrained since the ensemble was made."""
    runs, configs = [], []
    for member in read_members(ens_dir):
        run = Path(member["run_dir"])
        if model_hash(run) != member["model_hash"]:
            raise InputError(f"{ens_dir / ENSEMBLE}: member {run} is not the model the ensemble was made with "
                             f"(retrained?); make it again with `selfalign ensemble ... --overwrite`")
        runs.append(run)
        configs.append(read_run_config(run))
    check_members(runs, configs)
    return runs, configs


def embedding_config(run_dir: str | Path) -> RunConfig:
    """The config that decides how a run (or an ensemble) embeds its inputs: the run's own, or the first member's
    (an ensemble's members agree on their inputs: ``ensemble.SHARED_KEYS``)."""
    if is_ensemble(run_dir):
        return _ensemble_members(Path(run_dir))[1][0]
    return read_run_config(run_dir)


def make_ensemble(run_dirs: list[str | Path], out: str | Path, overwrite: bool = False) -> Path:
    """Check ``run_dirs`` can form an ensemble and write ``OUT/ensemble.json``; returns its path."""
    runs = [Path(r).resolve() for r in run_dirs]
    for run in runs:
        if not run.is_dir():
            raise InputError(f"{run}: no such run folder")
    check_members(runs, [read_run_config(run) for run in runs])
    for run in runs:
        if not (run / WEIGHTS).is_file():
            raise InputError(f"{run} has no {WEIGHTS} (was training interrupted before the first checkpoint?)")
    return write_ensemble(out, [(run, model_hash(run)) for run in runs], overwrite)


def load_model(run_dir: str | Path, device: str | torch.device = "cpu",
               weights: str = WEIGHTS) -> tuple[RetrievalModel, RunConfig]:
    """Rebuild the model of a run directory and load its weights strictly; for an ensemble folder an
    :class:`EnsembleModel` of its members (each with ``weights``) and the first member's config."""
    run_dir = Path(run_dir)
    if is_ensemble(run_dir):
        runs, configs = _ensemble_members(run_dir)
        members = [load_model(run, device, weights)[0] for run in runs]
        return EnsembleModel(members).eval(), configs[0]  # type: ignore[return-value]
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
