"""The stages the CLI runs, each a plain function: extract features, evaluate a run."""

from __future__ import annotations

from pathlib import Path

from selfalign import atomic
from selfalign.train.trainer import resolve_device


def extract_features(dataset: str, root: str | Path, out: str | Path, split: str, regions: str,
                     image_size: int = 224, detector_path: str = "", detector_top_k: int = 20, batch_size: int = 8,
                     device: str = "auto", karpathy_json: str = "", progress: bool = True) -> dict:
    """Load a captioned split and write its region features to the store ``out`` (cached, resumable)."""
    from selfalign.data.formats import load_dataset
    from selfalign.vision.extract import extract_split

    opts = {"karpathy_json": karpathy_json} if dataset == "karpathy" else {}
    captioned = load_dataset(dataset, Path(root), split, **opts)
    detector = None
    if regions == "detector":
        from selfalign.vision.detector import Detector

        detector = Detector(detector_path, top_k=detector_top_k)
    return extract_split(captioned, Path(out), split, regions=regions, device=resolve_device(device),
                         image_size=image_size, batch_size=batch_size, detector=detector, progress=progress)


def evaluate_run(run_dir: str | Path, split: str = "test", fold5: bool = False, device: str = "auto") -> dict:
    """Encode ``split`` with the run's best model, compute the protocol's metrics, write ``eval.json``."""
    from selfalign.data.precomp import load_feature_split
    from selfalign.evaluate.runner import encode_split, score_embeddings
    from selfalign.model.checkpoint import load_model

    run_dir = Path(run_dir)
    model, cfg = load_model(run_dir, resolve_device(device))
    features = load_feature_split(cfg.data.features, split)
    # encode_split keeps the locals of a cross-attention run (model.similarity=scan) and score_embeddings then
    # scores every pair with the batched SCAN scorer instead of a matrix product.
    metrics = score_embeddings(encode_split(model, features), fold5=fold5)
    metrics["similarity"] = cfg.model.similarity
    metrics["split"] = split
    metrics["protocol"] = "coco_1k_5fold" if fold5 else f"{len(features.image_ids)}_images"
    atomic.write_json(run_dir / ("eval.json" if split == "test" else f"eval_{split}.json"), metrics)
    return metrics
