"""Encode a feature-store split with a model and score it with the field's protocol."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from selfalign.data.batches import RegionStore
from selfalign.errors import InputError
from selfalign.evaluate.metrics import protocol_metrics
from selfalign.evaluate.querybank import QueryBank
from selfalign.model.model import RetrievalModel


@dataclass
class SplitLocals:
    """What a cross-attention model scores: ``images [N, R, d]`` + ``image_mask [N, R]``, ``captions [M, L, d]`` +
    ``caption_mask [M, L]`` (float32, CPU), and ``score(...) -> [N, M]``, the model's batched scorer."""

    images: torch.Tensor
    image_mask: torch.Tensor
    captions: torch.Tensor
    caption_mask: torch.Tensor
    score: Callable[..., torch.Tensor]
    device: torch.device


@dataclass
class SplitEmbeddings:
    """``images [N, E]`` and ``captions [5N, E]`` embeddings of one split (float32, CPU); ``locals`` is set when
    the model scores pairs by cross-attention (``model.similarity=scan``), and then scoring uses it instead."""

    images: torch.Tensor
    captions: torch.Tensor
    seconds: float
    locals: SplitLocals | None = None


def _pad_cat(parts: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``[b, L_i, d]`` blocks (and ``[b, L_i]`` masks) padded to the largest L_i."""
    width = max(p.shape[1] for p in parts)
    out = torch.cat([torch.nn.functional.pad(p, (0, 0, 0, width - p.shape[1])) for p in parts])
    return out, torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks])


def _collect(model: RetrievalModel, encoded, with_locals: bool):
    """Concatenate the embeddings (and, for SCAN scoring, the padded locals) of a stream of Encoded batches."""
    out, locs, masks = [], [], []
    for enc in encoded:
        out.append(enc.embedding.float().cpu())
        if with_locals:
            loc, m = model.scoring_locals(enc)
            locs.append(loc.float().cpu())
            masks.append(m.cpu())
    return torch.cat(out), (_pad_cat(locs, masks) if with_locals else None)


@torch.inference_mode()
def _encode_images(model: RetrievalModel, store: RegionStore, batch_size: int, with_locals: bool,
                   rows: np.ndarray | None = None):
    rows = np.arange(len(store)) if rows is None else np.asarray(rows)
    batches = (store.get(rows[start:start + batch_size], model.device) for start in range(0, len(rows), batch_size))
    return _collect(model, (model.encode_image(regions, mask) for regions, mask in batches), with_locals)


@torch.inference_mode()
def _encode_captions(model: RetrievalModel, captions: list[str], batch_size: int, with_locals: bool):
    tokens = (model.tokenize(captions[start:start + batch_size]).to(model.device)
              for start in range(0, len(captions), batch_size))
    return _collect(model, (model.encode_text(t) for t in tokens), with_locals)


def encode_images(model: RetrievalModel, store: RegionStore, batch_size: int = 256,
                  rows: np.ndarray | None = None) -> torch.Tensor:
    """All images of ``store`` -> ``[N, E]``; ``rows``: only these images, in this order -> ``[len(rows), E]``."""
    return _encode_images(model, store, batch_size, False, rows)[0]


def encode_captions(model: RetrievalModel, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """Caption strings -> ``[M, E]``."""
    return _encode_captions(model, captions, batch_size, False)[0]


def average_views(a: torch.Tensor, b: torch.Tensor, parts: tuple[int, ...] | None = None) -> torch.Tensor:
    """Two embeddings of the same images ``[N, E]`` (an image and its mirrored copy) -> ``[N, E]``: the direction
    of their mean at the mean of their lengths, so a unit embedding stays a unit embedding. ``parts``: the widths
    of separately averaged slices (``model.embedding_parts``; an ensemble's members), so that an ensemble averages
    each member's views as that member alone would."""
    if parts is not None and len(parts) > 1:
        return torch.cat([average_views(x, y) for x, y in zip(a.split(list(parts), -1), b.split(list(parts), -1))],
                         dim=-1)
    mean = (a + b) / 2
    length = (a.norm(dim=-1, keepdim=True) + b.norm(dim=-1, keepdim=True)) / 2
    return mean * (length / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def encode_split(model: RetrievalModel, split, max_images: int = 0, batch_size: int = 256,
                 with_locals: bool | None = None, mirror=None) -> SplitEmbeddings:
    """Encode the first ``max_images`` images (0: all) of a FeatureSplit and their 5 captions each.

    ``mirror``: the split's mirrored copy (same images, flipped left-right); each image's embedding is then
    :func:`average_views` of its two (not for cross-attention scoring, which keeps the originals' locals).

    The locals are kept too (``SplitEmbeddings.locals``, encoded once per image and caption, so scoring never
    re-encodes) when ``with_locals`` is true; by default exactly for a cross-attention model
    (``model.similarity=scan``), which :func:`score_embeddings` then scores with SCAN.
    """
    n = len(split.image_ids) if max_images <= 0 else min(max_images, len(split.image_ids))
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    scan = model.model_cfg.similarity == "scan" if with_locals is None else with_locals
    store = RegionStore(split.images[:n], split.region_mask()[:n])
    images, img_locals = _encode_images(model, store, batch_size, scan)
    if mirror is not None:
        flipped = RegionStore(mirror.images[:n], mirror.region_mask()[:n])
        images = average_views(images, _encode_images(model, flipped, batch_size, False)[0], model.embedding_parts)
    captions, cap_locals = _encode_captions(model, list(split.captions[: 5 * n]), batch_size, scan)
    locals_ = None
    if scan:
        locals_ = SplitLocals(*img_locals, *cap_locals, score=model.score_locals, device=model.device)
    seconds = time.perf_counter() - start
    model.train(was_training)
    return SplitEmbeddings(images, captions, seconds, locals_)


def similarity_matrix(emb: SplitEmbeddings) -> torch.Tensor:
    """``[N, 5N]`` scores: one matrix product, or for a cross-attention model every pair by the batched SCAN scorer
    on the model's device."""
    if emb.locals is None:
        return emb.images @ emb.captions.T
    loc = emb.locals
    with torch.inference_mode():
        return loc.score(loc.images, loc.image_mask, loc.captions, loc.caption_mask, device=loc.device).cpu()


def normalised_similarities(emb: SplitEmbeddings, querybank: QueryBank) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`similarity_matrix` normalised by ``querybank``: (``[N, 5N]`` for image->text ranking, ``[N, 5N]`` for
    text->image ranking). A cross-attention run has no embeddings to discount: InputError."""
    if emb.locals is not None:
        raise InputError("query-bank normalisation discounts embeddings; a cross-attention run scores pairs instead")
    return querybank.normalise(similarity_matrix(emb), emb.images, emb.captions)


def score_embeddings(emb: SplitEmbeddings, fold5: bool = False, querybank: QueryBank | None = None) -> dict:
    """:func:`similarity_matrix`, then the protocol's metrics (+ timings); ``querybank``: each direction ranked on
    the query-bank-normalised scores (:func:`normalised_similarities`)."""
    start = time.perf_counter()
    if querybank is None:
        sims = similarity_matrix(emb)
        sim_seconds = time.perf_counter() - start
        metrics = protocol_metrics(sims.numpy(), fold5)
    else:
        i2t, t2i = normalised_similarities(emb, querybank)
        sim_seconds = time.perf_counter() - start
        metrics = protocol_metrics(i2t.numpy(), fold5, t2i_sims=t2i.numpy())
        metrics["querybank"] = querybank.describe()
    metrics["encode_seconds"] = round(emb.seconds, 4)
    metrics["similarity_seconds"] = round(sim_seconds, 4)
    return metrics
