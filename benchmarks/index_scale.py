"""Index scaling benchmark: build time, bytes/item, single-query latency and cross-modal recall@k.

Galleries of synthetic, modality-gapped embeddings (image vectors and "caption" queries drawn from a shared
clustered low-rank latent, each modality shifted by its own constant offset, L2-normalised). For each size
and index kind (flat, hnsw, ivfpq + exact refine) it records build time, bytes per item of the saved index,
one-query-at-a-time latency p50/p99 and recall@k of text queries against the exact top-k, sweeping the
search knob (efSearch; nprobe x k_factor).

    python benchmarks/index_scale.py --sizes 10000,100000,1000000 --dim 1536 --queries 200 --out results.json

The gallery is regenerated (same seed) for each index instead of being held in RAM, and the exact top-k is
computed by a streamed GEMM, so peak memory is about one index; the flat row is skipped when its vectors
would not fit in 60 % of the available RAM. Build times use ``--threads`` (2) OpenMP threads; on a machine
shared with other work each OpenMP barrier can wait for a scheduler slice, so compare builds on a quiet box.
Latency is wall-clock plus the calling thread's CPU time (``cpu_p50_ms``), which is immune to that.

Hook for end-to-end timing: :func:`measure` takes ``encode(i) -> [1, E]``; the default returns the i-th
precomputed synthetic query, a real encoder (tokenise + encode one caption) can be passed instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import faiss
import numpy as np

from selfalign.atomic import write_json
from selfalign.index import FaissIndex
from selfalign.index.base import available_ram_bytes

CHUNK = 65_536


class SyntheticModalities:
    """Shared latent ``z = center + spread * noise`` (clustered, low rank) -> both modalities.

    A vector is ``normalise(normalise(z A) + noise * n / sqrt(E) + offset_modality)``; a caption query
    takes its gallery image's latent plus ``caption_noise`` so each query has a true (paired) image.
    """

    def __init__(self, dim: int, *, latent_dim: int = 128, clusters: int = 1000, spread: float = 1.0,
                 noise: float = 1.0, gap: float = 1.0, caption_noise: float = 0.3, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dim, self.spread, self.noise, self.caption_noise = dim, spread, noise, caption_noise
        self.centers = rng.normal(size=(clusters, latent_dim)).astype(np.float32)
        self.proj = (rng.normal(size=(latent_dim, dim)) / np.sqrt(latent_dim)).astype(np.float32)
        offsets = rng.normal(size=(2, dim))
        offsets /= np.linalg.norm(offsets, axis=1, keepdims=True)
        self.offset_image, self.offset_text = (gap * offsets).astype(np.float32)

    def latents(self, n: int, rng: np.random.Generator) -> np.ndarray:
        k = rng.integers(0, len(self.centers), n)
        return self.centers[k] + self.spread * rng.standard_normal((n, self.centers.shape[1]), np.float32)

    def embed(self, z: np.ndarray, modality: str, rng: np.random.Generator) -> np.ndarray:
        s = z @ self.proj
        s *= 1.0 / np.sqrt(np.einsum("ij,ij->i", s, s))[:, None]
        # Uniform noise with unit variance per coordinate (cheaper than Gaussian; in high dimension only the
        # isotropic, near-orthogonal spread matters). In-place ops: no 400 MB temporaries per chunk.
        noise = rng.random(s.shape, np.float32)
        noise -= 0.5
        noise *= self.noise * np.sqrt(12.0 / self.dim)
        s += noise
        s += self.offset_image if modality == "image" else self.offset_text
        s *= 1.0 / np.sqrt(np.einsum("ij,ij->i", s, s))[:, None]
        return s

    def gallery(self, n: int, seed: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(start, vectors [c, E], latents [c, latent])`` chunks of image vectors; the same seed always
        regenerates the same gallery, so each index streams it without holding a second 1M x E copy."""
        rng = np.random.default_rng(seed)
        for start in range(0, n, CHUNK):
            z = self.latents(min(CHUNK, n - start), rng)
            yield start, self.embed(z, "image", rng), z

    def captions(self, z_items: np.ndarray, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        z = z_items + self.caption_noise * rng.standard_normal(z_items.shape, np.float32)
        return self.embed(z, "text", rng)


def measure(index: FaissIndex, encode: Callable[[int], np.ndarray], n_queries: int, k: int,
            budget_s: float) -> dict:
    """One query at a time (encode + search); stops after ``budget_s`` seconds (at least 10 queries).

    Wall-clock latency is what a user sees, but it is inflated when other processes share the cores;
    the CPU time of the calling thread is reported beside it (faiss runs a single query entirely on the
    calling thread for flat, HNSW and IVF, so this is the latency on an otherwise idle machine).
    """
    for i in range(min(5, n_queries)):  # warm caches and thread pools
        index.search(encode(i), k)
    wall, cpu, ids = [], [], []
    start = time.perf_counter()
    for i in range(n_queries):
        t0, c0 = time.perf_counter(), time.thread_time()
        _, found = index.search(encode(i), k)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
        ids.append(found[0])
        if time.perf_counter() - start > budget_s and i >= 9:
            break
    ms, cpu_ms = np.array(wall) * 1e3, np.array(cpu) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "cpu_p50_ms": float(np.percentile(cpu_ms, 50)), "cpu_p99_ms": float(np.percentile(cpu_ms, 99)),
            "latency_queries": len(ms), "ids": np.stack(ids)}


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / truth.shape[1] for a, b in zip(found, truth)]))


