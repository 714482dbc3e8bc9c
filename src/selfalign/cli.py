"""The ``selfalign`` command line: a thin shell over the library's modules."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from selfalign.errors import SelfAlignError


def _cmd_scenes(args) -> None:
    from selfalign.data.scenes import generate_scenes

    generate_scenes(Path(args.out), args.train, args.dev, args.test, seed=args.seed, image_size=args.size)
    print(f"scenes dataset ready in {args.out}")


def _cmd_extract(args) -> None:
    from selfalign.pipeline import extract_features

    # only the generated scenes carry ground-truth boxes; real photos default to the grid
    regions = args.regions or ("boxes" if args.dataset == "scenes" else "grid")
    for split in args.splits.split(","):
        for mirror in (False, True)[: 2 if args.mirror else 1]:
            extract_features(args.dataset, args.root, args.out, split, regions, image_size=args.size,
                             detector_path=args.detector, batch_size=args.batch_size, device=args.device,
                             karpathy_json=args.karpathy_json, mirror=mirror)


def _cmd_train(args) -> None:
    from selfalign.config import load_config, resume_config
    from selfalign.model.checkpoint import read_run_config
    from selfalign.train import train

    if args.resume:
        run_dir = Path(args.resume)
        # With --resume there is no CONFIG.yaml: every positional argument is an override.
        overrides = ([args.config] if args.config is not None else []) + args.overrides
        cfg = resume_config(read_run_config(run_dir), overrides)
        train(cfg, resume=True, run_dir=run_dir, progress=not args.quiet)
    else:
        if args.config is None:
            raise SelfAlignError("train needs a CONFIG.yaml (or --resume RUN_DIR)")
        cfg = load_config(args.config, args.overrides)
        run_dir = train(cfg, progress=not args.quiet)
    from selfalign.distributed import world_info_from_env

    if world_info_from_env().rank == 0:  # under torchrun every process runs this
        print(f"run directory: {run_dir}")


def _cmd_evaluate(args) -> None:
    from selfalign import atomic
    from selfalign.evaluate.metrics import evaluate_sims_file, format_table

    if args.sims and args.run_dirs:
        raise SelfAlignError("evaluate takes RUN_DIR(s) or --sims SIMS.npy, not both")
    if args.sims and args.features:
        raise SelfAlignError("--features names the store a run scores; a --sims matrix is already scored")
    if args.querybank and args.sims:
        raise SelfAlignError("--querybank normalises a run's scores; a --sims matrix is already scored")
    if args.sims:
        metrics = evaluate_sims_file(args.sims, fold5=args.fold5)
    elif len(args.run_dirs) > 1:
        from selfalign.pipeline import evaluate_ensemble

        metrics = evaluate_ensemble(args.run_dirs, args.split, fold5=args.fold5, device=args.device,
                                    features=args.features, one_view=args.one_view, querybank=args.querybank)
    else:
        if not args.run_dirs:
            raise SelfAlignError("evaluate needs RUN_DIR or --sims SIMS.npy")
        from selfalign.pipeline import evaluate_run

        metrics = evaluate_run(args.run_dirs[0], args.split, fold5=args.fold5, device=args.device,
                               features=args.features, one_view=args.one_view, querybank=args.querybank)
    print(format_table(metrics))
    bank = metrics.get("querybank")
    if bank and "runs" in bank:
        print("(query-bank normalised, each run by its own bank: " + "; ".join(_betas_text(b) for b in bank["runs"])
              + ")")
    elif bank:
        print(f"(query-bank normalised: {_betas_text(bank)}; {bank['captions']} captions / {bank['images']} images "
              f"of '{bank['split']}')")
    if args.json:
        atomic.write_json(args.json, metrics)


def _betas_text(bank: dict) -> str:
    def one(beta: float | None) -> str:
        return "off" if beta is None else f"{beta:g}"

    return f"beta {one(bank['beta_images'])} for images, {one(bank['beta_captions'])} for captions"


def _cmd_querybank(args) -> None:
    from selfalign.pipeline import build_querybank

    betas = tuple(_parse_floats(args.betas, "--betas")) if args.betas else None
    report = build_querybank(args.run_dir, args.split, args.dev_split, args.captions, args.images, args.seed,
                             betas, args.device, args.features)
    dev = report["dev"]
    for direction, label in (("t2i", "text->image"), ("i2t", "image->text")):
        print(f"dev {label} R@1+R@5+R@10 by beta: " + ", ".join(f"{b}: {r:.2f}" for b, r in dev[direction].items()))
    print(f"{_betas_text(report)}: dev rsum {dev['rsum_plain']:.2f} -> {dev['rsum_chosen']:.2f}")
    if report["saved"]:
        print(f"bank of {report['captions']} captions and {report['images']} images of '{report['split']}' -> "
              f"{report['path']}")
    else:
        print("normalisation improves neither direction on dev: no bank written"
              + (" (the earlier bank was removed)" if report["removed"] else ""))


def _parse_floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SelfAlignError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise SelfAlignError(f"{flag}: expected positive numbers, got {text!r}")
    return values


def _cmd_ensemble(args) -> None:
    from selfalign.model.checkpoint import load_model, make_ensemble

    path = make_ensemble(args.run_dirs, args.out, overwrite=args.overwrite)
    model, _ = load_model(path.parent, "cpu")
    print(f"ensemble of {len(args.run_dirs)} runs -> {path} ({model.embedding_dim}-d embeddings: "
          f"{' + '.join(str(w) for w in model.embedding_parts)}); use the folder as a RUN_DIR with evaluate, "
          f"index and serve")


def _cmd_demo(args) -> None:
    from selfalign.demo import run_demo

    run_demo(Path(args.workdir), quick=args.quick, device=args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfalign", description="Fast and accurate image-text retrieval.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the whole pipeline on the built-in scenes dataset")
    p.add_argument("--workdir", default=".", help="where data/, features/ and runs/ go")
    p.add_argument("--quick", action="store_true", help="a tiny dataset and 2 epochs (a smoke test)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("scenes", help="render the built-in scenes dataset")
    p.add_argument("--out", default="data/scenes")
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--dev", type=int, default=500)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224)
    p.set_defaults(func=_cmd_scenes)

    p = sub.add_parser("extract", help="region features for a dataset split -> feature store")
    p.add_argument("--dataset", default="scenes", choices=["scenes", "flickr", "karpathy", "folder"])
    p.add_argument("--root", required=True, help="dataset folder")
    p.add_argument("--out", required=True, help="feature store folder")
    p.add_argument("--splits", default="train,dev,test")
    p.add_argument("--regions", default=None, choices=["grid", "boxes", "detector", "tail"],
                   help="default: boxes for scenes (their ground-truth boxes), grid for every other dataset; tail: "
                        "the map entering the backbone's top, for model.image_backbone_tail")
    p.add_argument("--detector", default="", help="YOLOX-Nano ONNX file (regions=detector)")
    p.add_argument("--karpathy-json", default="")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--mirror", action="store_true",
                   help="also extract each split's images mirrored left-right, as SPLIT_mirror (data.mirror_train/test)")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", nargs="?", help="CONFIG.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run (overrides: only "
                   "train.threads and train.checkpoint_every_steps)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="the standard retrieval metrics of a run, of an ensemble of runs (the mean "
                                        "of their similarity matrices), or of a saved similarity matrix")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="one run, or several for an ensemble")
    p.add_argument("--split", default="test")
    p.add_argument("--features", help="score this feature store's split instead of the run's own (e.g. new photos, "
                                      "`selfalign extract` with the run's settings); nothing is written into the run")
    p.add_argument("--one-view", action="store_true",
                   help="embed each image from its photo alone, although the run averages it with its mirrored copy "
                        "(data.mirror_test): for a store extracted without --mirror")
    p.add_argument("--sims", help="a saved [N, 5N] similarity matrix (.npy)")
    p.add_argument("--fold5", action="store_true", help="COCO 1K: mean over 5 folds")
    p.add_argument("--json", help="also write the metrics here")
    p.add_argument("--querybank", action="store_true",
                   help="rank on scores normalised by the run's query bank (`selfalign querybank RUN`)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("querybank", help="a bank of training queries that discounts hub images and captions "
                                         "(inverted softmax), its beta chosen on dev; used by evaluate --querybank "
                                         "and by index")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--split", default="train", help="the split whose captions and images form the bank")
    p.add_argument("--dev-split", default="dev", help="the split whose rsum chooses beta")
    p.add_argument("--captions", type=int, default=10_000, help="at most this many captions (0: all)")
    p.add_argument("--images", type=int, default=5_000, help="at most this many images (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--betas", help="comma-separated betas to try (default 1,2,3,5,7,10,14,20,30,50)")
    p.add_argument("--features", help="the feature store holding both splits (default: the run's)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_querybank)

    p = sub.add_parser("ensemble", help="several runs as one model (concatenated embeddings: the mean of their "
                                        "similarities in one inner product), usable as a RUN_DIR by evaluate, "
                                        "index and serve")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="two or more runs that read the same inputs")
    p.add_argument("--out", required=True, help="the ensemble's folder (holds ensemble.json)")
    p.add_argument("--overwrite", action="store_true", help="replace the ensemble already in --out")
    p.set_defaults(func=_cmd_ensemble)

    for register in _extensions():
        register(sub)
    return parser


def _extensions():
    """Sub-commands of the optional layers (index, serve, analysis), each registered by its own module."""
    import importlib

    found = []
    for name in ("selfalign.index.cli", "selfalign.serve.cli", "selfalign.analysis.cli"):
        try:
            found.append(importlib.import_module(name).register)
        except ModuleNotFoundError as exc:
            if exc.name is None or not name.startswith(exc.name):
                raise
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SelfAlignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
