"""Resumable training state: weights ``last.safetensors`` + ``train_state.pt`` (optimizer, scheduler, every rank's
RNG, epoch and step, and the SHA-256 of the weights file it belongs to).

The two files are committed in three atomic steps: the new weights go to ``.last.safetensors.pending``, then the
state naming their hash replaces ``train_state.pt``, then the pending file replaces ``last.safetensors``. A crash
at any point leaves a resumable pair: before the state write the old pair is intact; after it, ``load_state`` finds
the pending weights by their hash and completes the rename. Nothing is written unless every weight and optimizer
value is finite, so a good checkpoint is never replaced by a diverged one.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from selfalign import atomic
from selfalign.errors import InputError, SelfAlignError

LAST_WEIGHTS, STATE = "last.safetensors", "train_state.pt"
PENDING = f".{LAST_WEIGHTS}.pending"


class TrainingDiverged(SelfAlignError):
    """The loss, a gradient or a weight became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class Progress:
    epoch: int = 0  # the epoch in progress
    step_in_epoch: int = 0  # batches of that epoch already done
    global_step: int = 0
    best_rsum: float = float("-inf")
    epoch_sums: dict = field(default_factory=dict)  # summed loss parts of the epoch in progress (for its log row)


def rng_snapshot() -> dict:
    """This process's torch RNG states (CPU and, when present, every CUDA device)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(snapshot: dict) -> None:
    torch.set_rng_state(snapshot["torch"])
    if snapshot["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(snapshot["cuda"])


def _named_tensors(model, optimizer):
    yield from (("weight", k, v) for k, v in model.state_dict().items())
    if optimizer is not None:
        for slot in optimizer.state.values():
            yield from (("optimizer state", k, v) for k, v in slot.items() if torch.is_tensor(v))


def require_finite(model, optimizer=None) -> None:
    """Raise TrainingDiverged naming the first weight (or optimizer value) that is NaN or infinite.

    Fast path: one sum per tensor (NaN and inf propagate through it), one device sync; only if a sum is not finite
    (or overflowed) are the tensors checked element by element.
    """
    named = [(kind, k, v) for kind, k, v in _named_tensors(model, optimizer) if v.is_floating_point() and v.numel()]
    if not named:
        return
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, _, v in named:
        by_device.setdefault(v.device, []).append(v.detach().float().sum())
    if all(bool(torch.isfinite(torch.stack(sums)).all()) for sums in by_device.values()):
        return
    for kind, key, value in named:
        if not bool(torch.isfinite(value).all()):
            raise TrainingDiverged(f"{kind} '{key}' is not finite; the checkpoint was not written")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_state(run_dir: Path, model, optimizer, scheduler, progress: Progress,
               rng_states: list[dict] | None = None) -> None:
    """Write the checkpoint (main process only). ``rng_states``: every rank's ``rng_snapshot()`` (default: this one)."""
    run_dir = Path(run_dir)
    require_finite(model, optimizer)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic.atomic_path(run_dir / PENDING) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states or [rng_snapshot()],
        "epoch": progress.epoch,
        "step_in_epoch": progress.step_in_epoch,
        "global_step": progress.global_step,
        "best_rsum": progress.best_rsum,
        "epoch_sums": dict(progress.epoch_sums),
        "weights_sha256": _sha256(run_dir / PENDING),
    }
    with atomic.atomic_path(run_dir / STATE) as tmp:
        torch.save(state, tmp)
    os.replace(run_dir / PENDING, run_dir / LAST_WEIGHTS)


def read_state(run_dir: Path) -> dict:
    """The raw checkpoint dict of ``run_dir`` (an InputError names a missing or unreadable file)."""
    path = Path(run_dir) / STATE
    if not path.is_file():
        raise InputError(f"{run_dir} has no resumable checkpoint ({STATE})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged pickle/zip
        raise InputError(f"{path}: cannot read the checkpoint ({exc})") from None


def _commit_weights(run_dir: Path, expected: str) -> Path:
    """``last.safetensors`` if it matches the state's hash, after completing an interrupted commit if need be."""
    weights, pending = run_dir / LAST_WEIGHTS, run_dir / PENDING
    if weights.is_file() and _sha256(weights) == expected:
        return weights
    if pending.is_file() and _sha256(pending) == expected:  # killed between the state write and the rename
        os.replace(pending, weights)
        return weights
    raise InputError(f"{weights} does not belong to {run_dir / STATE} (the weights were changed or damaged)")


def load_state(run_dir: Path, model, optimizer, scheduler, device, rank: int = 0, world_size: int = 1) -> Progress:
    """Restore a checkpoint into ``model``, ``optimizer`` and ``scheduler``; return where training stands.

    The RNG of rank r is restored when the checkpoint was written by the same number of processes; otherwise it is
    reseeded from (global step, rank) — the run continues correctly but not bit-identically.
    """
    run_dir = Path(run_dir)
    state = read_state(run_dir)
    weights = _commit_weights(run_dir, state["weights_sha256"])
    model.load_state_dict(load_file(str(weights), device=str(device)), strict=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rngs = state.get("rng") or [{"torch": state["torch_rng"], "cuda": state.get("cuda_rng", [])}]
    if len(rngs) == world_size:
        restore_rng(rngs[rank])
    else:
        torch.manual_seed(1_000_003 * int(state["global_step"]) + rank)
    return Progress(state["epoch"], state["step_in_epoch"], state["global_step"], state["best_rsum"],
                    dict(state.get("epoch_sums", {})))