def saved_bytes(index: FaissIndex, workdir: Path) -> int:
    target = workdir / f"{index.kind}-{len(index)}"
    index.save(target)
    size = sum(p.stat().st_size for p in target.iterdir())
    shutil.rmtree(target)
    return size


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def run_size(n: int, args: argparse.Namespace, workdir: Path) -> list[dict]:
    synth = SyntheticModalities(args.dim, latent_dim=args.latent_dim, clusters=args.clusters, gap=args.gap,
                                spread=args.spread, noise=args.noise, seed=args.seed)
    rng = np.random.default_rng(args.seed + n)
    query_items = np.sort(rng.choice(n, args.queries, replace=False))
    train_items = np.sort(rng.choice(n, min(n, args.train_max), replace=False))
    ids = np.arange(n, dtype=np.int64)
    rows: list[dict] = []

    def stream_into(index: FaissIndex) -> float:
        """Add the regenerated gallery chunk by chunk; returns the seconds spent in add() alone."""
        spent = 0.0
        for start, chunk, _ in synth.gallery(n, seed=args.seed + 1):
            t0 = time.perf_counter()
            index.add(ids[start:start + len(chunk)], chunk)
            spent += time.perf_counter() - t0
        return spent

    def record(kind: str, build: dict, bytes_total: int, setting: dict, res: dict, truth: np.ndarray) -> None:
        row = {"n": n, "dim": args.dim, "kind": kind, **build, "bytes_per_item": bytes_total / n, **setting,
               **{key: res[key] for key in ("p50_ms", "p99_ms", "cpu_p50_ms", "cpu_p99_ms", "latency_queries")},
               f"recall@{args.k}": recall_at_k(res["ids"], truth[: len(res["ids"])]),
               "load_avg_1m": os.getloadavg()[0]}
        rows.append(row)
        print(json.dumps({key: (round(v, 4) if isinstance(v, float) else v) for key, v in row.items()}), flush=True)

    # Pass 1: exact top-k by streamed GEMM (no full copy in RAM), the query latents, the IVF-PQ training sample.
    t_gen = time.perf_counter()
    zq = np.empty((len(query_items), args.latent_dim), np.float32)
    sample = np.empty((len(train_items), args.dim), np.float32)
    for start, chunk, z in synth.gallery(n, seed=args.seed + 1):
        for items, dst, src in ((query_items, zq, z), (train_items, sample, chunk)):
            sel = (items >= start) & (items < start + len(chunk))
            dst[sel] = src[items[sel] - start]
    gen_s = time.perf_counter() - t_gen
    queries = synth.captions(zq, seed=args.seed + 2)
    best_s = np.full((len(queries), args.k), -np.inf, np.float32)
    best_i = np.full((len(queries), args.k), -1, np.int64)
    for start, chunk, _ in synth.gallery(n, seed=args.seed + 1):
        s_all = np.concatenate([best_s, queries @ chunk.T], axis=1)
        i_all = np.concatenate([best_i, np.broadcast_to(ids[start:start + len(chunk)], (len(queries), len(chunk)))], 1)
        top = np.argsort(-s_all, axis=1, kind="stable")[:, :args.k]
        best_s, best_i = np.take_along_axis(s_all, top, 1), np.take_along_axis(i_all, top, 1)
    truth = best_i
    encode = lambda i: queries[i:i + 1]  # noqa: E731 - the --encoder hook slots in here
    paired = float(np.mean([query_items[i] in truth[i] for i in range(len(queries))]))
    print(f"n={n}: paired image in exact top-{args.k}: {paired:.3f}", flush=True)
    flat_bytes, ram = n * args.dim * 4, available_ram_bytes()
    if "flat" in args.kinds and flat_bytes > 0.6 * ram:
        print(f"n={n}: flat skipped: {flat_bytes / 2**30:.1f} GiB of vectors, {ram / 2**30:.1f} GiB RAM available",
              flush=True)
    elif "flat" in args.kinds:
        flat = FaissIndex(args.dim, "flat")
        build = {"build_s": stream_into(flat), "gen_s": gen_s, "paired_in_exact_topk": paired}
        res = measure(flat, encode, args.queries, args.k, args.flat_budget_s)
        record("flat", build, saved_bytes(flat, workdir), {}, res, truth)
        del flat
        gc.collect()

    if "ivfpq" in args.kinds:
        mix = None
        if args.train_text:  # PQ codebooks on both modalities; the coarse quantiser always uses images
            text = synth.captions(synth.latents(args.train_text, np.random.default_rng(args.seed + 3)),
                                  seed=args.seed + 4)
            mix = np.concatenate([sample, text])
        t0 = time.perf_counter()
        index = FaissIndex(args.dim, "ivfpq", expected_count=n, nlist_factor=args.nlist_factor,
                           train_max=args.train_max, refine=args.refine)
        index.train(sample, pq_vectors=mix)
        train_s = time.perf_counter() - t0
        build = {"build_s": train_s + stream_into(index), "train_s": train_s, "nlist": index.params["nlist"],
                 "pq_m": index.params["pq_m"], "pq_nbits": index.params["pq_nbits"], "refine": args.refine,
                 "pq_train": "mixed" if mix is not None else "images"}
        size = saved_bytes(index, workdir)
        for nprobe in args.nprobe:
            for kf in args.k_factor:
                index.set_search_params(nprobe=nprobe, k_factor=kf)
                res = measure(index, encode, args.queries, args.k, args.budget_s)
                record("ivfpq", build, size, {"nprobe": nprobe, "k_factor": kf}, res, truth)
        del index, mix
        gc.collect()

    if "hnsw" in args.kinds and n > args.hnsw_max_n:
        print(f"n={n}: hnsw skipped (--hnsw-max-n {args.hnsw_max_n})", flush=True)
    elif "hnsw" in args.kinds:
        index = FaissIndex(args.dim, "hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
        build = {"build_s": stream_into(index), "hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction}
        size = saved_bytes(index, workdir)
        for ef in args.ef_search:
            index.set_search_params(ef_search=ef)
            res = measure(index, encode, args.queries, args.k, args.budget_s)
            record("hnsw", build, size, {"ef_search": ef}, res, truth)
        del index
        gc.collect()
    return rows


def table(rows: list[dict], k: int = 10) -> str:
    """The rows as a markdown table (one line per index setting)."""
    lines = ["| N | kind | knob | build s | bytes/item | p50 ms | p99 ms | cpu p50 ms | cpu p99 ms | recall@%d |" % k,
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        knob = ", ".join(f"{key}={r[key]:g}" for key in ("ef_search", "nprobe", "k_factor") if key in r) or "-"
        lines.append(f"| {r['n']:,} | {r['kind']} | {knob} | {r['build_s']:.1f} | {r['bytes_per_item']:.0f} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_p50_ms']:.2f} | {r['cpu_p99_ms']:.2f} | "
                     f"{r[f'recall@{k}']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=ints, default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", default="flat,ivfpq,hnsw")
    ap.add_argument("--threads", type=int, default=2, help="faiss.omp_set_num_threads for build and search")
    ap.add_argument("--ef-search", type=ints, default=[32, 64, 128, 256, 1024])
    ap.add_argument("--ef-construction", type=int, default=40)
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--nprobe", type=ints, default=[8, 16, 32])
    ap.add_argument("--k-factor", type=ints, default=[10, 30])
    ap.add_argument("--nlist-factor", type=float, default=4.0, help="nlist = factor * sqrt(N)")
    ap.add_argument("--refine", default="flat", choices=["flat", "fp16", "sq8", "none"])
    ap.add_argument("--train-max", type=int, default=100_000, help="image vectors sampled to train IVF-PQ")
    ap.add_argument("--train-text", type=int, default=0,
                    help="caption vectors added to the PQ codebook training (0: images only)")
    ap.add_argument("--hnsw-max-n", type=int, default=200_000,
                    help="skip HNSW above this size: at 1M x 1536 its build alone takes ~10 min on 2 cores")
    ap.add_argument("--latent-dim", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=1.0, help="within-cluster spread of the latent")
    ap.add_argument("--noise", type=float, default=1.0, help="isotropic noise norm (signal norm is 1)")
    ap.add_argument("--gap", type=float, default=1.0, help="norm of each modality's constant offset")
    ap.add_argument("--budget-s", type=float, default=20.0, help="latency-loop time cap per setting")
    ap.add_argument("--flat-budget-s", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where indexes are saved to measure their size")
    ap.add_argument("--out", default="index_scale_results.json")
    args = ap.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    faiss.omp_set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="index_scale_"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows: list[dict] = []
    for n in args.sizes:
        rows.extend(run_size(n, args, workdir))
        result = {"config": {k: v for k, v in vars(args).items()}, "faiss": faiss.__version__,
                  "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform()},
                  "elapsed_s": time.time() - started, "rows": rows}
        write_json(args.out, result)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(rows, args.k))
    print(f"done in {time.time() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
