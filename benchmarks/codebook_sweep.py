"""Codebook-size sweep: SelfAlign with K concepts, K in {64, 256, 1024, 4096}, several seeds.

    python benchmarks/codebook_sweep.py --features features/scenes --seeds 0,1,2 --epochs 12 --out runs/codebook_sweep
    python benchmarks/codebook_sweep.py --dataset flickr8k --features features/flickr8k/tail \
        --config src/selfalign/configs/flickr8k.yaml --seeds 0 --out runs/codebook_sweep_flickr8k
    (a frozen-grid store: add --set data.regions=grid model.image_dim=1280 model.image_backbone_tail=false)
    selfalign analyze sweep runs/codebook_sweep/results.json --out analysis

Every (K, seed) trains ``selfalign.train.train`` with ``align.codebook_size=K`` and ``train.seed=s`` on top of the
config (default: the package's scenes.yaml; its epochs unless ``--epochs``), then is evaluated on the test split.
Each run's ``log.csv`` is kept in the results for loss curves. Finished runs are skipped and interrupted ones resume,
so rerunning the same command continues a sweep.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from selfalign import atomic
from selfalign.analysis.sweep import Job, load_results, markdown_table, run_sweep, sweep_overrides

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "src" / "selfalign" / "configs" / "scenes.yaml"


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", required=True, help="feature store of the dataset")
    p.add_argument("--root", help="dataset folder (recorded in the runs for the analysis commands)")
    p.add_argument("--dataset", default="scenes", help="name shown in the results (run folders start with it)")
    p.add_argument("--ks", type=_ints, default=[64, 256, 1024, 4096], help="codebook sizes (comma-separated)")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the config's)")
    p.add_argument("--out", required=True, help="sweep folder: runs/ and results.json")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="base run config (YAML)")
    p.add_argument("--device", default="auto")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides for every run")
    p.add_argument("--progress", action="store_true", help="show per-epoch progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/codebook_sweep.py"] + (sys.argv[1:] if argv is None else argv))
    data, base = sweep_overrides(args.features, args.root, args.epochs, args.device, args.set)
    out = Path(args.out)
    jobs = [Job(args.dataset, k, seed, data + [f"align.codebook_size={k}"]) for k in args.ks for seed in args.seeds]
    path = run_sweep(jobs, out, "codebook_size", command, args.config, base, device=args.device,
                     progress=args.progress)
    table = markdown_table(load_results(path))
    atomic.write_text(out / "results.md", table)
    print(table + f"\nresults: {path}\nplots:   selfalign analyze sweep {path} --out analysis")
    return path


if __name__ == "__main__":
    main()
