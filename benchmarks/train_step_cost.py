"""Issue 3's training cost: SelfAlign's step time against the base model's at the same batch size.

    python benchmarks/train_step_cost.py --features features/scenes --batch-size 128 --steps 30

One process, the two models' steps interleaved (base, SelfAlign, base, ...) so machine noise hits both alike;
reports the median step time of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from selfalign.config import load_config
from selfalign.data.batches import RegionStore, epoch_batches
from selfalign.data.precomp import load_feature_split
from selfalign.data.text import Vocabulary
from selfalign.losses import hinge_triplet_loss
from selfalign.model.checkpoint import build_model
from selfalign.train.trainer import _rows, build_optimizer

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "src" / "selfalign" / "configs" / "scenes.yaml"


def make_step(cfg, vocab, store, tokens):
    torch.manual_seed(0)
    model = build_model(cfg, vocab)
    model.train()
    optimizer = build_optimizer(model, cfg)

    def step(idx: np.ndarray) -> float:
        start = time.perf_counter()
        regions, mask = store.get(idx // 5)
        image = model.encode_image(regions, mask)
        text = model.encode_text(_rows(tokens, idx))
        loss = hinge_triplet_loss(image.embedding @ text.embedding.T, torch.from_numpy(idx // 5))
        loss = loss + sum(model.align_losses(image, text).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--features", required=True)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    split = load_feature_split(args.features, "train")
    store = RegionStore(split.images, split.region_mask())
    vocab = Vocabulary.build(list(split.captions))
    common = [f"data.features={args.features}", f"train.batch_size={args.batch_size}", *args.overrides]
    base_cfg = load_config(args.config, common + ["align.lca=false", "align.cra=false"])
    sa_cfg = load_config(args.config, common + ["align.lca=true", "align.cra=true"])
    tokens = vocab.encode(list(split.captions), base_cfg.model.max_words)
    steps = {"base": make_step(base_cfg, vocab, store, tokens), "selfalign": make_step(sa_cfg, vocab, store, tokens)}
    batches = epoch_batches(len(split.captions), args.batch_size, 0, 0)
    times: dict[str, list[float]] = {"base": [], "selfalign": []}
    for i in range(args.warmup + args.steps):
        idx = batches[i % len(batches)]
        for name, step in steps.items():
            t = step(idx)
            if i >= args.warmup:
                times[name].append(t)
    result = {name: {"median_s": statistics.median(ts), "mean_s": statistics.fmean(ts)} for name, ts in times.items()}
    result["ratio_median"] = result["selfalign"]["median_s"] / result["base"]["median_s"]
    result.update(batch_size=args.batch_size, steps=args.steps, threads=torch.get_num_threads(),
                  embed_dim=sa_cfg.model.embed_dim, codebook_size=sa_cfg.align.codebook_size,
                  lca_direction=sa_cfg.align.lca_direction, overrides=args.overrides)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
