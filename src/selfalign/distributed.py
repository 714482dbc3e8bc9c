"""Data-parallel training across processes (``torchrun``, SLURM ``srun``): world discovery, process group, and the
collectives the trainer needs, each written so that W processes compute exactly what one process computes on the
combined batch.

* ``all_gather_with_grad`` — rows of every rank, differentiable: the backward pass sums the gradient of every rank's
  loss, so each rank's loss must be its share of one global loss (a sum over ranks).
* ``GlobalBatchNorm`` — BatchNorm whose batch statistics span all ranks (torch's SyncBatchNorm is CUDA-only).
* ``all_reduce_grads`` — gradients summed over ranks (a manual, deterministic alternative to DDP: the losses are
  already scaled so that the sum is the one-process gradient).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from selfalign.errors import ConfigError

DEFAULT_PORT = 29500
_BUCKET = 1 << 24  # gradient elements per all-reduce


@dataclass(frozen=True)
class WorldInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node; ``source``: the launcher."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    source: str = "single"  # "torchrun", "slurm" or "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class World:
    """The initialised world of a training run: this process's rank, the world size and its device."""

    rank: int
    local_rank: int
    size: int
    device: torch.device
    owner: bool = False  # True when init_distributed created the process group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_var(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None:
        if default is None:
            raise ConfigError(f"environment variable {name} is required for distributed training")
        return default
    try:
        return int(raw.strip().split("(")[0])  # SLURM writes e.g. '4(x2)' for some task counts
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def world_info_from_env(env: Mapping[str, str] | None = None) -> WorldInfo:
    """Read the launcher's variables: torchrun (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) or a SLURM ``srun``
    step (SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS). Anything else is one process.

    ``SELFALIGN_DISTRIBUTED=0`` forces one process. A plain ``python`` inside an sbatch script is not a step (no
    SLURM_STEP_NUM_TASKS), so it stays single-process instead of waiting for peers that never start.
    """
    env = os.environ if env is None else env
    if env.get("SELFALIGN_DISTRIBUTED", "1") == "0":
        return WorldInfo()
    if "RANK" in env and "WORLD_SIZE" in env:
        info = WorldInfo(_int_var(env, "RANK"), _int_var(env, "LOCAL_RANK", 0), _int_var(env, "WORLD_SIZE"),
                         env.get("MASTER_ADDR"), _int_var(env, "MASTER_PORT", DEFAULT_PORT), "torchrun")
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        addr = env.get("MASTER_ADDR") or env.get("SLURM_LAUNCH_NODE_IPADDR")
        info = WorldInfo(_int_var(env, "SLURM_PROCID"), _int_var(env, "SLURM_LOCALID", 0),
                         _int_var(env, "SLURM_STEP_NUM_TASKS"), addr, _int_var(env, "MASTER_PORT", DEFAULT_PORT),
                         "slurm")
    else:
        return WorldInfo()
    if info.world_size < 1 or not 0 <= info.rank < info.world_size or info.local_rank < 0:
        raise ConfigError(f"{info.source}: rank {info.rank} / local rank {info.local_rank} does not fit a world of "
                          f"{info.world_size} processes")
    if info.distributed and not info.master_addr:
        raise ConfigError(f"{info.source}: set MASTER_ADDR to the host of rank 0 (e.g. the first node of the job)")
    return info


def init_distributed(device: torch.device | str, info: WorldInfo | None = None, timeout_s: float = 1800.0) -> World:
    """Join the process group described by ``info`` (default: the environment): gloo on CPU, nccl on CUDA.

    With CUDA each process uses ``cuda:LOCAL_RANK``. One process (or an already initialised group) needs no set-up.
    """
    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
        env = world_info_from_env()
        local = env.local_rank if env.distributed else rank
        return World(rank, local, size, _local_device(device, local, size, env.source), owner=False)
    info = world_info_from_env() if info is None else info
    if not info.distributed:
        return World(0, 0, 1, device, owner=False)
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed support")
    device = _local_device(device, info.local_rank, info.world_size, info.source)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{info.master_addr}:{info.master_port}", rank=info.rank,
                            world_size=info.world_size, timeout=datetime.timedelta(seconds=timeout_s))
    return World(info.rank, info.local_rank, info.world_size, device, owner=True)


