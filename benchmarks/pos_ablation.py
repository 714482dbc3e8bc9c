"""Part-of-speech ablation: LCA restricted to nouns / adjectives / verbs / all words (``align.lca_words``).

    python benchmarks/pos_ablation.py --features features/scenes --seeds 0,1,2 --epochs 12 --out runs/pos_ablation
    selfalign analyze sweep runs/pos_ablation/results.json --out analysis

Tags come from spaCy's small English model (``selfalign.analysis.pos``). Writes ``results.json`` (one entry per
run, resumable like the codebook sweep), ``results.md`` (test rsum, mean ± std over seeds) and the fraction of
training tokens each restriction keeps. The restriction only acts when the trainer passes
``pos_word_weights(...)`` to ``RetrievalModel.align_losses``; the results record whether it does.
"""

from __future__ import annotations

import argparse
import inspect
import shlex
import sys
from pathlib import Path

from selfalign import atomic
from selfalign.analysis.pos import KINDS
from selfalign.analysis.sweep import Job, load_results, markdown_table, run_sweep, sweep_overrides

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "src" / "selfalign" / "configs" / "scenes.yaml"


def trainer_applies_lca_words() -> bool:
    """Whether the trainer reads ``align.lca_words`` (otherwise every variant trains identically)."""
    import selfalign.train.trainer as trainer

    return "lca_words" in inspect.getsource(trainer)


def token_coverage(features: str, max_words: int = 40) -> dict[str, float]:
    """Fraction of the training captions' tokens that each kind selects."""
    from selfalign.analysis.pos import coverage
    from selfalign.data.precomp import load_feature_split
    from selfalign.data.text import tokenize

    captions = load_feature_split(features, "train").captions
    return {k: round(v, 4) for k, v in coverage([tokenize(c)[:max_words] for c in captions]).items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", required=True, help="feature store (scenes by default)")
    p.add_argument("--root", help="dataset folder (recorded in the runs for the analysis commands)")
    p.add_argument("--dataset", default="scenes", help="name shown in the results")
    p.add_argument("--kinds", default="noun,adj,verb,all", help=f"comma-separated, from {','.join(KINDS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the config's)")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--device", default="auto")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides for every run")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in args.kinds if k not in KINDS]
    if bad:
        p.error(f"--kinds: {bad[0]!r} is not one of {', '.join(KINDS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/pos_ablation.py"] + (sys.argv[1:] if argv is None else argv))
    applied = trainer_applies_lca_words()
    if not applied:
        print("WARNING: the trainer does not pass POS word weights to the SelfAlign losses yet, so every variant "
              "trains the same model (see selfalign.analysis.pos)", file=sys.stderr)
    data, base = sweep_overrides(args.features, args.root, args.epochs, args.device, args.set)
    jobs = [Job(args.dataset, kind, seed, data + [f"align.lca_words={kind}"])
            for kind in args.kinds for seed in args.seeds]
    extra = {"trainer_applies_lca_words": applied, "token_coverage": token_coverage(args.features)}
    out = Path(args.out)
    path = run_sweep(jobs, out, "lca_words", command, args.config, base, device=args.device, progress=args.progress,
                     extra=extra)
    table = markdown_table(load_results(path))
    table += "\nFraction of training tokens LCA sees: " + ", ".join(
        f"{k} {v:.1%}" for k, v in extra["token_coverage"].items()) + "\n"
    if not applied:
        table += "\n**The trainer ignored align.lca_words: all variants are the same model.**\n"
    atomic.write_text(out / "results.md", table)
    print(table + f"\nresults: {path}\nplots:   selfalign analyze sweep {path} --out analysis")
    return path


if __name__ == "__main__":
    main()
