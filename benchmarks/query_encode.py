"""Encoding one query: GPO's weights from its no-grad table (the library's path) against GPO's GRU run for every
query (the path before the table), interleaved in one process so machine load hits both alike.

A text query is one caption (tokenise + encode_text); an image query is one image's regions from a feature store
(encode_image). The model is built as ``retrieval_speed.py`` builds it: a trained run (``--run``) or a freshly
initialised ``--config`` model (speed does not depend on the weights).

    python benchmarks/query_encode.py --features features/flickr8k/grid --json query_encode.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retrieval_speed import add_model_arguments, setup  # noqa: E402

from selfalign.atomic import write_json  # noqa: E402
from selfalign.model.gpo import GPO  # noqa: E402


def gru_every_time(gpos: list[GPO], on: bool) -> None:
    """Route each GPO's ``weights`` through its GRU (on) or back to the library's table (off)."""
    for gpo in gpos:
        if on:
            gpo.weights = lambda lengths, length, g=gpo: g._weights_of(lengths.clamp(min=1), length)
        else:
            gpo.__dict__.pop("weights", None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--repeats", type=int, default=300, help="queries per variant and modality")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="query_encode.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, split, source = setup(args)
    gpos = [m for m in model.modules() if isinstance(m, GPO)]
    if not gpos:
        raise SystemExit(f"{source}: the model pools with mean, not GPO; nothing to compare")
    captions = list(split.captions)
    regions = torch.from_numpy(np.asarray(split.images[: args.repeats], dtype=np.float32))
    mask = torch.from_numpy(np.asarray(split.region_mask()[: args.repeats]))

    def text(i: int) -> torch.Tensor:
        return model.encode_text(model.tokenize([captions[i % len(captions)]])).embedding

    def image(i: int) -> torch.Tensor:
        j = i % len(regions)
        return model.encode_image(regions[j : j + 1], mask[j : j + 1]).embedding

    res: dict = {"command": " ".join(sys.argv), "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                 "model": source, "features": f"{args.features}/{args.split}", "gpo_modules": len(gpos),
                 "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                             "torch": torch.__version__, "load_avg_1m_start": os.getloadavg()[0]}}
    with torch.inference_mode():
        for name, encode in (("text", text), ("image", image)):
            for i in range(10):  # warm-up, both paths
                gru_every_time(gpos, i % 2 == 1)
                encode(i)
            times: dict[bool, list[float]] = {False: [], True: []}
            for i in range(2 * args.repeats):
                gru = i % 2 == 1
                gru_every_time(gpos, gru)
                t0 = time.perf_counter()
                encode(i // 2)
                times[gru].append(time.perf_counter() - t0)
            gru_every_time(gpos, True)
            reference = encode(0)
            gru_every_time(gpos, False)
            diff = float((encode(0) - reference).abs().max())
            table, gru = (float(np.median(times[k])) * 1e3 for k in (False, True))
            res[name] = {"table_p50_ms": table, "gru_p50_ms": gru, "speedup": gru / table, "max_abs_diff": diff}
            print(f"{name} query: GPO table {table:.3f} ms, GPO's GRU every query {gru:.3f} ms (p50 of "
                  f"{args.repeats} each) -> {gru / table:.2f}x; embeddings differ by at most {diff:.1e}", flush=True)
    write_json(args.json, res)


if __name__ == "__main__":
    main()
