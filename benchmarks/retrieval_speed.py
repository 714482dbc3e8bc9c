"""Retrieval speed: the dual encoder (one dot product per pair, indexable) against SCAN cross-attention (every
pair attended), on the same model, the same region/word features and the same machine, in one run.

1. ``test``:    score a full N-image x 5N-caption test split (Flickr 1K x 5K): embeddings' product vs the batched,
                chunked SCAN t2i scorer over the same model's contextual locals. Encoding is shared and reported
                apart. SCAN runs in full unless a measured subset predicts more than ``--scan-full-limit-s``; then
                the full time is extrapolated per pair (and flagged).
2. ``query``:   one text query against galleries of 1K/10K/100K images: SCAN scores every gallery image (locals
                pre-computed, as a SCAN gallery would cache them), the dual encoder searches a FaissIndex. Both
                include tokenise + encode of the query. SCAN's cost is measured at ``--scan-measure-max`` images
                at most and extrapolated per pair beyond (flagged).
3. ``index``:   galleries of 10K/100K/1M synthetic, modality-gapped embeddings (benchmarks/index_scale.py) for each
                index kind: build time, bytes/item, end-to-end text-query latency p50/p99 (real tokenise + encode of
                a caption with the model, then search) and recall@10 of cross-modal queries against exact search.

The model is a trained run (``--run``) or, without one, a freshly initialised model of ``--config`` (speed does
not depend on training). Region features are a real feature store split when present (``--features``).

    nice -n 10 python benchmarks/retrieval_speed.py --features features/flickr8k/grid --json speed.json
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_scale import SyntheticModalities, measure, recall_at_k, saved_bytes  # noqa: E402
from index_scale import table as index_table  # noqa: E402

from selfalign.atomic import write_json  # noqa: E402
from selfalign.config import load_config  # noqa: E402
from selfalign.data.precomp import load_feature_split  # noqa: E402
from selfalign.data.text import Vocabulary  # noqa: E402
from selfalign.evaluate.runner import encode_split  # noqa: E402
from selfalign.index import FaissIndex  # noqa: E402
from selfalign.model.checkpoint import build_model, load_model  # noqa: E402

PACKAGED = Path(__file__).resolve().parents[1] / "src" / "selfalign" / "configs"


def ints(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q))


def setup(args) -> tuple:
    """(model, split, description); the model is in eval mode on the CPU."""
    split = load_feature_split(args.features, args.split)
    if args.run:
        model, cfg = load_model(args.run, "cpu")
        source = f"trained run {args.run}"
    else:
        cfg = load_config(args.config, [f"model.image_dim={split.images.shape[-1]}", "model.text_encoder=bigru"])
        torch.manual_seed(0)
        model = build_model(cfg, Vocabulary.build(list(split.captions)), init_pretrained=False).eval()
        source = f"random init of {args.config} (no trained run given; speed does not depend on the weights)"
    return model, split, source


@torch.inference_mode()
def encode_query(model, caption: str) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """One caption -> (embedding ``[1, E]``, locals ``[1, L, d]``, mask ``[1, L]``)."""
    enc = model.encode_text(model.tokenize([caption]))
    loc, mask = model.scoring_locals(enc)
    return enc.embedding.float().numpy(), loc.float(), mask


def timed(fn, *a):
    """(result, wall seconds, process CPU seconds) of ``fn(*a)``."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*a)
    return out, time.perf_counter() - t0, time.process_time() - c0


