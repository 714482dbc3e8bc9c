"""Training curves from runs' ``log.csv`` and retrieval examples (top-5 images per text query)."""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path

import numpy as np
import torch

from selfalign.analysis.common import RunSplit, load_rgb, new_figure, save_figure
from selfalign.data.batches import RegionStore
from selfalign.data.text import tokenize
from selfalign.errors import InputError

LOSS_NAMES = {"loss_rank": "ranking (VSE++ hinge)", "loss_lca": "LCA (concepts)", "loss_cra": "CRA (context)"}


def read_log(run_dir: str | Path) -> list[dict]:
    """The epochs of ``run_dir/log.csv`` as dicts of floats (empty cells become None)."""
    path = Path(run_dir) / "log.csv"
    if not path.is_file():
        raise InputError(f"{path} not found (is {run_dir} a run directory with at least one finished epoch?)")
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for number, row in enumerate(csv.DictReader(fh), start=2):
            try:
                rows.append({k: (float(v) if v not in ("", None) else None) for k, v in row.items() if k})
            except ValueError as exc:
                raise InputError(f"{path}, line {number}: not a number ({exc})") from None
    if not rows or "epoch" not in rows[0]:
        raise InputError(f"{path}: no epoch rows")
    return rows


def integer_epochs(ax, epochs: list[float]) -> None:
    """Whole-number epoch ticks (a one-epoch run would otherwise get ticks like 0.96, 0.98, ...)."""
    from matplotlib.ticker import MaxNLocator

    if epochs and len(epochs) <= 12:
        ax.set_xticks(epochs, [str(int(e)) for e in epochs])
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def curves_figure(runs: list[tuple[str, list[dict]]], out_path: Path) -> Path:
    """One panel per loss part (mean over the epoch's steps) plus dev rsum; one line per run."""
    parts = [k for k in LOSS_NAMES if any(k in r for _, rows in runs for r in rows)]
    parts += sorted({k for _, rows in runs for r in rows for k in r if k.startswith("loss_") and k not in parts})
    panels = parts + ["dev_rsum"]
    cols = min(len(panels), 4)
    n_rows = -(-len(panels) // cols)
    fig, axes = new_figure(n_rows, cols, figsize=(4 * cols, 3.3 * n_rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, key in zip(flat, panels):
        for name, rows in runs:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, label=name)
        ax.set_xlabel("epoch")
        integer_epochs(ax, sorted({float(r["epoch"]) for _, rows in runs for r in rows}))
        if key == "dev_rsum":
            ax.set_ylabel("rsum (sum of 6 recalls, %)")
            ax.set_title("dev rsum (higher is better)", fontsize=10)
        else:
            ax.set_ylabel("loss (mean per step)")
            ax.set_title(LOSS_NAMES.get(key, key), fontsize=10)
        ax.grid(alpha=0.3)
    for ax in flat[len(panels):]:
        ax.set_axis_off()
    flat[0].legend(fontsize=8)
    fig.suptitle("Training curves (from log.csv)", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, out_path)


def curves_summary(runs: list[tuple[str, list[dict]]]) -> list[list]:
    """Rows (run, epochs, final losses, best dev rsum and its epoch) for the report table."""
    out = []
    for name, rows in runs:
        xs, rsum = _series(rows, "dev_rsum")
        best = int(np.argmax(rsum)) if rsum else None
        total = sum(v for k, v in rows[-1].items() if k.startswith("loss_") and v is not None)
        out.append([name, int(rows[-1]["epoch"]), round(total, 4),
                    round(rsum[best], 2) if best is not None else "n/a", int(xs[best]) if best is not None else "n/a"])
    return out


def default_queries(rs: RunSplit, n: int) -> list[str]:
    """``n`` captions spread evenly over the split (caption 0 of evenly spaced images)."""
    if n < 1:
        raise InputError("--n must be at least 1")
    picks = np.linspace(0, rs.split.num_images - 1, num=min(n, rs.split.num_images)).round().astype(int)
    return [rs.split.captions[5 * i] for i in picks]


@torch.inference_mode()
def retrieve(rs: RunSplit, queries: list[str], k: int = 5) -> list[dict]:
    """Top-``k`` images of the split per query; an image is correct when one of its captions equals the query
    word for word (so free-text queries usually have no known correct image)."""
    from selfalign.evaluate.runner import encode_captions, encode_images

    if not queries or any(not tokenize(q) for q in queries):
        raise InputError("every query needs at least one word")
    images = encode_images(rs.model, RegionStore(rs.split.images, rs.split.region_mask()))
    scores = encode_captions(rs.model, queries) @ images.T
    caption_words = [tuple(tokenize(c)) for c in rs.split.captions]
    out = []
    for query, row in zip(queries, scores):
        target = tuple(tokenize(query))
        correct = {j // 5 for j, words in enumerate(caption_words) if words == target}
        top = torch.topk(row, min(k, len(row)))
        out.append({"query": query, "correct": sorted(correct),
                    "top": [{"index": int(i), "image_id": rs.split.image_ids[int(i)], "score": round(float(s), 4),
                             "correct": int(i) in correct} for s, i in zip(top.values, top.indices)]})
    return out


def examples_figure(rs: RunSplit, results: list[dict], out_path: Path) -> Path:
    """One row per query: its top images, correct ones framed green, others grey."""
    k = max(len(r["top"]) for r in results)
    fig, axes = new_figure(len(results), k, figsize=(2.1 * k, 2.5 * len(results)), squeeze=False)
    for row, result in enumerate(results):
        for col in range(k):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(result["top"]):
                ax.set_axis_off()
                continue
            hit = result["top"][col]
            ax.imshow(load_rgb(rs.image_path(hit["index"])))
            for spine in ax.spines.values():
                spine.set_edgecolor("#2ca02c" if hit["correct"] else "#bbbbbb")
                spine.set_linewidth(5 if hit["correct"] else 1)
            ax.set_xlabel(f"#{col + 1}  {hit['score']:.2f}\n{hit['image_id']}", fontsize=7)
        known = "" if result["correct"] else "  [no known correct image]"
        axes[row][0].set_title(textwrap.fill(f"“{result['query']}”{known}", 24 * k // 2), fontsize=9, loc="left")
    fig.suptitle(f"Text → image retrieval, {rs.label}, {rs.split_name} split (green frame = correct; score = dot "
                 f"product of embeddings)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_path)
