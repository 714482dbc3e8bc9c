"""Several trained runs as one dual encoder, so that an ensemble is indexed and searched like a single run.

```
ENS_DIR/ensemble.json   {"format": "selfalign-ensemble", "version": 1,
                         "members": [{"run_dir": "/abs/run", "model_hash": "<sha256>"}, ...]}
```
Each side's embedding is the concatenation of the members' embeddings, each scaled by ``1/sqrt(n)``:

    image . text = (1/n) sum_m image_m . text_m

the mean of the members' similarity matrices (VSE∞'s ensemble evaluation) as one inner product, so a gallery
stores one vector per item and search stays a single dot product. A query costs n encoders and the vectors are
n times as wide. Members must read the same inputs (region kind, image size, detector, views, region width) and
score by embeddings (``model.similarity=dot``); ``checkpoint.load_model`` opens an ensemble folder like a run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfalign import atomic
from selfalign.config import RunConfig
from selfalign.data.text import TokenBatch
from selfalign.errors import InputError
from selfalign.model.model import Encoded, RetrievalModel

ENSEMBLE = "ensemble.json"
FORMAT, FORMAT_VERSION = "selfalign-ensemble", 1
# what decides a member's inputs: members that differ here cannot share one region tensor or one gallery
SHARED_KEYS = (("data", "regions"), ("data", "image_size"), ("data", "detector_path"), ("data", "detector_top_k"),
               ("data", "mirror_test"), ("model", "image_dim"), ("model", "similarity"))


def is_ensemble(run_dir: str | Path) -> bool:
    return (Path(run_dir) / ENSEMBLE).is_file()


def check_members(run_dirs: list[Path], configs: list[RunConfig]) -> None:
    """InputError unless there are at least two members, all dual encoders reading the same inputs
    (:data:`SHARED_KEYS`); the error names the first member and key that differ."""
    if len(run_dirs) < 2:
        raise InputError(f"an ensemble needs at least two runs, got {len(run_dirs)}")
    for run_dir, cfg in zip(run_dirs, configs):
        if cfg.model.similarity != "dot":
            raise InputError(f"{run_dir}: model.similarity={cfg.model.similarity} scores pairs by cross-attention; "
                             f"an ensemble concatenates embeddings")
        for section, key in SHARED_KEYS:
            mine, first = getattr(getattr(cfg, section), key), getattr(getattr(configs[0], section), key)
            if mine != first:
                raise InputError(f"{run_dir}: {section}.{key}={mine!r} but {run_dirs[0]} has {first!r}; an "
                                 f"ensemble's members read the same inputs")


def write_ensemble(out: str | Path, members: list[tuple[Path, str]], overwrite: bool = False) -> Path:
    """Write ``OUT/ensemble.json`` atomically for ``members`` [(absolute run_dir, model hash)]. A folder that holds
    anything but an ensemble is refused, and an ensemble unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not is_ensemble(out):
            raise InputError(f"{out}: exists and is not an ensemble folder; refusing to write into it")
        if not overwrite:
            raise InputError(f"{out}: already holds an ensemble; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    path = out / ENSEMBLE
    atomic.write_json(path, {"format": FORMAT, "version": FORMAT_VERSION,
                             "members": [{"run_dir": str(run), "model_hash": digest} for run, digest in members]})
    return path


def read_members(ens_dir: str | Path) -> list[dict[str, str]]:
    """The validated ``members`` of ``ENS_DIR/ensemble.json``: ``[{"run_dir", "model_hash"}]``."""
    path = Path(ens_dir) / ENSEMBLE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the ensemble ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
        raise InputError(f"{path}: not a {FORMAT} file of version {FORMAT_VERSION}")
    members = doc.get("members")
    if not isinstance(members, list) or len(members) < 2 or not all(
            isinstance(m, dict) and isinstance(m.get("run_dir"), str) and isinstance(m.get("model_hash"), str)
            for m in members):
        raise InputError(f"{path}: field 'members' must list at least two {{run_dir, model_hash}} objects")
    for m in members:
        if not Path(m["run_dir"]).is_dir():
            raise InputError(f"{path}: member {m['run_dir']} does not exist")
    return members


@dataclass
class EnsembleTokens:
    """One tokenisation per member (members may use different text encoders); ``words`` are the first member's."""

    parts: list[TokenBatch]

    def to(self, device: torch.device | str) -> "EnsembleTokens":
        return EnsembleTokens([p.to(device) for p in self.parts])

    @property
    def words(self) -> list[list[str]]:
        return self.parts[0].words

    @property
    def mask(self) -> torch.Tensor:
        return self.parts[0].mask


class EnsembleModel(nn.Module):
    """The members' ``encode_image`` / ``encode_text`` with concatenated, ``1/sqrt(n)``-scaled embeddings
    (``[B, sum E_m]``). ``base``, ``free``, ``context`` and ``mask`` of an :class:`Encoded` are the first member's
    (what :meth:`Gallery.explain` reads); SelfAlign's training losses are not available."""

    def __init__(self, members: list[RetrievalModel]) -> None:
        super().__init__()
        if len(members) < 2:
            raise InputError(f"an ensemble needs at least two models, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.scale = 1.0 / math.sqrt(len(members))
        self.model_cfg = members[0].model_cfg

    @property
    def vocab(self) -> Any:
        return self.members[0].vocab

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def embedding_dim(self) -> int:
        return sum(self.embedding_parts)

    @property
    def embedding_parts(self) -> tuple[int, ...]:
        """Each member's width, in the order of the concatenation."""
        return tuple(m.embedding_dim for m in self.members)

    def tokenize(self, captions: list[str]) -> EnsembleTokens:
        return EnsembleTokens([m.tokenize(captions) for m in self.members])

    def region_boxes(self, boxes: Any) -> Any:
        return self.members[0].region_boxes(boxes)

    def _combine(self, parts: list[Encoded]) -> Encoded:
        first = parts[0]
        embedding = torch.cat([p.embedding * self.scale for p in parts], dim=-1)
        return Encoded(embedding, first.base, first.free, first.context, first.mask)

    def encode_image(self, regions: torch.Tensor, mask: torch.Tensor) -> Encoded:
        """``regions [B, R, D_in]``, ``mask [B, R]`` -> Encoded with ``embedding [B, sum E_m]``."""
        return self._combine([m.encode_image(regions, mask) for m in self.members])

    def encode_text(self, tokens: EnsembleTokens) -> Encoded:
        """Tokens of :meth:`tokenize` -> Encoded with ``embedding [B, sum E_m]``."""
        if not isinstance(tokens, EnsembleTokens) or len(tokens.parts) != len(self.members):
            raise InputError("an ensemble encodes the tokens of its own tokenize()")
        return self._combine([m.encode_text(t) for m, t in zip(self.members, tokens.parts)])


def split_parts(vectors: torch.Tensor, parts: tuple[int, ...]) -> list[torch.Tensor]:
    """An ensemble's ``[N, sum E_m]`` vectors -> each member's own ``[N, E_m]`` (the ``1/sqrt(n)`` undone)."""
    if vectors.shape[-1] != sum(parts):
        raise InputError(f"expected vectors of width {sum(parts)} (members {list(parts)}), got {vectors.shape[-1]}")
    return [p * math.sqrt(len(parts)) for p in torch.split(vectors, list(parts), dim=-1)]


__all__ = ["ENSEMBLE", "EnsembleModel", "EnsembleTokens", "check_members", "is_ensemble", "read_members",
           "split_parts", "write_ensemble"]
