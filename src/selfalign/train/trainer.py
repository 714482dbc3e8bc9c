"""The training loop: VSE++ ranking loss (+ SelfAlign's losses), AdamW, LR schedule, dev validation by rsum,
atomic checkpoints, exact resume, and data parallelism over processes (``torchrun``; see docs/DISTRIBUTED.md).

Every epoch's batches are a pure function of (seed, epoch); with W processes rank r takes rows ``r::W`` of each
global batch, embeddings are all-gathered so negatives span every rank, and the per-rank losses are scaled so that
the gradients summed over ranks equal the one-process gradient on the combined batch. Only rank 0 writes and prints.
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from selfalign import distributed as D
from selfalign.config import RunConfig
from selfalign.data.batches import RegionStore, drop_regions, epoch_batches, view_masks, view_regions
from selfalign.data.precomp import check_finite, load_split_views, mirror_split_name, read_meta
from selfalign.data.text import TokenBatch, Vocabulary, sided_fraction
from selfalign.errors import InputError, SelfAlignError
from selfalign.evaluate.runner import encode_split, score_embeddings
from selfalign.losses import distillation_loss, hinge_triplet_loss
from selfalign.model.checkpoint import WEIGHTS, build_model, save_run_files, save_weights
from selfalign.train.distill import TeacherTargets, check_distill_config, teacher_targets
from selfalign.train.logger import RunLogger
from selfalign.train.state import (STATE, Progress, TrainingDiverged, load_state, require_finite, rng_snapshot,
                                   save_state)

# Flickr8k: 0.4 % of the training captions say left or right; the built-in scenes: 45 %.
MAX_SIDED_SHARE = 0.02

__all__ = ["train", "TrainingDiverged", "step_losses", "prepare_model", "training_batches", "resolve_device"]


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
    """AdamW; a pretrained text transformer trains at ``model.minilm_lr_scale`` × the learning rate, the image
    backbone's top (``model.image_backbone_tail``) at ``model.backbone_lr_scale`` ×."""
    scaled = {"text_encoder.transformer.": cfg.model.minilm_lr_scale, "image_tail.": cfg.model.backbone_lr_scale}
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if not n.startswith(tuple(scaled))], "lr": cfg.train.lr}]
    for prefix, scale in scaled.items():
        params = [p for n, p in named if n.startswith(prefix)]
        if params:
            groups.append({"params": params, "lr": cfg.train.lr * scale})
    return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def build_scheduler(optimizer, cfg: RunConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, cfg.train.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if cfg.train.lr_schedule == "step":
            return 0.1 if step // steps_per_epoch >= cfg.train.lr_decay_epoch else 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def training_batches(n_pairs: int, cfg: RunConfig, epoch: int, world_size: int = 1) -> list[np.ndarray]:
    """The global batches (pair indices) of ``epoch``; a final batch too small to give every rank a row is dropped."""
    batches = [b for b in epoch_batches(n_pairs, cfg.train.batch_size, cfg.train.seed, epoch) if len(b) >= world_size]
    if cfg.train.max_steps_per_epoch > 0:
        batches = batches[: cfg.train.max_steps_per_epoch]
    return batches


def prepare_model(model, world: D.World) -> None:
    """Make ``model`` data-parallel over ``world``: BatchNorm statistics and LCA's Sinkhorn sums span every rank and
    all ranks start from rank 0's weights. Nothing changes for one process."""
    if world.size == 1:
        return
    D.convert_batchnorm(model)
    if model.align is not None and model.align.lca is not None:
        model.align.lca.distributed = True
    D.broadcast_module(model)


@torch.no_grad()
def init_codebook_from_regions(model, store: RegionStore, seed: int, device: torch.device,
                               per_prototype: int = 8, chunk: int = 256) -> None:
    """``align.codebook_init=data``: LCA's prototypes become a random sample of the context-free region locals
    (the space the Sinkhorn codes are computed in) of randomly chosen training images, about ``per_prototype``
    candidate regions per prototype, so the sample spans many images. Deterministic given ``seed``."""
    lca = model.align.lca
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    order = torch.randperm(len(store.mask), generator=generator).numpy()
    wanted, found, feats = per_prototype * lca.codebook.shape[0], 0, []
    was_training = model.training
    model.eval()
    for start in range(0, len(order), chunk):
        regions, mask = store.get(order[start : start + chunk], device)
        encoded = model.encode_image(regions, mask)
        free = encoded.free[encoded.mask]  # the encoder's regions (a backbone-top run adds the whole image)
        feats.append(free.float().cpu())
        found += len(free)
        if found >= wanted:
            break
    model.train(was_training)
    lca.initialize_codebook(torch.cat(feats), generator)


def _rows(tokens: TokenBatch, idx: np.ndarray) -> TokenBatch:
    """Select captions ``idx`` from a pre-tokenised split and trim the padding to the longest one."""
    rows = torch.from_numpy(idx)
    mask = tokens.mask[rows]
    length = max(1, int(mask.sum(1).max())) if len(idx) else 1
    return TokenBatch(tokens.ids[rows, :length], mask[:, :length], [tokens.words[i] for i in idx])


def step_losses(model, cfg: RunConfig, store: RegionStore, tokens: TokenBatch, batch: np.ndarray, rank: int,
                world_size: int, device: torch.device, generator: torch.Generator, hardest: bool,
                use_amp: bool = False, word_weight: torch.Tensor | None = None, mirror: RegionStore | None = None,
                teacher: TeacherTargets | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This rank's share of the loss of the global ``batch`` (pair indices ``[B]``; pair p = caption p of image p//5).

    Returns ``(local, parts)``: ``local`` is what this rank back-propagates — summed over ranks (as gradients are) it
    is the one-process loss of the whole batch; ``parts`` are its pieces (rank, lca, cra), also shares of the total.
    The ranking loss and LCA's Sinkhorn codes are exactly global; CRA's negatives are the rank's own pairs.
    ``word_weight [n_pairs, L]`` (optional, CPU) restricts LCA to some words of every caption (``align.lca_words``).
    ``mirror``: the mirrored copies of the store's images; each pair then takes its image from it with probability 1/2.
    ``teacher``: the teacher's embeddings of the training split; adds ``train.distill_weight`` × the distillation loss
    on the global batch (exactly global, like the ranking loss).
    """
    sizes = D.shard_sizes(len(batch), world_size)
    mine = batch[rank::world_size]
    offset = sum(sizes[:rank])
    gathered_order = np.concatenate([batch[r::world_size] for r in range(world_size)])
    # flips and region dropout are drawn for the whole batch, so any number of ranks sees the same images and masks
    flip = torch.rand(len(batch), generator=generator) < 0.5 if mirror is not None else None
    mask = drop_regions(view_masks(store, mirror, batch // 5, flip), cfg.data.region_dropout, generator)
    mask = mask[rank::world_size].to(device)
    regions = view_regions(store, mirror, mine // 5, flip[rank::world_size] if flip is not None else None, device)
    text_tokens = _rows(tokens, mine).to(device)
    if word_weight is not None:
        word_weight = word_weight[torch.from_numpy(mine), : text_tokens.ids.shape[1]].to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        image = model.encode_image(regions, mask)
        text = model.encode_text(text_tokens)
        aligned = model.align_losses(image, text, word_weight)
    with torch.autocast(device.type, enabled=False):
        sims = model.similarity(image, text, lambda x: D.all_gather_with_grad(x, sizes)).float()  # global batch
        ids = torch.from_numpy(gathered_order // 5).to(device)  # every rank knows the batch: no need to gather ids
        anchors = slice(offset, offset + len(mine))
        parts = {"rank": hinge_triplet_loss(sims, ids, cfg.train.margin, hardest, anchors=anchors)}
        if teacher is not None:
            taught = teacher.similarities(gathered_order).to(device)
            parts["distill"] = cfg.train.distill_weight * distillation_loss(
                sims, taught, cfg.train.distill_temperature, anchors=anchors)
    share = len(mine) / len(batch)  # LCA/CRA are means over pairs: weight each rank's mean by its share of pairs
    parts.update({k: share * v.float() for k, v in aligned.items()})
    return sum(parts.values()), parts


def _diverged(what: str, epoch: int, step: int, state: Progress, run_dir: Path, detail: str = "") -> TrainingDiverged:
    kept = (f"the last good checkpoint in {run_dir} is kept" if (run_dir / STATE).is_file()
            else "no checkpoint had been written yet")
    return TrainingDiverged(f"{what} at epoch {epoch + 1}, step {step + 1} (global step {state.global_step + 1}"
                            f"{detail}); "
                            f"training stopped before updating the weights and {kept}. Lower train.lr or check "
                            f"the features.")


def _lca_word_weight(model, cfg: RunConfig, tokens: TokenBatch) -> torch.Tensor | None:
    """``[n_pairs, L]`` 0/1 weights of the words LCA uses (``align.lca_words``), tagged once; None for all words."""
    if cfg.align.lca_words == "all" or model.align is None or model.align.lca is None:
        return None
    from selfalign.analysis.pos import pos_word_weights  # optional layer (spaCy), imported only when asked for

    return pos_word_weights(tokens.words, cfg.align.lca_words, length=tokens.ids.shape[1])


def _checkpoint(run_dir: Path, model, optimizer, scheduler, state: Progress, world: D.World) -> None:
    require_finite(model, optimizer)  # on every rank (the weights are identical), so all stop together
    rngs = D.gather_objects(rng_snapshot())
    if world.is_main:
        save_state(run_dir, model, optimizer, scheduler, state, rngs)


def train(cfg: RunConfig, resume: bool = False, progress: bool = True, run_dir: Path | None = None,
          stop_after_steps: int = 0) -> Path:
    """Train (or resume) the run ``cfg.out_dir/cfg.name``; return its directory.

    Under ``torchrun`` (or an ``srun`` step) every process calls this and they train one model together.
    ``stop_after_steps`` > 0 ends the process's work after that many optimizer steps (tests use it to simulate a
    crash at a known point).
    """
    run_dir = Path(run_dir or Path(cfg.out_dir) / cfg.name)
    if not resume and (run_dir / STATE).exists():
        raise SelfAlignError(f"{run_dir} already holds a run: resume it with --resume {run_dir}, or choose another "
                             f"name (name=...)")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    world = D.init_distributed(resolve_device(cfg.train.device))
    try:
        return _train(cfg, resume, progress and world.is_main, run_dir, stop_after_steps, world)
    finally:
        D.shutdown(world)


def _warn_if_captions_are_sided(cfg: RunConfig, captions: list[str], is_main: bool) -> None:
    """Flipping an image contradicts a caption that says left or right; warn where many of them do."""
    if not (cfg.data.mirror_train or cfg.data.mirror_test) or not is_main:
        return
    share = sided_fraction(captions)
    if share > MAX_SIDED_SHARE:
        print(f"warning: {cfg.data.features}: {100 * share:.1f}% of the training captions say left or right, which "
              "a mirrored image contradicts (data.mirror_train/test flip images, not words); consider turning "
              "them off", file=sys.stderr)


def _load_data(cfg: RunConfig):
    """The train and dev splits, checked; and their mirrored copies where ``data.mirror_train/test`` ask (or None)."""
    train_split, train_mirror = load_split_views(cfg.data.features, cfg.data.train_split, cfg.data.mirror_train)
    dev_split, dev_mirror = load_split_views(cfg.data.features, cfg.data.dev_split, cfg.data.mirror_test)
    stored_tail = read_meta(cfg.data.features).get("regions") == "tail"
    if stored_tail != cfg.model.image_backbone_tail:
        raise InputError(f"{cfg.data.features}: " + (
            "the store holds the map entering the backbone's top (regions=tail); train it with "
            "model.image_backbone_tail=true model.image_dim=192" if stored_tail else
            "model.image_backbone_tail needs a store of the map entering the backbone's top: selfalign extract "
            "... --regions tail"))
    if train_split.images.shape[-1] != cfg.model.image_dim:
        raise InputError(f"{cfg.data.features}: region features are {train_split.images.shape[-1]}-d but "
                         f"model.image_dim is {cfg.model.image_dim}")
    checked = [(cfg.data.train_split, train_split), (cfg.data.dev_split, dev_split),
               (mirror_split_name(cfg.data.train_split), train_mirror),
               (mirror_split_name(cfg.data.dev_split), dev_mirror)]
    for name, split in ((name, split) for name, split in checked if split is not None):
        try:
            check_finite(split)  # one chunked pass: a NaN feature would otherwise surface as a diverged loss
        except InputError as exc:
            raise InputError(f"{cfg.data.features}, split '{name}': {exc}") from None
    return train_split, dev_split, train_mirror, dev_mirror


def _train(cfg: RunConfig, resume: bool, progress: bool, run_dir: Path, stop_after_steps: int,
           world: D.World) -> Path:
    device = world.device
    seed_everything(cfg.train.seed)
    check_distill_config(cfg)
    train_split, dev_split, train_mirror, dev_mirror = _load_data(cfg)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    vocab = None
    if cfg.model.text_encoder == "bigru":
        vocab = Vocabulary.load(run_dir / "vocab.json") if resume else Vocabulary.build(list(train_split.captions))
    model = build_model(cfg, vocab).to(device)
    store = RegionStore(train_split.images, train_split.region_mask(), pin_memory=device.type == "cuda")
    mirror = None
    if train_mirror is not None:
        mirror = RegionStore(train_mirror.images, train_mirror.region_mask(), pin_memory=device.type == "cuda")
    _warn_if_captions_are_sided(cfg, train_split.captions, world.is_main)
    if not resume and cfg.align.codebook_init == "data" and model.align is not None and model.align.lca is not None:
        init_codebook_from_regions(model, store, cfg.train.seed, device)
    prepare_model(model, world)  # after the codebook init: every rank starts from rank 0's codebook
    if world.is_main:  # a resumed run saves its config again: --resume may have changed how it executes
        save_run_files(run_dir, cfg, None if resume else vocab)
    teacher = teacher_targets(cfg, train_split, train_mirror, run_dir, device, world.is_main, resume, progress)
    all_tokens = model.tokenize(list(train_split.captions))
    n_pairs = len(train_split.captions)
    word_weight = _lca_word_weight(model, cfg, all_tokens)
    steps_per_epoch = len(training_batches(n_pairs, cfg, 0, world.size))
    if steps_per_epoch == 0:
        raise InputError(f"{cfg.data.features}: {n_pairs} training pairs make no batch of at least {world.size}")
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    state = Progress()
    if resume:
        state = load_state(run_dir, model, optimizer, scheduler, device, world.rank, world.size)
    elif world.size > 1:
        torch.manual_seed(cfg.train.seed * 1_000_003 + world.rank)  # dropout: a different stream per rank
    logger = RunLogger(run_dir) if world.is_main else None
    use_amp = cfg.train.amp and device.type == "cuda"
    generator = torch.Generator()
    steps_this_process = 0
    try:
        while state.epoch < cfg.train.epochs:
            epoch = state.epoch
            hardest = epoch >= cfg.train.warmup_epochs
            if model.align is not None and model.align.lca is not None:
                model.align.lca.freeze_codebook(epoch < cfg.align.freeze_codebook_epochs)
            batches = training_batches(n_pairs, cfg, epoch, world.size)
            model.train()
            sums = state.epoch_sums
            started = time.perf_counter()
            bar = tqdm(total=len(batches), initial=state.step_in_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                       disable=not progress, dynamic_ncols=True, leave=False, mininterval=1.0)
            first_step = state.step_in_epoch
            for step in range(first_step, len(batches)):
                generator.manual_seed(cfg.train.seed * 1_000_003 + state.global_step)
                local, parts = step_losses(model, cfg, store, all_tokens, batches[step], world.rank, world.size,
                                           device, generator, hardest, use_amp, word_weight, mirror, teacher)
                totals = D.all_reduce_sum(torch.stack([v.detach() for v in parts.values()])).tolist()
                losses = dict(zip(parts, totals))
                loss = sum(totals)
                if not math.isfinite(loss):
                    raise _diverged(f"the loss became {loss}", epoch, step, state, run_dir,
                                    f"; parts: { {k: round(v, 4) for k, v in losses.items()} }")
                optimizer.zero_grad(set_to_none=True)
                local.backward()
                if model.align is not None:
                    model.align.drop_frozen_grad()
                D.all_reduce_grads(model.parameters())
                clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
                norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
                if not math.isfinite(norm):
                    raise _diverged(f"the gradient norm became {norm}", epoch, step, state, run_dir)
                optimizer.step()
                scheduler.step()
                state.step_in_epoch, state.global_step = step + 1, state.global_step + 1
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v
                pairs_per_s = (step + 1 - first_step) * len(batches[step]) / max(1e-9, time.perf_counter() - started)
                bar.set_postfix(loss=f"{loss:.3f}", pairs_s=f"{pairs_per_s:.0f}")
                bar.update(1)
                steps_this_process += 1
                every = cfg.train.checkpoint_every_steps
                if every > 0 and state.global_step % every == 0 and state.step_in_epoch < len(batches):
                    _checkpoint(run_dir, model, optimizer, scheduler, state, world)
                if stop_after_steps and steps_this_process >= stop_after_steps:
                    return run_dir
            bar.close()
            row = {"epoch": epoch + 1, "step": state.global_step, "lr": scheduler.get_last_lr()[0],
                   "hardest_negative": int(hardest), "seconds": round(time.perf_counter() - started, 2)}
            done = max(1, len(batches))
            row.update({f"loss_{k}": round(v / done, 5) for k, v in sums.items()})
            if (epoch + 1) % cfg.train.validate_every_epochs == 0 or epoch + 1 == cfg.train.epochs:
                if world.is_main:  # the others wait at the barrier
                    metrics = score_embeddings(encode_split(model, dev_split, cfg.data.dev_max_images,
                                                            mirror=dev_mirror))
                    row.update({f"dev_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
                    if metrics["rsum"] > state.best_rsum:
                        state.best_rsum = metrics["rsum"]
                        require_finite(model)
                        save_weights(model, run_dir / WEIGHTS)
                    if progress:
                        print(f"epoch {epoch + 1}: loss {sum(sums.values()) / done:.4f}  dev rsum "
                              f"{metrics['rsum']:.1f}  (best {state.best_rsum:.1f})  {row['seconds']:.0f}s", flush=True)
                D.barrier()
            if logger is not None:
                logger.log_epoch(row)
            state.epoch, state.step_in_epoch, state.epoch_sums = epoch + 1, 0, {}
            _checkpoint(run_dir, model, optimizer, scheduler, state, world)
        if world.is_main and not (run_dir / WEIGHTS).exists():
            require_finite(model)
            save_weights(model, run_dir / WEIGHTS)
    finally:
        if logger is not None:
            logger.close()
    return run_dir
