"""The Flickr8k benchmark's report: finished runs collected from an output folder, their means over seeds and the
gains between paired configurations, and the markdown table with the published Flickr8k results beside them."""

from __future__ import annotations

import json
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path

# Published Flickr8k 1K-test results (i2t R@1/5/10, t2i R@1/5/10, rsum), as listed in the project's reference notes.
PUBLISHED = {
    "DeViSE (Frome et al. 2013)": (4.5, 18.1, 29.2, 6.7, 21.9, 32.7, 113.1),
    "VSE, OxfordNet (Kiros et al. 2014)": (18.0, 40.9, 55.0, 12.5, 37.0, 51.5, 214.9),
    "DeepVS (Karpathy & Fei-Fei 2015)": (16.5, 40.6, 54.2, 11.8, 32.1, 44.7, 199.9),
    "HGLMM Fisher vectors (Klein et al. 2015)": (31.0, 59.3, 73.7, 21.2, 50.0, 64.8, 300.0),
}
METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
QUERYBANK = "+querybank"  # suffix of a configuration scored with its query bank
PAIRS = {"selfalign_gain": ("selfalign", "base"), "grid_gain": ("grid", "grid-base"),  # SelfAlign vs its base
         "distill_gain": ("distilled", "selfalign"),  # what the ensemble's teaching adds
         "distill_by_base_gain": ("distilled-by-base", "selfalign"),
         "distilled_selfalign_gain": ("distilled-by-base", "base-distilled-by-base")}  # SelfAlign, both taught


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def collect(out: Path, configs) -> dict:
    """Every finished run of ``configs`` under ``out``: {config: {seed: metrics}}, query-bank scores as
    ``config+querybank``."""
    results: dict = {}
    for file, suffix in (("eval.json", ""), ("eval_querybank.json", QUERYBANK)):
        for path in sorted(out.glob(f"*-seed*/{file}")):
            name, seed = path.parent.name.rsplit("-seed", 1)
            if name in configs:
                results.setdefault(name + suffix, {})[seed] = json.loads(path.read_text())
    return results


def summarise(results: dict) -> dict:
    summary = {}
    for name, per_seed in results.items():
        row = {"seeds": sorted(per_seed)}
        for key in METRICS:
            xs = [m[key] for m in per_seed.values()]
            row[key] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}
        row["train_seconds_mean"] = statistics.fmean(m.get("train_seconds", 0.0) for m in per_seed.values())
        summary[name] = row
    for key, (with_it, without) in PAIRS.items():
        for suffix in ("", QUERYBANK):
            ours, base = results.get(with_it + suffix), results.get(without + suffix)
            if ours and base:
                gains = {s: ours[s]["rsum"] - base[s]["rsum"] for s in sorted(set(ours) & set(base))}
                summary[key + suffix] = {"per_seed": gains,
                                         "mean": statistics.fmean(gains.values()) if gains else None}
    return summary


def markdown(results: dict, summary: dict, command: str, ensembles: dict | None = None) -> str:
    head = "| {} | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | {} |\n|---|---|---|---|---|---|---|---|---|\n"
    lines = [f"Command: `{command}`  \nHost: {platform.machine()}, {platform.processor() or 'cpu'}; {now()}\n",
             "Per run:\n", head.format("config / seed", "train s (eval s)").rstrip("\n")]
    for name, per_seed in results.items():
        for seed, m in sorted(per_seed.items()):
            cells = " | ".join(f"{m[k]:.1f}" for k in METRICS)
            seconds = f"{m.get('train_seconds', 0):.0f} ({m.get('eval_seconds', 0):.0f})"
            lines.append(f"| {name} / {seed} | {cells} | {seconds} |")
    lines += ["", "Mean ± std over seeds, with published Flickr8k 1K-test results:\n",
              head.format("config", "seeds").rstrip("\n")]
    for name, row in summary.items():
        if name.startswith(tuple(PAIRS)):
            continue
        cells = " | ".join(f"{row[k]['mean']:.1f} ± {row[k]['std']:.1f}" if len(row["seeds"]) > 1
                           else f"{row[k]['mean']:.1f}" for k in METRICS)
        lines.append(f"| {name} | {cells} | {len(row['seeds'])} |")
    for paper, values in PUBLISHED.items():
        lines.append(f"| {paper} | " + " | ".join(f"{v:.1f}" for v in values) + " | — |")
    for key, (with_it, without) in PAIRS.items():
        for suffix, label in (("", ""), (QUERYBANK, ", both with their query banks")):
            gain = summary.get(key + suffix)
            if gain and gain["mean"] is not None:
                per = ", ".join(f"seed {s}: {d:+.1f}" for s, d in gain["per_seed"].items())
                lines.append(f"\n{with_it} − {without} rsum{label}: mean {gain['mean']:+.1f} ({per})")
    if ensembles:
        lines += ["", "Each configuration's seeds as one model (`selfalign ensemble`; one encoder per member at query "
                  "time):\n", head.format("ensemble", "scored in s").rstrip("\n")]
        for name, scored in ensembles.items():
            for key, label in (("plain", ""), ("querybank", ", each member with its bank")):
                if key in scored:
                    cells = " | ".join(f"{scored[key][k]:.1f}" for k in METRICS)
                    lines.append(f"| {name}: {', '.join(scored['members'])}{label} | {cells} | "
                                 f"{scored['seconds']:.0f} |")
    return "\n".join(lines) + "\n"
