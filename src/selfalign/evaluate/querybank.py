"""Query-bank normalisation: discount the gallery items that every query scores high (hubs).

A dual encoder's embedding space has hubs: images (or captions) close to many queries, which crowd the top of
result lists they do not belong in. Scoring each item against a bank of training queries and taking the inverted
softmax (Smith et al. 2017; QB-Norm, Bogolin et al. 2022) ranks by how much more a query likes an item than queries
usually do:

    s'(q, g) = s(q, g) - (1/β) · log Σ_b exp(β · s(b, g))

with ``b`` the bank's queries of ``q``'s modality (training captions for text queries, training images for image
queries). The discount depends on ``g`` alone, so a gallery stores it beside ``g``'s vector as one extra dimension
(the query's extra coordinate is 1) and search stays a single inner product. The bank never holds a test query.

Each direction gets its own β, chosen on the dev split, or none: an image's discount changes only text->image
ranks and a caption's only image->text ranks, and a direction whose dev recall no β improves is left unnormalised
(on data where every query resembles every item, the discount removes signal, not hubs).

A run's bank is ``RUN_DIR/querybank.safetensors``: ``captions [Bt, E]``, ``images [Bi, E]`` and, as metadata, the two
βs, the hash of the model it was built with and the dev table that chose them. An ensemble
(:mod:`selfalign.model.ensemble`) has no bank of its own: :class:`EnsembleBank` discounts each member's slice of a
vector with that member's bank and averages the discounts, as the ensemble averages the members' scores.
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
from selfalign.model.checkpoint import file_digest, model_hash as run_model_hash
from selfalign.model.ensemble import is_ensemble, read_members, split_parts

BANK_FILE = "querybank.safetensors"
DEFAULT_BETAS = (1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 14.0, 20.0, 30.0, 50.0)
OFF = "off"
_CHUNK = 2048
_RECALLS = {"t2i": ("t2i_r1", "t2i_r5", "t2i_r10"), "i2t": ("i2t_r1", "i2t_r5", "i2t_r10")}


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
    """Embeddings of training queries: ``captions [Bt, E]`` (they discount images for text queries, with
    ``beta_images``) and ``images [Bi, E]`` (they discount captions for image queries, with ``beta_captions``); a β of
    None leaves that direction unnormalised."""

    captions: torch.Tensor
    images: torch.Tensor
    beta_images: float | None
    beta_captions: float | None
    info: dict[str, Any] = field(default_factory=dict)

    def image_discount(self, images: torch.Tensor) -> torch.Tensor:
        """Gallery images ``[N, E]`` -> ``[N]``, to subtract from text queries' scores (zeros when off)."""
        if self.beta_images is None:
            return torch.zeros(images.shape[0])
        return bank_discount(self.captions, images, self.beta_images)

    def caption_discount(self, captions: torch.Tensor) -> torch.Tensor:
        """Gallery captions ``[M, E]`` -> ``[M]``, to subtract from image queries' scores (zeros when off)."""
        if self.beta_captions is None:
            return torch.zeros(captions.shape[0])
        return bank_discount(self.images, captions, self.beta_captions)

    def describe(self) -> dict[str, Any]:
        """The βs and the bank's sizes, for reports: ``{"beta_images", "beta_captions", "captions", "images",
        "split"}``."""
        return {"beta_images": self.beta_images, "beta_captions": self.beta_captions,
                "captions": int(self.captions.shape[0]), "images": int(self.images.shape[0]),
                "split": self.info.get("split")}

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
            save_file(tensors, str(tmp), metadata={"beta_images": _beta_text(self.beta_images),
                                                   "beta_captions": _beta_text(self.beta_captions),
                                                   "info": json.dumps(self.info)})
        return path

    @property
    def splits(self) -> set[str]:
        """The split(s) the bank's queries were drawn from."""
        return {self.info["split"]} if self.info.get("split") else set()

    @classmethod
    def load(cls, run_dir: str | Path, model_hash: str | None = None) -> "QueryBank | EnsembleBank":
        """Read a run's bank; ``model_hash``: refuse a bank built with another model (the run was retrained). For
        an ensemble folder, its members' banks (each checked against its member's model) as an EnsembleBank."""
        if is_ensemble(run_dir):
            return EnsembleBank.load(run_dir)
        path = Path(run_dir) / BANK_FILE
        if not path.is_file():
            raise InputError(f"{run_dir} has no query bank ({BANK_FILE}); build one with `selfalign querybank "
                             f"{run_dir}`")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                captions, images = fh.get_tensor("captions"), fh.get_tensor("images")
            betas = _beta_value(meta["beta_images"]), _beta_value(meta["beta_captions"])
            info = json.loads(meta.get("info", "{}"))
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise InputError(f"{path}: not a query bank ({type(exc).__name__}: {exc})") from None
        if captions.ndim != 2 or images.ndim != 2 or captions.shape[1] != images.shape[1]:
            raise InputError(f"{path}: captions {tuple(captions.shape)} and images {tuple(images.shape)} are not "
                             f"two [B, E] matrices of one width")
        if model_hash is not None and info.get("model_hash") != model_hash:
            raise InputError(f"{path} was built with another model than the one in {run_dir} (retrained?); build it "
                             f"again with `selfalign querybank {run_dir}`")
        return cls(captions, images, *betas, info)

    @staticmethod
    def exists(run_dir: str | Path) -> bool:
        """Whether the run has a bank (an ensemble: whether every member has one)."""
        if is_ensemble(run_dir):
            return all((Path(m["run_dir"]) / BANK_FILE).is_file() for m in read_members(run_dir))
        return (Path(run_dir) / BANK_FILE).is_file()

    @staticmethod
    def remove(run_dir: str | Path) -> bool:
        """Delete a run's bank; whether there was one."""
        path = Path(run_dir) / BANK_FILE
        if not path.is_file():
            return False
        path.unlink()
        return True

    @staticmethod
    def file_hash(run_dir: str | Path) -> str:
        """sha256 of a run's bank file (an ensemble: of its members' files, in order): a gallery records it, so that
        images added later get the same discount."""
        if is_ensemble(run_dir):
            digest = hashlib.sha256()
            for member in read_members(run_dir):
                digest.update(file_digest(Path(member["run_dir"]) / BANK_FILE).hexdigest().encode())
            return digest.hexdigest()
        return file_digest(Path(run_dir) / BANK_FILE).hexdigest()


