"""``selfalign demo``: scenes -> features -> training -> evaluation -> example queries, under one work folder."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from selfalign.config import load_config
from selfalign.data.precomp import load_feature_split
from selfalign.evaluate.metrics import format_table
from selfalign.evaluate.runner import encode_captions, encode_images
from selfalign.data.batches import RegionStore

DEMO_QUERIES = (
    "a red circle to the left of a blue square",
    "two green triangles",
    "a big yellow star above a small purple circle",
)


def demo_config(workdir: Path, quick: bool, device: str):
    config = Path(__file__).parent / "configs" / "scenes.yaml"
    overrides = [f"out_dir={workdir / 'runs'}", f"data.root={workdir / 'data' / 'scenes'}",
                 f"data.features={workdir / 'features' / 'scenes'}", f"train.device={device}"]
    if quick:
        overrides += [f"data.root={workdir / 'data' / 'scenes-quick'}",
                      f"data.features={workdir / 'features' / 'scenes-quick'}", "data.image_size=96",
                      "train.epochs=2", "train.batch_size=32", "name=scenes-quick", "align.codebook_size=64"]
    return load_config(config, overrides)


def run_demo(workdir: Path, quick: bool = False, device: str = "auto") -> dict:
    from selfalign.data.scenes import generate_scenes
    from selfalign.pipeline import evaluate_run, extract_features
    from selfalign.train import train

    started = time.perf_counter()
    cfg = demo_config(workdir, quick, device)
    sizes = (60, 10, 10) if quick else (4000, 500, 500)
    print(f"[1/5] scenes dataset ({sizes[0]}/{sizes[1]}/{sizes[2]} images) -> {cfg.data.root}", flush=True)
    generate_scenes(Path(cfg.data.root), *sizes, seed=0, image_size=cfg.data.image_size)
    print(f"[2/5] region features ({cfg.data.regions}) -> {cfg.data.features}", flush=True)
    for split in ("train", "dev", "test"):
        extract_features("scenes", cfg.data.root, cfg.data.features, split, cfg.data.regions,
                         image_size=cfg.data.image_size, device=device)
    run_dir = Path(cfg.out_dir) / cfg.name
    print(f"[3/5] training -> {run_dir}", flush=True)
    from selfalign.train.state import STATE

    resume = (run_dir / STATE).exists()
    train(cfg, resume=resume, run_dir=run_dir)
    print("[4/5] evaluation on the test split", flush=True)
    metrics = evaluate_run(run_dir, "test", device=device)
    print(format_table(metrics))
    print("[5/5] text -> image queries on the test split", flush=True)
    show_queries(run_dir, cfg.data.features, device)
    from selfalign.index.gallery_build import build_demo_index

    serve_command = build_demo_index(run_dir, cfg.data.root, workdir / "indexes" / cfg.name, device=device)
    print(f"an index of the test images is ready; browse it with:\n  {serve_command}")
    print(f"done in {time.perf_counter() - started:.0f} s; everything is under {workdir}")
    return metrics


def show_queries(run_dir: Path, features: str, device: str, k: int = 5) -> None:
    from selfalign.model.checkpoint import load_model
    from selfalign.train.trainer import resolve_device

    model, _ = load_model(run_dir, resolve_device(device))
    split = load_feature_split(features, "test")
    images = encode_images(model, RegionStore(split.images, split.region_mask()))
    queries = list(DEMO_QUERIES) + [split.captions[5 * i] for i in (0, 7)]
    scores = encode_captions(model, queries) @ images.T
    for query, row in zip(queries, scores):
        top = torch.topk(row, k)
        shown = ", ".join(f"{split.image_ids[i]} ({s:.2f})" for s, i in zip(top.values.tolist(), top.indices.tolist()))
        print(f"  {query!r}\n    -> {shown}")
