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
                         f"{cfg.model.image_dim}: it was trained on data.regions={cfg.data.regions} features "
                         f"(extract new photos with `selfalign extract ... --regions {cfg.data.regions}`)")
    return features, mirror


def _protocol(fold5: bool, n_images: int) -> str:
    return "coco_1k_5fold" if fold5 else f"{n_images}_images"


def evaluate_run(run_dir: str | Path, split: str = "test", fold5: bool = False, device: str = "auto",
                 features: str | Path | None = None, one_view: bool = False, querybank: bool = False) -> dict:
    """Encode ``split`` with the run's best model, compute the protocol's metrics, write ``eval.json``.

    ``features``: score the split of another feature store (e.g. photos the run never saw, extracted with the
    same settings); ``one_view``: embed each image from its photo alone although the run averages it with its
    mirrored copy (``data.mirror_test``; for a store without mirrored copies). With either, nothing is written
    into the run. ``querybank``: rank on scores normalised by the run's query bank (:func:`build_querybank`);
    written as ``eval_querybank.json``.
    """
    from selfalign.evaluate.runner import encode_split, score_embeddings
    from selfalign.model.checkpoint import load_model

    run_dir = Path(run_dir)
    bank = _checked_querybank(run_dir, split, features) if querybank else None
    model, cfg = load_model(run_dir, resolve_device(device))
    split_features, mirror = _split_views(cfg, split, features, one_view)
    # encode_split keeps the locals of a cross-attention run (model.similarity=scan) and score_embeddings then
    # scores every pair with the batched SCAN scorer instead of a matrix product.
    metrics = score_embeddings(encode_split(model, split_features, mirror=mirror), fold5=fold5, querybank=bank)
    metrics["similarity"] = cfg.model.similarity
    metrics["split"] = split
    metrics["features"] = str(features or cfg.data.features)
    metrics["protocol"] = _protocol(fold5, len(split_features.image_ids))
    metrics["views"] = 1 if mirror is None else 2
    if features is None and not one_view:
        name = "eval" if split == "test" else f"eval_{split}"
        atomic.write_json(run_dir / f"{name}{'_querybank' if bank is not None else ''}.json", metrics)
    return metrics


def build_querybank(run_dir: str | Path, split: str = "train", dev_split: str = "dev", max_captions: int = 10_000,
                    max_images: int = 5_000, seed: int = 0, betas: tuple[float, ...] | None = None,
                    device: str = "auto", features: str | Path | None = None) -> dict:
    """Embed a bank of ``split``'s captions and images (at most ``max_captions`` / ``max_images``, drawn with
    ``seed``) with the run's model, choose each direction's β on ``dev_split``, write
    ``RUN_DIR/querybank.safetensors``.

    Images are embedded as the run embeds a gallery's (both views when ``data.mirror_test``). When normalisation
    improves neither direction on dev, no bank is written and an earlier one is removed (``removed``), so that
    ``selfalign index`` and ``evaluate --querybank`` follow the latest measurement. Returns the bank's description:
    the βs (None: off), sizes, ``saved``, ``removed`` and the dev table (:func:`choose_betas`).
    """
    from selfalign.data.batches import RegionStore
    from selfalign.evaluate.querybank import DEFAULT_BETAS, QueryBank, choose_betas, sample_rows
    from selfalign.evaluate.runner import average_views, encode_captions, encode_images, encode_split
    from selfalign.model.checkpoint import load_model, model_hash

    from selfalign.model.ensemble import is_ensemble

    run_dir = Path(run_dir)
    if split == dev_split:
        raise InputError(f"the query bank's split and the split that chooses beta are both '{split}'; use two")
    if is_ensemble(run_dir):
        raise InputError(f"{run_dir} is an ensemble: it uses its members' banks; build one for each member with "
                         f"`selfalign querybank MEMBER`")
    model, cfg = load_model(run_dir, resolve_device(device))
    if cfg.model.similarity != "dot":
        raise InputError(f"{run_dir / 'config.json'}: model.similarity={cfg.model.similarity} scores pairs by "
                         f"cross-attention; a query bank discounts embeddings")
    bank_split, bank_mirror = _split_views(cfg, split, features)
    image_rows = sample_rows(len(bank_split.image_ids), max_images, seed)
    caption_rows = sample_rows(len(bank_split.captions), max_captions, seed + 1)
    images = encode_images(model, RegionStore(bank_split.images, bank_split.region_mask()), rows=image_rows)
    if bank_mirror is not None:
        flipped = encode_images(model, RegionStore(bank_mirror.images, bank_mirror.region_mask()), rows=image_rows)
        images = average_views(images, flipped)
    captions = encode_captions(model, [bank_split.captions[int(i)] for i in caption_rows])
    dev_features, dev_mirror = _split_views(cfg, dev_split, features)
    dev = encode_split(model, dev_features, mirror=dev_mirror)
    beta_images, beta_captions, table = choose_betas(dev.images, dev.captions, captions, images,
                                                     tuple(betas or DEFAULT_BETAS))
    info = {"model_hash": model_hash(run_dir), "split": split, "dev_split": dev_split,
            "features": str(features or cfg.data.features), "captions": int(len(caption_rows)),
            "images": int(len(image_rows)), "seed": seed, "dev": table}
    saved = beta_images is not None or beta_captions is not None
    path = QueryBank(captions, images, beta_images, beta_captions, info).save(run_dir) if saved else None
    removed = not saved and QueryBank.remove(run_dir)
    return {"beta_images": beta_images, "beta_captions": beta_captions, "saved": saved, "removed": removed,
            "path": str(path) if path else None, **info, "captions_total": len(bank_split.captions),
            "images_total": len(bank_split.image_ids)}


