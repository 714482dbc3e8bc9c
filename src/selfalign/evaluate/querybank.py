"""Query-bank normalisation: discount the gallery items that every query scores high (hubs).

A dual encoder's embedding space has hubs: images (or captions) close to many queries, which crowd the top of
result lists they do not belong in. Scoring each item against a bank of training queries and taking the inverted
softmax (Smith et al. 2017; QB-Norm, Bogolin et al. 2022) ranks by how much more a query likes an item than queries
usually do:

    s'(q, g) = s(q, g) - (1/β) · log Σ_b exp(β · s(b, g))

with ``b`` the bank's queries of ``q``'s modality (training captions for text queries, training images for image
queries). The discount depends on ``g`` alone, so a gallery stores it beside ``g``'s vector as one extra dimension
(the query's extra coordinate is 1) and search stays a single inner product. β is chosen on the dev split; the bank
never holds a test query.

A run's bank is ``RUN_DIR/querybank.safetensors``: ``captions [Bt, E]``, ``images [Bi, E]`` and, as metadata, β,
the hash of the model it was built with and the dev table that chose β.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from selfalign import atomic
from selfalign.errors import InputError
from selfalign.evaluate.metrics import protocol_metrics

BANK_FILE = "querybank.safetensors"
DEFAULT_BETAS = (1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 14.0, 20.0, 30.0, 50.0)
_CHUNK = 2048


def bank_discount(bank: torch.Tensor, items: torch.Tensor, beta: float, chunk: int = _CHUNK) -> torch.Tensor:
    """``(1/β) · logsumexp_b(β · bank_b · item)`` for every item: ``bank [B, E]``, ``items [N, E]`` -> ``[N]``.

    Items are taken ``chunk`` at a time, so memory stays at ``[B, chunk]`` whatever the gallery's size.
    """
    if beta <= 0:
        raise InputError(f"the query bank's beta must be positive, got {beta}")
    bank = bank.float()
    out = [torch.logsumexp(beta * (bank @ items[s:s + chunk].float().T), dim=0) / beta
           for s in range(0, items.shape[0], chunk)]
    return torch.cat(out) if out else torch.zeros(0)


@dataclass(frozen=True)
class QueryBank:
    """Embeddings of training queries: ``captions [Bt, E]`` (they discount images for text queries) and
    ``images [Bi, E]`` (they discount captions for image queries), and the inverse temperature ``beta``."""

    captions: torch.Tensor
    images: torch.Tensor
    beta: float
    info: dict[str, Any] = field(default_factory=dict)

    def image_discount(self, images: torch.Tensor) -> torch.Tensor:
        """Gallery images ``[N, E]`` -> ``[N]``, to subtract from text queries' scores."""
        return bank_discount(self.captions, images, self.beta)

    def caption_discount(self, captions: torch.Tensor) -> torch.Tensor:
        """Gallery captions ``[M, E]`` -> ``[M]``, to subtract from image queries' scores."""
        return bank_discount(self.images, captions, self.beta)

    def normalise(self, sims: torch.Tensor, images: torch.Tensor,
                  captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sims [N, 5N]`` of ``images [N, E]`` x ``captions [5N, E]`` -> (``[N, 5N]`` for image->text ranking,
        ``[N, 5N]`` for text->image ranking)."""
        return normalised_sims(sims, self.image_discount(images), self.caption_discount(captions))

    def save(self, run_dir: str | Path) -> Path:
        """Write ``RUN_DIR/querybank.safetensors`` atomically."""
        path = Path(run_dir) / BANK_FILE
        tensors = {"captions": self.captions.float().contiguous(), "images": self.images.float().contiguous()}
        with atomic.atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"beta": repr(float(self.beta)), "info": json.dumps(self.info)})
        return path

    @classmethod
    def load(cls, run_dir: str | Path, model_hash: str | None = None) -> "QueryBank":
        """Read a run's bank; ``model_hash``: refuse a bank built with another model (the run was retrained)."""
        path = Path(run_dir) / BANK_FILE
        if not path.is_file():
            raise InputError(f"{run_dir} has no query bank ({BANK_FILE}); build one with `selfalign querybank "
                             f"{run_dir}`")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                captions, images = fh.get_tensor("captions"), fh.get_tensor("images")
            beta, info = float(meta["beta"]), json.loads(meta.get("info", "{}"))
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise InputError(f"{path}: not a query bank ({type(exc).__name__}: {exc})") from None
        if captions.ndim != 2 or images.ndim != 2 or captions.shape[1] != images.shape[1]:
            raise InputError(f"{path}: captions {tuple(captions.shape)} and images {tuple(images.shape)} are not "
                             f"two [B, E] matrices of one width")
        if model_hash is not None and info.get("model_hash") != model_hash:
            raise InputError(f"{path} was built with another model than the one in {run_dir} (retrained?); build it "
                             f"again with `selfalign querybank {run_dir}`")
        return cls(captions, images, beta, info)

    @staticmethod
    def exists(run_dir: str | Path) -> bool:
        return (Path(run_dir) / BANK_FILE).is_file()

    @staticmethod
    def file_hash(run_dir: str | Path) -> str:
        """sha256 of a run's bank file: a gallery records it, so that images added later get the same discount."""
        digest = hashlib.sha256()
        with open(Path(run_dir) / BANK_FILE, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()


def normalised_sims(sims: torch.Tensor, image_discount: torch.Tensor,
                    caption_discount: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sims [N, M]`` -> (image->text scores ``sims - caption_discount[None]``, text->image scores
    ``sims - image_discount[:, None]``), both ``[N, M]``."""
    return sims - caption_discount[None, :], sims - image_discount[:, None]


def sample_rows(n: int, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` of ``range(n)`` (all when ``limit`` <= 0 or >= n), drawn with ``seed``, sorted."""
    if limit <= 0 or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def choose_beta(images: torch.Tensor, captions: torch.Tensor, bank_captions: torch.Tensor,
                bank_images: torch.Tensor, betas: tuple[float, ...] = DEFAULT_BETAS,
                fold5: bool = False) -> tuple[float, dict[str, float], float]:
    """Pick β by rsum on a dev split: ``images [N, E]``, ``captions [5N, E]``, the bank's ``[Bt, E]`` and
    ``[Bi, E]``. Returns (β, {β: rsum}, rsum without normalisation)."""
    if not betas:
        raise InputError("choose_beta needs at least one beta")
    sims = images.float() @ captions.float().T
    plain = float(protocol_metrics(sims.numpy(), fold5)["rsum"])
    table: dict[str, float] = {}
    for beta in betas:
        i2t, t2i = normalised_sims(sims, bank_discount(bank_captions, images, beta),
                                   bank_discount(bank_images, captions, beta))
        table[repr(float(beta))] = round(float(protocol_metrics(i2t.numpy(), fold5, t2i_sims=t2i.numpy())["rsum"]), 4)
    best = max(betas, key=lambda b: (table[repr(float(b))], -b))  # ties: the smaller beta, the gentler discount
    return float(best), table, plain
