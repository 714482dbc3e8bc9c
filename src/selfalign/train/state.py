"""Resumable training state: weights (safetensors) + optimizer, scheduler, RNG, epoch and step (``train_state.pt``).

Both files are written atomically, weights first; ``train_state.pt`` names the step its weights belong to, so a
crash between the two writes is detected rather than resumed from mismatched files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from selfalign import atomic
from selfalign.errors import InputError
from selfalign.model.checkpoint import save_weights

LAST_WEIGHTS, STATE = "last.safetensors", "train_state.pt"


@dataclass
class Progress:
    epoch: int = 0  # the epoch in progress
    step_in_epoch: int = 0  # batches of that epoch already done
    global_step: int = 0
    best_rsum: float = float("-inf")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_state(run_dir: Path, model, optimizer, scheduler, progress: Progress) -> None:
    save_weights(model, run_dir / LAST_WEIGHTS)
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "epoch": progress.epoch,
        "step_in_epoch": progress.step_in_epoch,
        "global_step": progress.global_step,
        "best_rsum": progress.best_rsum,
        "weights_sha256": _digest(run_dir / LAST_WEIGHTS),
    }
    with atomic.atomic_path(run_dir / STATE) as tmp:
        torch.save(state, tmp)


def load_state(run_dir: Path, model, optimizer, scheduler, device) -> Progress:
    state_path, weights_path = run_dir / STATE, run_dir / LAST_WEIGHTS
    if not state_path.is_file() or not weights_path.is_file():
        raise InputError(f"{run_dir} has no resumable checkpoint ({STATE} and {LAST_WEIGHTS})")
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    if state["weights_sha256"] != _digest(weights_path):
        raise InputError(f"{weights_path} does not belong to {state_path} (interrupted between the two writes)")
    model.load_state_dict(load_file(str(weights_path), device=str(device)), strict=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return Progress(state["epoch"], state["step_in_epoch"], state["global_step"], state["best_rsum"])