def bench_test(model, split, args) -> dict:
    emb, _, encode_cpu = timed(encode_split, model, split, args.test_images, 256, True)
    loc = emb.locals
    n, m = emb.images.shape[0], emb.captions.shape[0]
    dot, dot_cpu = [], []
    for _ in range(5):
        t0, c0 = time.perf_counter(), time.process_time()
        sims = emb.images @ emb.captions.T
        dot.append(time.perf_counter() - t0)
        dot_cpu.append(time.process_time() - c0)
    del sims
    def score(i: int, j: int) -> torch.Tensor:
        return model.score_locals(loc.images[i:j], loc.image_mask[i:j], loc.captions, loc.caption_mask)

    with torch.inference_mode():
        score(0, 2)  # warm-up
        k = min(n, args.scan_subset)
        _, sub, sub_cpu = timed(score, 0, k)
        per_pair, per_pair_cpu = sub / (k * m), sub_cpu / (k * m)
        measured = per_pair * n * m <= args.scan_full_limit_s
        if measured:
            _, scan_s, scan_cpu = timed(score, 0, n)
        else:  # per pair, from the subset (every image is scored against all captions, so the cost is linear)
            scan_s, scan_cpu = per_pair * n * m, per_pair_cpu * n * m
    dot_s, dot_cpu_s = float(np.median(dot)), float(np.median(dot_cpu))
    words = loc.caption_mask.sum(1).float()
    out = {"images": n, "captions": m, "embedding_dim": emb.images.shape[1],
           "regions": int(loc.images.shape[1]), "regions_valid_mean": float(loc.image_mask.sum(1).float().mean()),
           "words_mean": float(words.mean()), "local_dim": int(loc.images.shape[2]),
           "encode_s": emb.seconds, "encode_cpu_s": encode_cpu, "dot_s": dot_s, "scan_s": scan_s,
           "scan_measured_full": measured,
           "dot_cpu_s": dot_cpu_s, "scan_cpu_s": scan_cpu, "speedup_scoring_cpu": scan_cpu / max(dot_cpu_s, 1e-9),
           "scan_subset_images": k, "scan_subset_s": sub, "scan_subset_cpu_s": sub_cpu,
           "scan_per_pair_us": per_pair * 1e6, "scan_per_pair_cpu_us": per_pair_cpu * 1e6,
           "speedup_scoring": scan_s / dot_s, "speedup_with_encoding": (emb.seconds + scan_s) / (emb.seconds + dot_s)}
    print(f"[test] {n}x{m}: encode {emb.seconds:.2f}s, dot {dot_s * 1e3:.1f} ms (CPU {dot_cpu_s * 1e3:.1f}), SCAN "
          f"{scan_s:.1f} s (CPU {scan_cpu:.1f}; {'measured' if measured else 'extrapolated from %d images' % k}) -> "
          f"{out['speedup_scoring']:.0f}x wall, {out['speedup_scoring_cpu']:.0f}x CPU", flush=True)
    return {"result": out, "emb": emb}


