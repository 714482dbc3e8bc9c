"""Encode a feature-store split with a model and score it with the field's protocol."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from selfalign.data.batches import RegionStore
from selfalign.evaluate.metrics import fold5_metrics, retrieval_metrics
from selfalign.model.model import RetrievalModel


@dataclass
class SplitEmbeddings:
    """``images [N, E]`` and ``captions [5N, E]`` embeddings of one split (float32, CPU)."""

    images: torch.Tensor
    captions: torch.Tensor
    seconds: float


@torch.inference_mode()
def encode_images(model: RetrievalModel, store: RegionStore, batch_size: int = 256) -> torch.Tensor:
    """All images of ``store`` -> ``[N, E]``."""
    out = []
    for start in range(0, len(store), batch_size):
        regions, mask = store.get(np.arange(start, min(start + batch_size, len(store))), model.device)
        out.append(model.encode_image(regions, mask).embedding.float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def encode_captions(model: RetrievalModel, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """Caption strings -> ``[M, E]``."""
    out = []
    for start in range(0, len(captions), batch_size):
        tokens = model.tokenize(captions[start:start + batch_size]).to(model.device)
        out.append(model.encode_text(tokens).embedding.float().cpu())
    return torch.cat(out)


def encode_split(model: RetrievalModel, split, max_images: int = 0, batch_size: int = 256) -> SplitEmbeddings:
    """Encode the first ``max_images`` images (0: all) of a FeatureSplit and their 5 captions each."""
    n = len(split.image_ids) if max_images <= 0 else min(max_images, len(split.image_ids))
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    store = RegionStore(split.images[:n], split.region_mask()[:n])
    images = encode_images(model, store, batch_size)
    captions = encode_captions(model, list(split.captions[: 5 * n]), batch_size)
    seconds = time.perf_counter() - start
    model.train(was_training)
    return SplitEmbeddings(images, captions, seconds)


def score_embeddings(emb: SplitEmbeddings, fold5: bool = False) -> dict:
    """Similarity ``[N, 5N]`` by one matrix product, then the protocol's metrics (+ timings)."""
    start = time.perf_counter()
    sims = emb.images @ emb.captions.T
    sim_seconds = time.perf_counter() - start
    metrics = fold5_metrics(sims.numpy()) if fold5 else retrieval_metrics(sims.numpy())
    metrics["encode_seconds"] = round(emb.seconds, 4)
    metrics["similarity_seconds"] = round(sim_seconds, 4)
    return metrics