def _checked_querybank(run_dir: Path, split: str, features: str | Path | None):
    """The run's query bank, refused when it was drawn from the very split to be scored."""
    from selfalign.evaluate.querybank import QueryBank
    from selfalign.model.checkpoint import model_hash

    bank = QueryBank.load(run_dir, model_hash(run_dir))
    if split in bank.splits and features is None:
        raise InputError(f"{run_dir}: its query bank was drawn from the '{split}' split itself; score another split "
                         f"or build the bank from the training split")
    return bank


def evaluate_ensemble(run_dirs: list[str | Path], split: str = "test", fold5: bool = False,
                      device: str = "auto", features: str | Path | None = None, one_view: bool = False,
                      querybank: bool = False) -> dict:
    """The protocol's metrics for the mean of several runs' ``[N, 5N]`` similarity matrices on one split.

    As VSE∞'s ensemble evaluation: each run scores the split with its own model and feature store, the matrices are
    averaged. The runs must hold the same images and captions in the same order (InputError naming the first run
    that differs). ``features``: every run scores the split of this store instead; ``one_view``: as in
    ``evaluate_run``; ``querybank``: each run's scores normalised by its own bank before averaging (one mean per
    direction). Nothing is written into the runs.
    """
    from selfalign.evaluate.metrics import protocol_metrics
    from selfalign.evaluate.runner import encode_split, normalised_similarities, similarity_matrix
    from selfalign.model.checkpoint import load_model

    if len(run_dirs) < 2:
        raise InputError(f"an ensemble needs at least two runs, got {len(run_dirs)}")
    total, t2i_total, reference, similarities, banks = None, None, None, [], []
    for run_dir in run_dirs:
        bank = _checked_querybank(Path(run_dir), split, features) if querybank else None
        model, cfg = load_model(Path(run_dir), resolve_device(device))
        split_features, mirror = _split_views(cfg, split, features, one_view)
        order = (list(split_features.image_ids), list(split_features.captions))
        if reference is None:
            reference = (run_dir, order)
        elif order != reference[1]:
            raise InputError(f"{run_dir}: its {split} split ({cfg.data.features}) does not hold the same images and "
                             f"captions in the same order as {reference[0]}'s; an ensemble scores one split")
        emb = encode_split(model, split_features, mirror=mirror)
        if bank is None:
            sims = similarity_matrix(emb)
        else:
            sims, t2i = normalised_similarities(emb, bank)
            t2i_total = t2i if t2i_total is None else t2i_total.add_(t2i)
            banks.append(bank.describe())
        total = sims if total is None else total.add_(sims)
        similarities.append(cfg.model.similarity)
        del model
    mean = total.div_(len(run_dirs)).numpy()
    t2i_mean = None if t2i_total is None else t2i_total.div_(len(run_dirs)).numpy()
    metrics = protocol_metrics(mean, fold5, t2i_sims=t2i_mean)
    if querybank:
        metrics["querybank"] = {"runs": banks}
    metrics["ensemble"] = [str(r) for r in run_dirs]
    metrics["similarity"] = "+".join(similarities)
    metrics["split"] = split
    metrics["protocol"] = _protocol(fold5, len(reference[1][0]))
    return metrics