@dataclass(frozen=True)
class EnsembleBank:
    """An ensemble's members' banks, used as one: an item's discount is the mean of each member's discount of its
    own slice of the item's vector (the ensemble's score is the mean of the members' scores). A direction is
    discounted when any member discounts it; a member that does not contributes zero there."""

    banks: tuple[QueryBank, ...]

    @property
    def parts(self) -> tuple[int, ...]:
        return tuple(int(b.captions.shape[1]) for b in self.banks)

    @property
    def beta_images(self) -> list[float | None] | None:
        betas = [b.beta_images for b in self.banks]
        return None if all(b is None for b in betas) else betas

    @property
    def beta_captions(self) -> list[float | None] | None:
        betas = [b.beta_captions for b in self.banks]
        return None if all(b is None for b in betas) else betas

    @property
    def splits(self) -> set[str]:
        return set().union(*(b.splits for b in self.banks))

    @property
    def info(self) -> dict[str, Any]:
        return {"members": [b.info for b in self.banks]}

    def _mean(self, vectors: torch.Tensor, side: str) -> torch.Tensor:
        pieces = split_parts(vectors, self.parts)
        return sum(getattr(b, side)(p) for b, p in zip(self.banks, pieces)) / len(self.banks)

    def image_discount(self, images: torch.Tensor) -> torch.Tensor:
        """Ensemble image vectors ``[N, sum E_m]`` -> ``[N]``."""
        return self._mean(images, "image_discount")

    def caption_discount(self, captions: torch.Tensor) -> torch.Tensor:
        """Ensemble caption vectors ``[M, sum E_m]`` -> ``[M]``."""
        return self._mean(captions, "caption_discount")

    def normalise(self, sims: torch.Tensor, images: torch.Tensor,
                  captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`QueryBank.normalise`, for an ensemble's vectors."""
        return normalised_sims(sims, self.image_discount(images), self.caption_discount(captions))

    def describe(self) -> dict[str, Any]:
        """The members' βs and bank sizes as lists, in member order (a β entry None: that member does not
        discount that direction; the whole field None: no member does)."""
        return {"beta_images": self.beta_images, "beta_captions": self.beta_captions,
                "captions": [int(b.captions.shape[0]) for b in self.banks],
                "images": [int(b.images.shape[0]) for b in self.banks],
                "split": sorted(self.splits), "runs": [b.describe() for b in self.banks]}

    @classmethod
    def load(cls, ens_dir: str | Path) -> "EnsembleBank":
        """Every member's bank, checked against that member's model (InputError naming a member without one)."""
        banks = []
        for member in read_members(ens_dir):
            banks.append(QueryBank.load(member["run_dir"], run_model_hash(member["run_dir"])))
        return cls(tuple(banks))


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


def _beta_text(beta: float | None) -> str:
    return OFF if beta is None else repr(float(beta))


def _beta_value(text: str) -> float | None:
    return None if text == OFF else float(text)


def choose_betas(images: torch.Tensor, captions: torch.Tensor, bank_captions: torch.Tensor,
                 bank_images: torch.Tensor, betas: tuple[float, ...] = DEFAULT_BETAS,
                 fold5: bool = False) -> tuple[float | None, float | None, dict[str, Any]]:
    """Pick each direction's β on a dev split: ``images [N, E]``, ``captions [5N, E]``, the bank's ``[Bt, E]`` and
    ``[Bi, E]``. Text->image ranks depend only on the images' discount and image->text ranks only on the captions',
    so each direction takes the β with the best recall sum (R@1 + R@5 + R@10) of its own, or None when none beats
    the unnormalised scores. Returns (β for images, β for captions, table): the table holds each direction's recall
    sum by β (``"off"``: without normalisation) and the dev rsum without normalisation and with the chosen βs."""
    if not betas:
        raise InputError("choose_betas needs at least one beta")
    sims = images.float() @ captions.float().T
    plain = protocol_metrics(sims.numpy(), fold5)
    table: dict[str, Any] = {d: {OFF: round(sum(plain[k] for k in keys), 4)} for d, keys in _RECALLS.items()}
    for beta in betas:
        i2t, t2i = normalised_sims(sims, bank_discount(bank_captions, images, beta),
                                   bank_discount(bank_images, captions, beta))
        metrics = protocol_metrics(i2t.numpy(), fold5, t2i_sims=t2i.numpy())
        for direction, keys in _RECALLS.items():
            table[direction][_beta_text(beta)] = round(sum(metrics[k] for k in keys), 4)

    def best(direction: str) -> float | None:  # ties go to "off", then to the smaller β (the gentler discount)
        choice = max(table[direction], key=lambda b: (table[direction][b], b == OFF, -_beta_value(b) if b != OFF
                                                      else 0.0))
        return _beta_value(choice)

    beta_images, beta_captions = best("t2i"), best("i2t")
    table["rsum_plain"] = round(float(plain["rsum"]), 4)
    table["rsum_chosen"] = round(table["t2i"][_beta_text(beta_images)] + table["i2t"][_beta_text(beta_captions)], 4)
    return beta_images, beta_captions, table
