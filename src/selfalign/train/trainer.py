"""The training loop: VSE++ ranking loss (+ SelfAlign's losses), AdamW, LR schedule, dev validation by rsum,
atomic checkpoints and exact resume."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from selfalign.config import RunConfig
from selfalign.data.batches import RegionStore, drop_regions, epoch_batches
from selfalign.data.precomp import load_feature_split
from selfalign.data.text import TokenBatch, Vocabulary
from selfalign.errors import InputError, SelfAlignError
from selfalign.evaluate.runner import encode_split, score_embeddings
from selfalign.losses import hinge_triplet_loss
from selfalign.model.checkpoint import WEIGHTS, build_model, save_run_files, save_weights
from selfalign.train.logger import RunLogger
from selfalign.train.state import STATE, Progress, load_state, save_state


class TrainingDiverged(SelfAlignError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SelfAlignError("train.device=cuda but no CUDA device is available (use train.device=auto or cpu)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW; a pretrained text transformer trains at ``model.minilm_lr_scale`` × the learning rate."""
    pretrained = [p for n, p in model.named_parameters() if n.startswith("text_encoder.transformer.")]
    ids = {id(p) for p in pretrained}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "lr": cfg.train.lr}]
    if pretrained:
        groups.append({"params": pretrained, "lr": cfg.train.lr * cfg.model.minilm_lr_scale})
    return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def build_scheduler(optimizer, cfg: RunConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, cfg.train.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if cfg.train.lr_schedule == "step":
            return 0.1 if step // steps_per_epoch >= cfg.train.lr_decay_epoch else 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _rows(tokens: TokenBatch, idx: np.ndarray) -> TokenBatch:
    """Select captions ``idx`` from a pre-tokenised split and trim the padding to the longest one."""
    rows = torch.from_numpy(idx)
    mask = tokens.mask[rows]
    length = max(1, int(mask.sum(1).max()))
    return TokenBatch(tokens.ids[rows, :length], mask[:, :length], [tokens.words[i] for i in idx])


def train(cfg: RunConfig, resume: bool = False, progress: bool = True, run_dir: Path | None = None,
          stop_after_steps: int = 0) -> Path:
    """Train (or resume) the run ``cfg.out_dir/cfg.name``; return its directory.

    ``stop_after_steps`` > 0 ends the process's work after that many optimizer steps (tests use it to simulate a
    crash at a known point).
    """
    run_dir = Path(run_dir or Path(cfg.out_dir) / cfg.name)
    if not resume and (run_dir / STATE).exists():
        raise SelfAlignError(f"{run_dir} already holds a run: resume it with --resume {run_dir}, or choose another "
                             f"name (name=...)")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    train_split = load_feature_split(cfg.data.features, cfg.data.train_split)
    dev_split = load_feature_split(cfg.data.features, cfg.data.dev_split)
    if train_split.images.shape[-1] != cfg.model.image_dim:
        raise InputError(f"{cfg.data.features}: region features are {train_split.images.shape[-1]}-d but "
                         f"model.image_dim is {cfg.model.image_dim}")
    run_dir.mkdir(parents=True, exist_ok=True)
    vocab = None
    if cfg.model.text_encoder == "bigru":
        vocab = Vocabulary.load(run_dir / "vocab.json") if resume else Vocabulary.build(list(train_split.captions))
    model = build_model(cfg, vocab).to(device)
    if not resume:
        save_run_files(run_dir, cfg, vocab)
    store = RegionStore(train_split.images, train_split.region_mask(), pin_memory=device.type == "cuda")
    captions = list(train_split.captions)
    all_tokens = model.tokenize(captions)
    n_pairs = len(captions)
    steps_per_epoch = len(epoch_batches(n_pairs, cfg.train.batch_size, cfg.train.seed, 0))
    if cfg.train.max_steps_per_epoch > 0:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    state = Progress()
    if resume:
        state = load_state(run_dir, model, optimizer, scheduler, device)
    logger = RunLogger(run_dir)
    use_amp = cfg.train.amp and device.type == "cuda"
    generator = torch.Generator()
    steps_this_process = 0
    try:
        while state.epoch < cfg.train.epochs:
            epoch = state.epoch
            hardest = epoch >= cfg.train.warmup_epochs
            if model.align is not None and model.align.lca is not None:
                model.align.lca.freeze_codebook(epoch < cfg.align.freeze_codebook_epochs)
            batches = epoch_batches(n_pairs, cfg.train.batch_size, cfg.train.seed, epoch)[:steps_per_epoch]
            model.train()
            sums: dict[str, float] = {}
            started = time.perf_counter()
            bar = tqdm(total=len(batches), initial=state.step_in_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                       disable=not progress, dynamic_ncols=True, leave=False, mininterval=1.0)
            first_step = state.step_in_epoch
            for step in range(first_step, len(batches)):
                idx = batches[step]
                image_idx = idx // 5
                generator.manual_seed(cfg.train.seed * 1_000_003 + state.global_step)
                regions, mask = store.get(image_idx, device)
                mask = drop_regions(mask, cfg.data.region_dropout, generator)
                tokens = _rows(all_tokens, idx).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    image = model.encode_image(regions, mask)
                    text = model.encode_text(tokens)
                    sims = image.embedding.float() @ text.embedding.float().T
                    losses = {"rank": hinge_triplet_loss(sims, torch.from_numpy(image_idx).to(device),
                                                         cfg.train.margin, hardest)}
                    losses.update(model.align_losses(image, text))
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} (global step "
                        f"{state.global_step + 1}); parts: { {k: round(v.item(), 4) for k, v in losses.items()} }. "
                        f"The last good checkpoint in {run_dir} is kept; lower train.lr or check the features.")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.train.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
                scheduler.step()
                state.step_in_epoch, state.global_step = step + 1, state.global_step + 1
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.item()
                pairs_per_s = (step + 1 - first_step) * len(idx) / max(1e-9, time.perf_counter() - started)
                bar.set_postfix(loss=f"{loss.item():.3f}", pairs_s=f"{pairs_per_s:.0f}")
                bar.update(1)
                steps_this_process += 1
                every = cfg.train.checkpoint_every_steps
                if every > 0 and state.global_step % every == 0 and state.step_in_epoch < len(batches):
                    save_state(run_dir, model, optimizer, scheduler, state)
                if stop_after_steps and steps_this_process >= stop_after_steps:
                    return run_dir
            bar.close()
            row = {"epoch": epoch + 1, "step": state.global_step, "lr": scheduler.get_last_lr()[0],
                   "hardest_negative": int(hardest), "seconds": round(time.perf_counter() - started, 2)}
            done = max(1, len(batches))
            row.update({f"loss_{k}": round(v / done, 5) for k, v in sums.items()})
            if (epoch + 1) % cfg.train.validate_every_epochs == 0 or epoch + 1 == cfg.train.epochs:
                metrics = score_embeddings(encode_split(model, dev_split, cfg.data.dev_max_images))
                row.update({f"dev_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
                if metrics["rsum"] > state.best_rsum:
                    state.best_rsum = metrics["rsum"]
                    save_weights(model, run_dir / WEIGHTS)
                if progress:
                    print(f"epoch {epoch + 1}: loss {sum(sums.values()) / done:.4f}  dev rsum {metrics['rsum']:.1f}"
                          f"  (best {state.best_rsum:.1f})  {row['seconds']:.0f}s", flush=True)
            logger.log_epoch(row)
            state.epoch, state.step_in_epoch = epoch + 1, 0
            save_state(run_dir, model, optimizer, scheduler, state)
        if not (run_dir / WEIGHTS).exists():
            save_weights(model, run_dir / WEIGHTS)
    finally:
        logger.close()
    return run_dir
