"""Recall and latency through the search path: a gallery built from a captioned split, queried with its own captions.

Every caption of the gallery (or the first ``--text-queries``) is searched as a text query with
``Gallery.search_text`` and scores a hit when its image is among the top k; every image (or the first
``--image-queries``) is searched as an image query from its photo file (``Gallery.search_image(...,
target="captions")``: regions extracted again, as for a new photo) and scores a hit when one of its own captions is
among the top k. On a flat index this reproduces the protocol's text->image and image->text recalls of
``selfalign evaluate`` (exactly for text queries; image queries re-extract the photo), and shows what an
approximate index or a query-bank coordinate changes. Latency is one query at a time, wall clock, end to end
(tokenise / extract + encode + search). Several galleries are measured in one run, so their latencies compare
as ratios.

    selfalign index runs/f8k_tail/tail-sa-ens3 --dataset flickr --root ../shared/data/flickr8k --split test \\
        --out indexes/f8k-test-ens3
    python benchmarks/gallery_recall.py indexes/f8k-test-sa0 indexes/f8k-test-ens3 --image-queries 200 \\
        --json benchmarks/results/gallery_recall.json
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from selfalign.atomic import write_json
from selfalign.index.gallery import Gallery

KS = (1, 5, 10)


def _summary(ranks: list[int], seconds: list[float], prefix: str) -> dict:
    """Recall@k (percent) from 0-based ranks (``len(KS)`` = missed beyond the largest k) and latency p50/p99 (ms)."""
    if not ranks:
        return {}
    r = np.asarray(ranks)
    out = {f"{prefix}_r{k}": round(100.0 * float((r < k).mean()), 2) for k in KS}
    ms = 1000.0 * np.asarray(seconds)
    out.update({f"{prefix}_queries": len(ranks), f"{prefix}_p50_ms": round(float(np.percentile(ms, 50)), 2),
                f"{prefix}_p99_ms": round(float(np.percentile(ms, 99)), 2)})
    return out


def measure(index_dir: str, text_queries: int, image_queries: int) -> dict:
    """Text->image and image->text recall@1/5/10 and latency of one gallery, queried with its own captions/photos."""
    gallery = Gallery.load(index_dir, load_extractor=image_queries != 0)
    if not gallery.has_captions:
        raise SystemExit(f"{index_dir}: the gallery has no captions (build it from a captioned dataset split)")
    depth = max(KS)
    captions = gallery.captions if text_queries <= 0 else gallery.captions[:text_queries]
    gallery.search_text(captions[0]["text"], k=depth)  # warm-up: first-call allocations are not a query's cost
    t2i_ranks, t2i_seconds = [], []
    for cap in captions:
        start = time.perf_counter()
        hits = gallery.search_text(cap["text"], k=depth)
        t2i_seconds.append(time.perf_counter() - start)
        ids = [h["id"] for h in hits]
        t2i_ranks.append(ids.index(int(cap["image"])) if int(cap["image"]) in ids else depth)
    images = gallery.images if image_queries < 0 else gallery.images[:image_queries]
    i2t_ranks, i2t_seconds = [], []
    for rec in images:
        start = time.perf_counter()
        hits = gallery.search_image(rec["path"], k=depth, target="captions")
        i2t_seconds.append(time.perf_counter() - start)
        own = [j for j, h in enumerate(hits) if h["image"] == int(rec["id"])]
        i2t_ranks.append(own[0] if own else depth)
    manifest = gallery.manifest
    return {"gallery": str(index_dir), "run_dir": manifest["run_dir"], "images": manifest["images"],
            "captions": manifest["captions"], "embedding_dim": manifest.get("embedding_dim"),
            "querybank": bool(manifest.get("querybank")),
            **_summary(t2i_ranks, t2i_seconds, "t2i"), **_summary(i2t_ranks, i2t_seconds, "i2t")}


def table(rows: list[dict]) -> str:
    lines = ["| gallery | dim | bank | t2i R@1 | R@5 | R@10 | text query p50 / p99 ms | i2t R@1 | R@5 | R@10 | "
             "image query p50 / p99 ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def cell(key: str) -> str:
            return "" if key not in r else f"{r[key]:.1f}"

        lat = {p: (f"{r[p + '_p50_ms']:.1f} / {r[p + '_p99_ms']:.1f}" if p + "_p50_ms" in r else "") for p in
               ("t2i", "i2t")}
        lines.append(f"| {r['gallery']} | {r['embedding_dim']} | {'yes' if r['querybank'] else 'no'} | "
                     f"{cell('t2i_r1')} | {cell('t2i_r5')} | {cell('t2i_r10')} | {lat['t2i']} | {cell('i2t_r1')} | "
                     f"{cell('i2t_r5')} | {cell('i2t_r10')} | {lat['i2t']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("galleries", nargs="+", metavar="INDEX_DIR")
    parser.add_argument("--text-queries", type=int, default=0, help="the first N captions (0: all)")
    parser.add_argument("--image-queries", type=int, default=0, help="the first N images (0: none, -1: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one query at a time)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(g, args.text_queries, args.image_queries) for g in args.galleries]
    print(table(rows))
    if args.json:
        write_json(Path(args.json), {"rows": rows, "threads": args.threads, "machine": platform.machine(),
                                     "processor": platform.processor(),
                                     "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})


if __name__ == "__main__":
    main()
