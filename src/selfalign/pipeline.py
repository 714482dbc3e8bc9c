"""The stages the CLI runs, each a plain function: extract features, evaluate a run."""

from __future__ import annotations

from pathlib import Path

from selfalign import atomic
from selfalign.errors import InputError
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


def _split_views(cfg, split: str, store: str | Path | None = None, one_view: bool = False):
    """The split of the run's feature store (or of ``store``), and its mirrored copy when the run averages the two
    (``data.mirror_test``) and ``one_view`` does not ask for the photos alone."""
    from selfalign.data.precomp import load_split_views

    store = store or cfg.data.features
    features, mirror = load_split_views(store, split, cfg.data.mirror_test and not one_view)
    if features.feature_dim != cfg.model.image_dim:
        raise InputError(f"{store}: region features are {features.feature_dim}-d but the run's model.image_dim is "
                         f"{cfg.model.image_dim}")
    return features, mirror


def _protocol(fold5: bool, n_images: int) -> str:
    return "coco_1k_5fold" if fold5 else f"{n_images}_images"


def evaluate_run(run_dir: str | Path, split: str = "test", fold5: bool = False, device: str = "auto",
                 features: str | Path | None = None, one_view: bool = False) -> dict:
    """Encode ``split`` with the run's best model, compute the protocol's metrics, write ``eval.json``.

    ``features``: score the split of another feature store (e.g. photos the run never saw, extracted with the
    same settings); ``one_view``: embed each image from its photo alone although the run averages it with its
    mirrored copy (``data.mirror_test``; for a store without mirrored copies). With either, nothing is written
    into the run.
    """
    from selfalign.evaluate.runner import encode_split, score_embeddings
    from selfalign.model.checkpoint import load_model

    run_dir = Path(run_dir)
    model, cfg = load_model(run_dir, resolve_device(device))
    split_features, mirror = _split_views(cfg, split, features, one_view)
    # encode_split keeps the locals of a cross-attention run (model.similarity=scan) and score_embeddings then
    # scores every pair with the batched SCAN scorer instead of a matrix product.
    metrics = score_embeddings(encode_split(model, split_features, mirror=mirror), fold5=fold5)
    metrics["similarity"] = cfg.model.similarity
    metrics["split"] = split
    metrics["features"] = str(features or cfg.data.features)
    metrics["protocol"] = _protocol(fold5, len(split_features.image_ids))
    metrics["views"] = 1 if mirror is None else 2
    if features is None and not one_view:
        atomic.write_json(run_dir / ("eval.json" if split == "test" else f"eval_{split}.json"), metrics)
    return metrics


def evaluate_ensemble(run_dirs: list[str | Path], split: str = "test", fold5: bool = False,
                      device: str = "auto", features: str | Path | None = None, one_view: bool = False) -> dict:
    """The protocol's metrics for the mean of several runs' ``[N, 5N]`` similarity matrices on one split.

    As VSE∞'s ensemble evaluation: each run scores the split with its own model and feature store, the matrices are
    averaged. The runs must hold the same images and captions in the same order (InputError naming the first run
    that differs). ``features``: every run scores the split of this store instead; ``one_view``: as in
    ``evaluate_run``. Nothing is written into the runs.
    """
    from selfalign.evaluate.metrics import protocol_metrics
    from selfalign.evaluate.runner import encode_split, similarity_matrix
    from selfalign.model.checkpoint import load_model

    if len(run_dirs) < 2:
        raise InputError(f"an ensemble needs at least two runs, got {len(run_dirs)}")
    total, reference, similarities = None, None, []
    for run_dir in run_dirs:
        model, cfg = load_model(Path(run_dir), resolve_device(device))
        split_features, mirror = _split_views(cfg, split, features, one_view)
        order = (list(split_features.image_ids), list(split_features.captions))
        if reference is None:
            reference = (run_dir, order)
        elif order != reference[1]:
            raise InputError(f"{run_dir}: its {split} split ({cfg.data.features}) does not hold the same images and "
                             f"captions in the same order as {reference[0]}'s; an ensemble scores one split")
        sims = similarity_matrix(encode_split(model, split_features, mirror=mirror))
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
