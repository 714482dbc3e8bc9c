"""Sweeps: train one run per (dataset, variant, seed), evaluate test rsum, collect; then plot and tabulate.

Used by ``benchmarks/codebook_sweep.py`` (variant = codebook size K) and ``benchmarks/pos_ablation.py`` (variant =
the words LCA uses). Resumable: a run with ``result.json`` is skipped, an interrupted run resumes from its last
checkpoint. ``RESULTS.json``: ``{"variant_name", "command", "commands", "runs": [{"dataset", "variant", "seed",
"rsum", "metrics", "log", "run_dir", ...}]}`` where ``log`` holds the run's ``log.csv`` rows. A later invocation
into the same folder (more seeds, more variants) keeps the runs recorded before and appends its command to
``commands``, so a sweep grows without retraining what it has.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from selfalign import atomic
from selfalign.analysis.common import new_figure, read_json, save_figure
from selfalign.errors import InputError

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


@dataclass
class Job:
    """One training run of a sweep: config overrides on top of the base config."""

    dataset: str
    variant: int | str
    seed: int
    overrides: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.variant}-s{self.seed}"


def run_job(job: Job, config: str | Path | None, base_overrides: list[str], runs_dir: Path, device: str = "auto",
            progress: bool = False) -> dict:
    """Train (or resume, or skip when finished) one job and evaluate it on the test split."""
    from selfalign.analysis.curves import read_log
    from selfalign.config import load_config
    from selfalign.pipeline import evaluate_run
    from selfalign.train import train
    from selfalign.train.state import STATE

    run_dir = runs_dir / job.name
    done = run_dir / "result.json"
    if done.is_file():
        return read_json(done)
    overrides = base_overrides + job.overrides + [f"name={job.name}", f"out_dir={runs_dir}", f"train.seed={job.seed}"]
    cfg = load_config(config, overrides)
    train(cfg, resume=(run_dir / STATE).exists(), run_dir=run_dir, progress=progress)
    metrics = evaluate_run(run_dir, "test", device=device)
    result = {"dataset": job.dataset, "variant": job.variant, "seed": job.seed, "run_dir": str(run_dir),
              "rsum": metrics["rsum"], "metrics": metrics, "overrides": overrides, "log": read_log(run_dir)}
    atomic.write_json(done, result)
    return result


def sweep_overrides(features: str, root: str | None, epochs: int | None, device: str,
                    extra: list[str]) -> tuple[list[str], list[str]]:
    """The sweep scripts' shared overrides: ``(data, base)`` — the dataset's, and every run's (LCA on; the
    config's epochs unless ``epochs``; ``extra`` last so ``--set`` wins)."""
    data = [f"data.features={features}"] + ([f"data.root={root}"] if root else [])
    base = ([] if epochs is None else [f"train.epochs={epochs}"]) + ["align.lca=true", f"train.device={device}"]
    return data, base + list(extra)


def run_sweep(jobs: list[Job], out_dir: Path, variant_name: str, command: str, config: str | Path | None,
              base_overrides: list[str], device: str = "auto", progress: bool = False,
              extra: dict | None = None) -> Path:
    """Run every job in order, rewriting ``out_dir/results.json`` after each; returns its path.

    Runs recorded there by earlier invocations (of the same ``variant_name``) and not among ``jobs`` are kept.
    """
    out_dir = Path(out_dir)
    path = out_dir / "results.json"
    earlier, commands = _earlier_runs(path, variant_name, {job.name for job in jobs})
    commands = [c for c in commands if c != command] + [command]
    results: list[dict] = []
    for number, job in enumerate(jobs, start=1):
        print(f"[{number}/{len(jobs)}] {job.name}", flush=True)
        results.append(run_job(job, config, base_overrides, out_dir / "runs", device, progress))
        print(f"    test rsum {results[-1]['rsum']:.1f}", flush=True)
        atomic.write_json(path, {"variant_name": variant_name, "command": command, "commands": commands,
                                 **(extra or {}), "runs": earlier + results})
    return path


def _earlier_runs(path: Path, variant_name: str, names: set[str]) -> tuple[list[dict], list[str]]:
    """Runs (not named in ``names``) and commands that an earlier invocation recorded in ``path``."""
    if not path.is_file():
        return [], []
    data = load_results(path)
    if data.get("variant_name") != variant_name:
        raise InputError(f"{path}: a sweep of {data.get('variant_name')!r}, not {variant_name!r}; use another --out")
    runs = [r for r in data["runs"] if Path(r.get("run_dir", "")).name not in names]
    return runs, list(data.get("commands") or [data.get("command", "?")])


def load_results(path: str | Path) -> dict:
    """Read and check a sweep's ``results.json``."""
    data = read_json(path)
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        raise InputError(f"{path}: no 'runs' list (is this a sweep's results.json?)")
    for i, run in enumerate(runs):
        missing = [k for k in ("dataset", "variant", "seed", "rsum") if k not in run]
        if missing:
            raise InputError(f"{path}: runs[{i}] lacks {', '.join(missing)}")
    return data


def _sort_key(value, order: dict | None = None) -> tuple:
    """Numbers ascending, then names in the order the sweep ran them."""
    if isinstance(value, (int, float)):
        return (0, float(value))
    return (1, (order or {}).get(value, 0))