def tile_gallery(x: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    """``n`` gallery rows: the real rows repeated, jittered and renormalised (for flat search only the size matters)."""
    rng = np.random.default_rng(seed)
    out = np.resize(x, (n, x.shape[1])).astype(np.float32)
    if n > len(x):
        out[len(x):] += noise * rng.standard_normal((n - len(x), x.shape[1]), np.float32) / np.sqrt(x.shape[1])
        out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def bench_query(model, split, emb, args) -> list[dict]:
    """One typed query: tokenise + encode (both need it), then index search (dual) or score-all (SCAN)."""
    captions = list(split.captions)
    loc = emb.locals
    rows = []
    scan_pair = scan_pair_cpu = 0.0  # SCAN's measured scoring cost per gallery image (largest measured gallery)
    for n in args.query_sizes:
        gallery = tile_gallery(emb.images.numpy(), n, 0.5, n)
        measured = n <= args.scan_measure_max
        if measured:
            reps = (n + len(loc.images) - 1) // len(loc.images)
            img, mask = loc.images.repeat(reps, 1, 1)[:n], loc.image_mask.repeat(reps, 1)[:n]
            img /= torch.linalg.vector_norm(img, dim=2, keepdim=True) + 1e-8  # a SCAN gallery caches unit locals
            scan_t, scan_c = [], []
            with torch.inference_mode():
                for i in range(max(3, args.query_count if n <= 1000 else args.query_count // 10) + 1):
                    _, words, wmask = encode_query(model, captions[i % len(captions)])
                    _, w, c = timed(lambda: torch.topk(
                        model.score_locals(img, mask, words, wmask, normalized=True)[:, 0], 10))
                    if i:
                        scan_t.append(w)
                        scan_c.append(c)
            del img, mask
            scan_pair, scan_pair_cpu = float(np.median(scan_t)) / n, float(np.median(scan_c)) / n
        for kind in args.query_kinds:
            faiss.omp_set_num_threads(args.build_threads)
            index, build_s, _ = timed(FaissIndex.build, np.arange(n, dtype=np.int64), gallery, kind)
            faiss.omp_set_num_threads(args.threads)
            enc_t, enc_c, search_t, search_c = [], [], [], []
            for i in range(args.query_count + 3):
                (q, _, _), w1, c1 = timed(encode_query, model, captions[i % len(captions)])
                _, w2, c2 = timed(index.search, q, 10)
                if i >= 3:
                    enc_t.append(w1), enc_c.append(c1), search_t.append(w2), search_c.append(c2)
            e2e = [a + b for a, b in zip(enc_t, search_t)]
            e2e_c = [a + b for a, b in zip(enc_c, search_c)]
            enc, enc_cpu = pct(enc_t, 50), pct(enc_c, 50)
            scan_score, scan_score_cpu = scan_pair * n * 1e3, scan_pair_cpu * n * 1e3
            row = {"gallery": n, "index_kind": index.kind, "index_build_s": build_s, "encode_p50_ms": enc,
                   "encode_cpu_p50_ms": enc_cpu, "search_p50_ms": pct(search_t, 50),
                   "search_cpu_p50_ms": pct(search_c, 50), "dual_p50_ms": pct(e2e, 50), "dual_p99_ms": pct(e2e, 99),
                   "dual_cpu_p50_ms": pct(e2e_c, 50), "scan_measured": measured,
                   "scan_per_image_us": scan_pair * 1e6, "scan_score_ms": scan_score,
                   "scan_score_cpu_ms": scan_score_cpu, "scan_p50_ms": enc + scan_score,
                   "scan_cpu_p50_ms": enc_cpu + scan_score_cpu}
            row.update({"speedup": row["scan_p50_ms"] / row["dual_p50_ms"],
                        "speedup_cpu": row["scan_cpu_p50_ms"] / row["dual_cpu_p50_ms"],
                        "speedup_search_only": scan_score / row["search_p50_ms"],
                        "speedup_search_only_cpu": scan_score_cpu / max(row["search_cpu_p50_ms"], 1e-6)})
            rows.append(row)
            print(f"[query] gallery {n} {index.kind}: encode {enc:.2f} ms, search {row['search_p50_ms']:.3f} ms, "
                  f"SCAN score {scan_score:.1f} ms ({'measured' if measured else 'extrapolated'}) -> "
                  f"{row['speedup']:.0f}x end to end, {row['speedup_search_only']:.0f}x search only", flush=True)
            del index
        del gallery
        gc.collect()
    return rows


def bench_index(model, split, dim: int, args, workdir: Path) -> list[dict]:
    captions = list(split.captions)
    rows = []
    for n in args.sizes:
        synth = SyntheticModalities(dim, seed=args.seed)
        rng = np.random.default_rng(args.seed + n)
        items = rng.choice(n, args.index_queries, replace=False)
        t0 = time.perf_counter()
        x = np.empty((n, dim), np.float32)
        zq = np.empty((len(items), synth.centers.shape[1]), np.float32)
        for start, vectors, z in synth.gallery(n, args.seed + 1):
            x[start:start + len(vectors)] = vectors
            sel = (items >= start) & (items < start + len(vectors))
            zq[sel] = z[items[sel] - start]
        queries = synth.captions(zq, seed=args.seed + 2)
        gen_s = time.perf_counter() - t0
        ids = np.arange(n, dtype=np.int64)

        def encode(i: int) -> np.ndarray:
            # The model's real work for a typed query (tokenise + encode); the vector searched is the synthetic
            # cross-modal query, so recall is measured against exact search in the synthetic gallery.
            encode_query(model, captions[i % len(captions)])
            return queries[i % len(queries): i % len(queries) + 1]

        faiss.omp_set_num_threads(args.build_threads)
        t0 = time.perf_counter()
        flat = FaissIndex.build(ids, x, kind="flat")
        flat_build = time.perf_counter() - t0
        _, truth = flat.search(queries, 10)
        settings = {"flat": [{}], "hnsw": [{"ef_search": e} for e in args.ef_search],
                    "ivfpq": [{"nprobe": p, "k_factor": f} for p in args.nprobe for f in args.k_factor]}
        for kind in ["flat"] + [k for k in args.kinds if k != "flat"]:  # flat first: then its copy is freed
            if kind == "hnsw" and n > args.hnsw_max_n:
                print(f"[index] n={n}: hnsw skipped (--hnsw-max-n)", flush=True)
                continue
            faiss.omp_set_num_threads(args.build_threads)
            t0 = time.perf_counter()
            if kind == "flat":
                index, build_s = flat, flat_build
                flat = None
            elif kind == "hnsw":
                index = FaissIndex.build(ids, x, kind="hnsw")
                build_s = time.perf_counter() - t0
            else:
                text = synth.captions(synth.latents(min(n, 50_000), np.random.default_rng(args.seed + 3)),
                                      seed=args.seed + 4)
                pick = np.sort(np.random.default_rng(args.seed + 5).choice(n, min(n, 100_000), replace=False))
                index = FaissIndex(dim, "ivfpq", expected_count=n)
                index.train(x, pq_vectors=np.concatenate([x[pick], text]))  # both modalities
                index.add(ids, x)
                build_s = time.perf_counter() - t0
            size = saved_bytes(index, workdir)
            faiss.omp_set_num_threads(args.threads)
            for setting in settings[kind] if kind in args.kinds else []:
                if setting:
                    index.set_search_params(**setting)
                res = measure(index, encode, args.index_queries, 10, args.budget_s)
                row = {"n": n, "dim": dim, "kind": kind, **setting, "build_s": build_s, "gen_s": gen_s,
                       "bytes_per_item": size / n, **{k: res[k] for k in ("p50_ms", "p99_ms", "cpu_p50_ms",
                                                                          "cpu_p99_ms", "latency_queries")},
                       "recall@10": recall_at_k(res["ids"], truth[: len(res["ids"])]),
                       "load_avg_1m": os.getloadavg()[0]}
                rows.append(row)
                print(f"[index] n={n} {kind} {setting}: build {build_s:.1f}s, {row['bytes_per_item']:.0f} B/item, "
                      f"p50 {row['p50_ms']:.2f} ms (cpu {row['cpu_p50_ms']:.2f}), p99 {row['p99_ms']:.2f} ms, "
                      f"recall@10 {row['recall@10']:.3f}", flush=True)
            del index
            gc.collect()
        del x
        gc.collect()
        yield rows
        rows = []


def tables(res: dict) -> str:
    """Markdown tables of the results (wall clock; CPU time of this process beside it)."""
    t, lines = res.get("test"), []
    if t:
        lines += ["| test set | encode (shared) | dual scoring (CPU) | SCAN scoring (CPU) | ratio wall / CPU | "
                  "ratio incl. encode |", "|---|---|---|---|---|---|",
                  f"| {t['images']} x {t['captions']} | {t['encode_s']:.1f} s ({t['encode_cpu_s']:.1f} s) | "
                  f"{t['dot_s'] * 1e3:.1f} ms "
                  f"({t['dot_cpu_s'] * 1e3:.1f} ms) | {t['scan_s']:.1f} s ({t['scan_cpu_s']:.1f} s)"
                  f"{'' if t['scan_measured_full'] else ' extrapolated'} | {t['speedup_scoring']:.0f}x / "
                  f"{t['speedup_scoring_cpu']:.0f}x | {t['speedup_with_encoding']:.1f}x |", ""]
    if res.get("query"):
        lines += ["| gallery | index | encode query (CPU) | dual search (CPU) | SCAN score all (CPU) | dual end to end "
                  "| SCAN end to end | ratio end to end, wall / CPU | ratio search only, wall / CPU |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['gallery']:,} | {r['index_kind']} | {r['encode_p50_ms']:.2f} ms "
                  f"({r['encode_cpu_p50_ms']:.2f}) | "
                  f"{r['search_p50_ms']:.3f} ms ({r['search_cpu_p50_ms']:.3f}) | {r['scan_score_ms']:.0f} ms "
                  f"({r['scan_score_cpu_ms']:.0f}){'' if r['scan_measured'] else ' extrapolated'} | "
                  f"{r['dual_p50_ms']:.2f} ms | {r['scan_p50_ms']:.0f} ms | "
                  f"{r['speedup']:.0f}x / {r['speedup_cpu']:.0f}x | "
                  f"{r['speedup_search_only']:.0f}x / {r['speedup_search_only_cpu']:.0f}x |" for r in res["query"]]
        lines.append("")
    if res.get("index"):
        lines.append(index_table(res["index"], k=10))
    return "\n".join(lines)


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """--run / --config / --features / --split: what ``setup`` reads."""
    ap.add_argument("--run", default="", help="a trained run directory (default: a freshly initialised model)")
    ap.add_argument("--config", default=str(PACKAGED / "scenes.yaml"), help="model config without --run")
    ap.add_argument("--features", default="features/flickr8k/grid", help="feature store with the split")
    ap.add_argument("--split", default="test")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--parts", default="test,query,index")
    ap.add_argument("--test-images", type=int, default=1000)
    ap.add_argument("--scan-subset", type=int, default=50, help="images SCAN is first timed on (x all captions)")
    ap.add_argument("--scan-full-limit-s", type=float, default=600.0)
    ap.add_argument("--query-sizes", type=ints, default=[1000, 10_000, 100_000])
    ap.add_argument("--query-count", type=int, default=50)
    ap.add_argument("--query-kinds", default="flat,hnsw", help="index kinds the dual encoder searches")
    ap.add_argument("--scan-measure-max", type=int, default=10_000, help="largest gallery SCAN is timed on")
    ap.add_argument("--sizes", type=ints, default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--skip-1m", action="store_true", help="drop index sizes of 1M and more")
    ap.add_argument("--kinds", default="flat,hnsw,ivfpq")
    ap.add_argument("--ef-search", type=ints, default=[64, 128, 256])
    ap.add_argument("--nprobe", type=ints, default=[16, 32, 64])
    ap.add_argument("--k-factor", type=ints, default=[10], help="IVF-PQ: candidates re-ranked exactly, x k")
    ap.add_argument("--hnsw-max-n", type=int, default=10**9)
    ap.add_argument("--index-queries", type=int, default=200)
    ap.add_argument("--budget-s", type=float, default=15.0, help="latency-loop time cap per index setting")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads, and faiss threads for searches (1: on a shared, oversubscribed 2-core "
                         "machine two OpenMP threads spin-wait and run 3-10x slower)")
    ap.add_argument("--build-threads", type=int, default=2, help="faiss threads for index builds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="retrieval_speed.json")
    args = ap.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.query_kinds = [k for k in args.query_kinds.split(",") if k]
    if args.skip_1m:
        args.sizes = [n for n in args.sizes if n < 1_000_000]
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    model, split, source = setup(args)
    print(f"model: {source}; embedding {model.embedding_dim}-d; features {args.features}/{args.split} "
          f"{tuple(split.images.shape)}", flush=True)
    res: dict = {"command": " ".join(sys.argv), "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                 "model": source, "features": f"{args.features}/{args.split}", "config": vars(args),
                 "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                             "torch": torch.__version__, "faiss": faiss.__version__,
                             "load_avg_1m_start": os.getloadavg()[0]}}
    started = time.time()

    def save() -> None:
        res["elapsed_s"] = time.time() - started
        write_json(args.json, res)

    emb = None
    if "test" in parts or "query" in parts:
        out = bench_test(model, split, args) if "test" in parts else None
        emb = out["emb"] if out else encode_split(model, split, max_images=args.test_images, with_locals=True)
        if out:
            res["test"] = out["result"]
        save()
    if "query" in parts:
        res["query"] = bench_query(model, split, emb, args)
        save()
    del emb
    gc.collect()
    if "index" in parts:
        res["index"] = []
        with tempfile.TemporaryDirectory(prefix="retrieval_speed_") as tmp:
            for rows in bench_index(model, split, model.embedding_dim, args, Path(tmp)):
                res["index"].extend(rows)
                save()
    print(tables(res))
    print(f"done in {time.time() - started:.0f} s -> {args.json}")


if __name__ == "__main__":
    main()
