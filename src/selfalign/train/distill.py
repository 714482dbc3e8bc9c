"""Distillation targets: a trained teacher's embeddings of the training split (``train.distill_from``).

The teacher is a run or an ensemble folder (``selfalign ensemble``): an ensemble's accuracy taught to one model that
costs what one model costs at query time. Its embeddings of every training image (its two views averaged where the
run mirrors) and caption are computed once, at the start of the run, and kept in the run folder
(``teacher.safetensors``, with the teacher's model hash), so a resumed run reads them instead of recomputing and a
teacher retrained in between is refused rather than silently mixed in. A copy is also kept in the teacher's folder
(``distill_targets/``, one file per feature store, split and number of views): the next student of the same teacher
on the same data — another seed — starts from it instead of encoding the training split again (a hard link where
the filesystem allows, so the two names share one file on disk).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from selfalign import atomic
from selfalign import distributed as D
from selfalign.config import RunConfig
from selfalign.errors import ConfigError, InputError
from selfalign.evaluate.runner import encode_split
from selfalign.model.checkpoint import embedding_config, load_model, model_hash

TEACHER = "teacher.safetensors"
SHARED = "distill_targets"  # in the teacher's folder: targets any student of the same data may reuse


@dataclass
class TeacherTargets:
    """The teacher's ``images [N, E_t]`` and ``captions [5N, E_t]`` embeddings of the training split (float32,
    CPU); pair p is caption p of image p // 5."""

    images: torch.Tensor
    captions: torch.Tensor

    def similarities(self, pairs: np.ndarray) -> torch.Tensor:
        """Pair indices ``[B]`` -> the teacher's ``[B, B]`` similarities (row i = image of pair i, column j =
        caption of pair j), in the order of ``pairs``."""
        rows = torch.from_numpy(np.asarray(pairs, dtype=np.int64))
        return self.images.index_select(0, rows // 5) @ self.captions.index_select(0, rows).T


def check_distill_config(cfg: RunConfig) -> None:
    """The distillation keys, and the teacher they name, must be usable before any work starts."""
    weight, temperature = cfg.train.distill_weight, cfg.train.distill_temperature
    if not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"train.distill_weight: must be a finite number >= 0, got {weight}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ConfigError(f"train.distill_temperature: must be a finite number > 0, got {temperature}")
    if cfg.train.distill_from:
        _check_teacher(Path(cfg.train.distill_from), cfg)


def _check_teacher(teacher_dir: Path, cfg: RunConfig) -> None:
    """The teacher must read the student's feature store: the same kind of regions, of the same width."""
    if not teacher_dir.is_dir():
        raise InputError(f"train.distill_from: {teacher_dir} is not a run or ensemble folder")
    tcfg = embedding_config(teacher_dir)
    if tcfg.model.similarity != "dot":
        raise InputError(f"train.distill_from: {teacher_dir} scores pairs by cross-attention "
                         f"(model.similarity={tcfg.model.similarity}); a teacher must embed them")
    mine = (cfg.data.regions, cfg.model.image_dim, cfg.model.image_backbone_tail)
    theirs = (tcfg.data.regions, tcfg.model.image_dim, tcfg.model.image_backbone_tail)
    if mine != theirs:
        raise InputError(f"train.distill_from: {teacher_dir} reads regions={theirs[0]} ({theirs[1]}-d, "
                         f"image_backbone_tail={theirs[2]}) but this run's store {cfg.data.features} holds "
                         f"regions={mine[0]} ({mine[1]}-d, image_backbone_tail={mine[2]})")


def _compute(teacher_dir: Path, split, mirror, device: torch.device, progress: bool) -> TeacherTargets:
    with torch.random.fork_rng(devices=[]):  # building the teacher must not move the student's random streams
        model, _ = load_model(teacher_dir, device)
    if progress:
        print(f"distillation: embedding {len(split.image_ids)} training images and {len(split.captions)} captions "
              f"with the teacher {teacher_dir} (once; kept in the run folder and the teacher's)", flush=True)
    emb = encode_split(model, split, mirror=mirror)
    return TeacherTargets(emb.images.float(), emb.captions.float())


def teacher_targets(cfg: RunConfig, split, mirror, run_dir: Path, device: torch.device, is_main: bool,
                    resume: bool, progress: bool = True) -> TeacherTargets | None:
    """The teacher's embeddings of ``split`` (a FeatureSplit; ``mirror`` its mirrored copy or None), or None when
    the run does not distil; ``cfg`` has passed :func:`check_distill_config`. Rank 0 computes and saves them (or
    checks the saved ones); every rank then reads the saved file."""
    if not cfg.train.distill_from:
        return None
    path = Path(run_dir) / TEACHER
    if is_main:
        teacher_dir = Path(cfg.train.distill_from)
        expected = {"model_hash": model_hash(teacher_dir), "images": str(len(split.image_ids)),
                    "captions": str(len(split.captions)), "views": "2" if mirror is not None else "1"}
        if path.is_file():
            found = _read_metadata(path)
            if found != expected:
                if resume:
                    raise InputError(f"{path}: made with another teacher or training split ({found}); this run "
                                     f"now asks {teacher_dir} ({expected}). A resumed run keeps its teacher: "
                                     f"restore it, or start a new run")
                path.unlink()
        shared = _shared_path(teacher_dir, cfg, expected)
        if not path.is_file() and _shared_matches(shared, expected):
            if progress:
                print(f"distillation: the teacher's targets from {shared}", flush=True)
            atomic.link_or_copy(shared, path)
        if not path.is_file():
            targets = _compute(teacher_dir, split, mirror, device, progress)
            with atomic.atomic_path(path) as tmp:
                save_file({"images": targets.images.half().contiguous(),
                           "captions": targets.captions.half().contiguous()}, str(tmp), metadata=expected)
            try:
                atomic.link_or_copy(path, shared)
            except OSError as exc:  # a read-only teacher still teaches; the next student recomputes
                print(f"distillation: could not keep a copy in {shared.parent} ({exc})", flush=True)
    D.barrier()
    state = load_file(str(path))  # half precision on disk: similarities to ~1e-3, far below a temperature
    return TeacherTargets(state["images"].float(), state["captions"].float())


def _shared_path(teacher_dir: Path, cfg: RunConfig, expected: dict[str, str]) -> Path:
    """Where the teacher's folder keeps its targets of this run's training data: keyed on the feature store,
    the split and the views as well as the counts, so that two stores of the same size never share a file."""
    data = f"{Path(cfg.data.features).resolve()}\0{cfg.data.train_split}\0{expected['views']}"
    return teacher_dir / SHARED / f"{hashlib.sha256(data.encode()).hexdigest()[:16]}.safetensors"


def _shared_matches(shared: Path, expected: dict[str, str]) -> bool:
    """A teacher's kept targets serve only when made by the same teacher of the same data; one that is damaged or
    stale is recomputed (and replaced), not an error: it is a cache."""
    try:
        return shared.is_file() and _read_metadata(shared) == expected
    except InputError:
        return False


def _read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise InputError(f"{path}: cannot read the teacher's embeddings ({exc}); delete it to recompute") from None


__all__ = ["SHARED", "TEACHER", "TeacherTargets", "check_distill_config", "teacher_targets"]