def summarise(data: dict) -> list[dict]:
    """Per (dataset, variant): rsum mean and std over seeds (sample std; 0 for one seed), R@1s, seeds."""
    groups: dict[tuple, list[dict]] = {}
    for run in data["runs"]:
        groups.setdefault((run["dataset"], run["variant"]), []).append(run)
    rows = []
    order = {v: i for i, v in enumerate(dict.fromkeys(r["variant"] for r in data["runs"]))}
    for (dataset, variant), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], _sort_key(kv[0][1], order))):
        rsum = [float(r["rsum"]) for r in runs]
        row = {"dataset": dataset, "variant": variant, "seeds": sorted(r["seed"] for r in runs),
               "rsum_mean": statistics.fmean(rsum), "rsum_std": statistics.stdev(rsum) if len(rsum) > 1 else 0.0}
        for key in ("i2t_r1", "t2i_r1"):
            vals = [r["metrics"][key] for r in runs if key in r.get("metrics", {})]
            row[f"{key}_mean"] = statistics.fmean(vals) if vals else None
        rows.append(row)
    return rows


def markdown_table(data: dict) -> str:
    """The rsum table (mean ± std over seeds) as Markdown."""
    name = data.get("variant_name", "variant")
    lines = [f"| dataset | {name} | test rsum (mean ± std) | i2t R@1 | t2i R@1 | seeds |", "|---|---|---|---|---|---|"]
    for r in summarise(data):
        r1 = [f"{r[k]:.1f}" if r[k] is not None else "n/a" for k in ("i2t_r1_mean", "t2i_r1_mean")]
        lines.append(f"| {r['dataset']} | {r['variant']} | {r['rsum_mean']:.1f} ± {r['rsum_std']:.1f} | {r1[0]} | "
                     f"{r1[1]} | {','.join(map(str, r['seeds']))} |")
    return "\n".join(lines) + "\n"


def rsum_figure(data: dict, out_path: Path) -> Path:
    """Test rsum against the variant, mean ± std over seeds; a log2 line plot when variants are numbers."""
    rows = summarise(data)
    name = data.get("variant_name", "variant")
    numeric = all(isinstance(r["variant"], (int, float)) for r in rows)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, ax = new_figure(figsize=(6.5, 4.2))
    labels = list(dict.fromkeys(r["variant"] for r in rows))
    counts = sorted({len(r["seeds"]) for r in rows})  # seeds per point
    for d, dataset in enumerate(datasets):
        mine = [r for r in rows if r["dataset"] == dataset]
        means, stds = [r["rsum_mean"] for r in mine], [r["rsum_std"] for r in mine]
        if numeric:
            xs = [r["variant"] for r in mine]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=4, label=dataset, color=_COLOURS[d % len(_COLOURS)])
            if len(counts) > 1:  # say which points rest on fewer seeds
                for x, m, r in zip(xs, means, mine):
                    ax.annotate(f"n={len(r['seeds'])}", (x, m), textcoords="offset points", xytext=(6, -12), fontsize=7)
        else:
            width = 0.8 / len(datasets)
            xs = [labels.index(r["variant"]) + (d - (len(datasets) - 1) / 2) * width for r in mine]
            bars = ax.bar(xs, means, width, yerr=stds, capsize=4, label=dataset, color=_COLOURS[d % len(_COLOURS)])
            ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], fontsize=8, label_type="center", color="white")
    if numeric:
        ax.set_xscale("log", base=2)
        ax.set_xticks(labels, [str(v) for v in labels])
    else:
        ax.set_xticks(range(len(labels)), [str(v) for v in labels])
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    ax.set_xlabel(name)
    ax.set_ylabel("test rsum (sum of 6 recalls, %)")
    ax.set_title(f"Test rsum vs {name} (mean ± std over {seeds} seed{'s' if counts[-1] > 1 else ''})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out_path)


def loss_figure(data: dict, out_path: Path) -> Path:
    """Per dataset (rows) and loss part (columns): the mean-over-seeds curve of each variant against epochs."""
    from selfalign.analysis.curves import LOSS_NAMES, integer_epochs

    runs = [r for r in data["runs"] if r.get("log")]
    if not runs:
        raise InputError("the results hold no training logs ('log' of each run) to draw loss curves from")
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    found = {k for r in runs for row in r["log"] for k in row if k.startswith("loss_")}
    parts = [k for k in LOSS_NAMES if k in found] + sorted(found - set(LOSS_NAMES))
    epochs = sorted({float(e["epoch"]) for r in runs for e in r["log"]})
    parts.append("dev_rsum")
    order = {v: i for i, v in enumerate(dict.fromkeys(r["variant"] for r in runs))}
    variants = sorted(order, key=lambda v: _sort_key(v, order))
    fig, axes = new_figure(len(datasets), len(parts), figsize=(3.6 * len(parts), 3.2 * len(datasets)), squeeze=False)
    for row, dataset in enumerate(datasets):
        for col, part in enumerate(parts):
            ax = axes[row][col]
            for v, variant in enumerate(variants):
                curves: dict[float, list[float]] = {}
                for r in runs:
                    if r["dataset"] == dataset and r["variant"] == variant:
                        for e in r["log"]:
                            if e.get(part) is not None:
                                curves.setdefault(float(e["epoch"]), []).append(float(e[part]))
                if curves:
                    xs = sorted(curves)
                    ax.plot(xs, [np.mean(curves[x]) for x in xs], marker="o", ms=3, label=str(variant),
                            color=_COLOURS[v % len(_COLOURS)])
            ax.set_xlabel("epoch")
            integer_epochs(ax, epochs)
            ax.set_ylabel("dev rsum (%)" if part == "dev_rsum" else "loss (mean per step)")
            ax.set_title(f"{dataset}: {LOSS_NAMES.get(part, part)}", fontsize=10)
            ax.grid(alpha=0.3)
    axes[0][0].legend(title=data.get("variant_name", "variant"), fontsize=8)
    fig.suptitle("Training curves per variant (mean over seeds)", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, out_path)