def _local_device(device: torch.device, local_rank: int, size: int, source: str = "torchrun") -> torch.device:
    """``cuda:LOCAL_RANK``; under SLURM with one visible GPU per task (``--gpus-per-task 1``) that GPU."""
    if device.type != "cuda" or size == 1:
        return device
    count = torch.cuda.device_count()
    index = 0 if source == "slurm" and count == 1 else local_rank
    if index >= count:
        raise ConfigError(f"local rank {local_rank} has no GPU: this process sees {count} (start at most that many "
                          f"processes per node)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def shutdown(world: World) -> None:
    """Destroy the process group if ``init_distributed`` created it."""
    if world.owner and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def shard_sizes(n: int, world_size: int) -> list[int]:
    """Rows each rank takes of a global batch of ``n`` when rank r takes rows ``r::world_size``."""
    return [len(range(r, n, world_size)) for r in range(world_size)]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        rank = dist.get_rank()
        ctx.sizes, ctx.rank = sizes, rank
        padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss reaches these rows: sum their gradients
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate the rows of every rank: ``x [n_r, ...]`` -> ``[sum_r n_r, ...]`` (rank 0's rows first).

    ``sizes`` (every rank's ``n_r``) saves one collective when known. The gradient of a row is the sum over ranks of
    the gradients of their losses. Without a process group this returns ``x``.
    """
    if not active():
        return x
    if sizes is None:
        mine = torch.tensor([x.shape[0]], device=x.device)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        sizes = [int(s) for s in every]
    if sizes[dist.get_rank()] != x.shape[0]:
        raise ValueError(f"all_gather_with_grad: this rank has {x.shape[0]} rows but sizes says {sizes}")
    return _GatherRows.apply(x.contiguous(), tuple(int(s) for s in sizes))


class _SumRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over ranks, differentiably (the identity without a process group)."""
    return _SumRanks.apply(x) if active() else x


class GlobalBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training statistics cover the batch of every rank (same parameters and buffers).

    In eval mode, or without a process group, it is plain BatchNorm. Sums are taken in float64, so the one-pass
    variance is as accurate as torch's own; ranks with no rows still take part in the collective.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        xd = x.double()
        count = torch.tensor([float(x.numel() // max(1, x.shape[1]))], dtype=torch.float64, device=x.device)
        stats = all_reduce_with_grad(torch.cat([xd.sum(dims), (xd * xd).sum(dims), count]))
        c = x.shape[1]
        n = stats[-1].detach().clamp_min(1)  # kept on the device: no host sync inside the forward pass
        mean = stats[:c] / n
        var = (stats[c: 2 * c] / n - mean * mean).clamp_min(0)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xd - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every ``BatchNorm1d`` of ``module`` into a ``GlobalBatchNorm`` in place (state dict keys unchanged)."""
    for m in module.modules():
        if type(m) is nn.BatchNorm1d:
            m.__class__ = GlobalBatchNorm
    return module


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if not active():
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


@torch.no_grad()
def all_reduce_grads(parameters) -> None:
    """Sum ``.grad`` over ranks. A parameter with no gradient on any rank keeps ``None`` (optimizers skip it)."""
    if not active():
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist()) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    start = 0
    while start < len(live):  # buckets of one dtype and at most _BUCKET elements
        bucket, size = [live[start]], live[start].numel()
        start += 1
        while start < len(live) and live[start].dtype == bucket[0].dtype and size + live[start].numel() <= _BUCKET:
            bucket.append(live[start])
            size += live[start].numel()
            start += 1
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset: offset + p.numel()].view_as(p.grad))
            offset += p.numel()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (no gradient); ``x`` itself without a process group."""
    if not active():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
