"""The stages the CLI runs, each a plain function: extract features, evaluate a run."""

from __future__ import annotations

from pathlib import Path

from selfalign import atomic
from selfalign.train.trainer import resolve_device


def extract_features(dataset: str, root: str | Path, out: str | Path, split: str, regions: str,
                     image_size: int = 224, detector_path: str = "", detector_top_k: int = 20, batch_size: int = 8,
                     device: str = "auto", karpathy_json: str = "", progress: bool = True,
                     mirror: bool = False) -> dict:
    """Load a captioned split and write its region features to the store ``out`` (cached, resumable).

    ``mirror``: extract the images mirrored left-right instead, as the store's split ``{split}_mirror``.
    """
    from selfalign.data.formats import load_dataset
    from selfalign.data.precomp import mirror_split_name
    from selfalign.vision.extract import extract_split

    opts = {"karpathy_json": karpathy_json} if dataset == "karpathy" else {}
    captioned = load_dataset(dataset, Path(root), split, **opts)
    detector = None
    if regions == "detector":
        from selfalign.vision.detector import Detector

        detector = Detector(detector_path, top_k=detector_top_k)
    return extract_split(captioned, Path(out), mirror_split_name(split) if mirror else split, regions=regions,
                         device=resolve_device(device), image_size=image_size, batch_size=batch_size,
                         detector=detector, progress=progress, mirror=mirror)


def _split_views(cfg, split: str):
    """The run's feature split, and its mirrored copy when the run averages the two (``data.mirror_test``)."""
    from selfalign.data.precomp import load_feature_split, load_mirror_split

    features = load_feature_split(cfg.data.features, split)
    mirror = load_mirror_split(cfg.data.features, split, features) if cfg.data.mirror_test else None
    return features, mirror


def _protocol(fold5: bool, n_images: int) -> str:
    return "coco_1k_5fold" if fold5 else f"{n_images}_images"


def evaluate_run(run_dir: str | Path, split: str = "test", fold5: bool = False, device: str = "auto") -> dict:
    """Encode ``split`` with the run's best model, compute the protocol's metrics, write ``eval.json``."""
    from selfalign.evaluate.runner import encode_split, score_embeddings
    from selfalign.model.checkpoint import load_model

    run_dir = Path(run_dir)
    model, cfg = load_model(run_dir, resolve_device(device))
    features, mirror = _split_views(cfg, split)
    # encode_split keeps the locals of a cross-attention run (model.similarity=scan) and score_embeddings then
    # scores every pair with the batched SCAN scorer instead of a matrix product.
    metrics = score_embeddings(encode_split(model, features, mirror=mirror), fold5=fold5)
    metrics["similarity"] = cfg.model.similarity
    metrics["split"] = split
    metrics["protocol"] = _protocol(fold5, len(features.image_ids))
    atomic.write_json(run_dir / ("eval.json" if split == "test" else f"eval_{split}.json"), metrics)
    return metrics


def evaluate_ensemble(run_dirs: list[str | Path], split: str = "test", fold5: bool = False,
                      device: str = "auto") -> dict:
    """The protocol's metrics for the mean of several runs' ``[N, 5N]`` similarity matrices on one split.

    As VSE∞'s ensemble evaluation: each run scores the split with its own model and feature store, the matrices are
    averaged. The runs must hold the same images and captions in the same order (InputError naming the first run
    that differs). Nothing is written into the runs.
    """
    from selfalign.errors import InputError
    from selfalign.evaluate.metrics import protocol_metrics
    from selfalign.evaluate.runner import encode_split, similarity_matrix
    from selfalign.model.checkpoint import load_model

    if len(run_dirs) < 2:
        raise InputError(f"an ensemble needs at least two runs, got {len(run_dirs)}")
    total, reference, similarities = None, None, []
    for run_dir in run_dirs:
        model, cfg = load_model(Path(run_dir), resolve_device(device))
        features, mirror = _split_views(cfg, split)
        order = (list(features.image_ids), list(features.captions))
        if reference is None:
            reference = (run_dir, order)
        elif order != reference[1]:
            raise InputError(f"{run_dir}: its {split} split ({cfg.data.features}) does not hold the same images and "
                             f"captions in the same order as {reference[0]}'s; an ensemble scores one split")
        sims = similarity_matrix(encode_split(model, features, mirror=mirror))
        total = sims if total is None else total.add_(sims)
        similarities.append(cfg.model.similarity)
        del model
    mean = total.div_(len(run_dirs)).numpy()
    metrics = protocol_metrics(mean, fold5)
    metrics["ensemble"] = [str(r) for r in run_dirs]
    metrics["similarity"] = "+".join(similarities)
    metrics["split"] = split
    metrics["protocol"] = _protocol(fold5, len(reference[1][0]))
    return metrics
