"""Data parallelism: 2 gloo processes on CPU compute what 1 process computes on the combined batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import make_feature_store, tiny_overrides
from selfalign import distributed as D
from selfalign.config import load_config
from selfalign.data.batches import RegionStore, epoch_batches
from selfalign.data.precomp import load_feature_split
from selfalign.data.text import Vocabulary
from selfalign.errors import ConfigError
from selfalign.losses import hinge_triplet_loss
from selfalign.model.checkpoint import build_model
from selfalign.train import train
from selfalign.train.distill import TeacherTargets
from selfalign.train.trainer import prepare_model, seed_everything, step_losses

BATCH = 21  # odd: the two ranks get 11 and 10 pairs
EXACT = ["model.dropout=0", "data.region_dropout=0.3"]  # module dropout draws per-process noise: off for equality
CASES = {  # name -> overrides; every case here must match one process
    "plain": ["align.lca=false", "align.cra=false"],
    "lca": ["align.lca=true", "align.cra=false"],
    "lca+cra_heads": ["align.lca=true", "align.cra=true", "align.cra_weight=0"],
    "distill": ["align.lca=false", "align.cra=false", "train.distill_temperature=0.1"],  # a made-up teacher
}
E2E = EXACT + ["align.cra_weight=0", "train.max_steps_per_epoch=3", "train.checkpoint_every_steps=2",
               "train.warmup_epochs=1"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(features: Path, tmp: Path, overrides: list[str], rank: int, size: int, hardest: bool):
    """Loss parts and summed gradients of one training step on a fixed global batch."""
    cfg = load_config(None, tiny_overrides(features, tmp, "x") + EXACT + overrides)
    seed_everything(0)
    split = load_feature_split(features, "train")
    model = build_model(cfg, Vocabulary.build(list(split.captions)))
    prepare_model(model, D.World(rank, rank, size, torch.device("cpu")))
    model.train()
    store = RegionStore(split.images, split.region_mask())
    batch = epoch_batches(len(split.captions), BATCH, 0, 0)[0]
    teacher = None
    if "train.distill_temperature=0.1" in overrides:
        made_up = torch.Generator().manual_seed(3)
        teacher = TeacherTargets(torch.nn.functional.normalize(torch.randn(len(split.image_ids), 8, generator=made_up)),
                                 torch.nn.functional.normalize(torch.randn(len(split.captions), 8, generator=made_up)))
    local, parts = step_losses(model, cfg, store, model.tokenize(list(split.captions)), batch, rank, size,
                               torch.device("cpu"), torch.Generator().manual_seed(7), hardest, teacher=teacher)
    local.backward()
    D.all_reduce_grads(model.parameters())
    totals = D.all_reduce_sum(torch.stack([v.detach() for v in parts.values()]))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return dict(zip(parts, totals.tolist())), grads


def _worker(rank: int, size: int, port: int, features: Path, tmp: Path) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    sys.stdout = open(tmp / f"stdout{rank}.txt", "w")  # only rank 0 may print
    world = D.init_distributed("cpu")
    try:
        steps = {(name, hardest): _step(features, tmp, over, rank, size, hardest)
                 for name, over in CASES.items() for hardest in (False, True)}
        if rank == 0:
            torch.save(steps, tmp / "steps.pt")
        base = tiny_overrides(features, tmp / "runs2") + E2E
        train(load_config(None, base + ["name=full"]), progress=True)
        cut = load_config(None, base + ["name=cut"])
        train(cut, progress=True, stop_after_steps=5)  # checkpoint at global step 4 (mid epoch 2), then "crash"
        train(cut, resume=True, run_dir=tmp / "runs2" / "cut", progress=True)
    finally:
        sys.stdout.flush()
        D.shutdown(world)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    features = make_feature_store(tmp / "features")
    mp.spawn(_worker, args=(2, _port(), features, tmp), nprocs=2, join=True)
    return tmp, features


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_one_on_the_combined_batch(two_process_run, name):
    tmp, features = two_process_run
    steps = torch.load(tmp / "steps.pt", weights_only=False)
    for hardest in (False, True):
        parts2, grads2 = steps[(name, hardest)]
        parts1, grads1 = _step(features, tmp, CASES[name], 0, 1, hardest)
        assert parts1.keys() == parts2.keys()
        for k in parts1:
            assert parts2[k] == pytest.approx(parts1[k], rel=1e-5, abs=1e-6), (name, hardest, k)
        scale = max(float(g.abs().max()) for g in grads1.values())
        diff = _max_diff(grads1, grads2)
        print(f"{name} hardest={hardest}: loss {parts1} vs {parts2}; max |grad diff| {diff:.2e} (max |grad| "
              f"{scale:.2e})")
        # float32 noise; the largest is on the CRA heads' ctx_fc.bias, whose exact gradient is 0 (a bias before BN)
        assert diff <= 3e-5 * scale, (name, hardest, diff)


def test_two_process_training_matches_one_process(two_process_run, tmp_path):
    tmp, features = two_process_run
    run1 = train(load_config(None, tiny_overrides(features, tmp_path) + E2E + ["name=one"]), progress=False)
    w1 = load_file(str(run1 / "last.safetensors"))
    w2 = load_file(str(tmp / "runs2" / "full" / "last.safetensors"))
    # Biases feeding a BatchNorm (and attention key biases) have an exactly zero gradient; Adam turns the float32
    # noise there into steps of about lr, and the running means follow them. Everything else must agree closely.
    gauge = ("ctx_fc.bias", "mlp.0.bias", "in_proj_bias", "running_mean")
    diffs = {k: float((w1[k].double() - w2[k].double()).abs().max()) for k in w1}
    free = max(v for k, v in diffs.items() if not k.endswith(gauge))
    print(f"2-process vs 1-process weights after 6 steps: max |diff| {free:.2e} "
          f"(zero-gradient biases: {max(diffs.values()):.2e})")
    assert w1.keys() == w2.keys() and free < 1e-5 and max(diffs.values()) < 6 * 5e-4  # 6 steps at lr 5e-4
    assert (tmp / "stdout1.txt").read_text() == ""  # rank 1 printed nothing
    assert "dev rsum" in (tmp / "stdout0.txt").read_text()


def test_two_process_resume_is_exact(two_process_run):
    tmp, _ = two_process_run
    full = load_file(str(tmp / "runs2" / "full" / "last.safetensors"))
    cut = load_file(str(tmp / "runs2" / "cut" / "last.safetensors"))
    assert full.keys() == cut.keys()
    assert all(torch.equal(full[k], cut[k]) for k in full)
    state = torch.load(tmp / "runs2" / "cut" / "train_state.pt", weights_only=True)
    assert len(state["rng"]) == 2  # each rank's RNG is kept


def test_hinge_loss_shares_add_up_to_the_full_loss():
    torch.manual_seed(0)
    sims = torch.randn(9, 9, requires_grad=True)
    ids = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4, 4])
    for hardest in (False, True):
        full = hinge_triplet_loss(sims, ids, 0.2, hardest)
        parts = [hinge_triplet_loss(sims, ids, 0.2, hardest, anchors=s) for s in (slice(0, 5), slice(5, 9))]
        assert torch.allclose(sum(parts), full)


def test_world_info_from_env():
    assert not D.world_info_from_env({}).distributed
    info = D.world_info_from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node0",
                                  "MASTER_PORT": "1234"})
    assert (info.rank, info.local_rank, info.world_size, info.master_addr, info.master_port, info.source) == \
        (3, 1, 4, "node0", 1234, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8",
             "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.1"}
    info = D.world_info_from_env(slurm)
    assert (info.rank, info.local_rank, info.world_size, info.master_addr, info.source) == (5, 1, 8, "10.0.0.1",
                                                                                          "slurm")
    # an sbatch script (no srun step) stays one process; SELFALIGN_DISTRIBUTED=0 opts out
    assert not D.world_info_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}).distributed
    assert not D.world_info_from_env({**slurm, "SELFALIGN_DISTRIBUTED": "0"}).distributed
    with pytest.raises(ConfigError, match="RANK='x'"):
        D.world_info_from_env({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})
    with pytest.raises(ConfigError, match="does not fit"):
        D.world_info_from_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})


def test_single_process_helpers_are_identities():
    x = torch.randn(4, 3, requires_grad=True)
    assert D.all_gather_with_grad(x) is x and D.all_reduce_with_grad(x) is x
    assert D.shard_sizes(21, 2) == [11, 10] and D.shard_sizes(3, 4) == [1, 1, 1, 0]
    bn = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    ref = torch.nn.BatchNorm1d(3)
    D.convert_batchnorm(bn)
    assert isinstance(bn[0], D.GlobalBatchNorm) and bn.state_dict().keys() == {f"0.{k}" for k in ref.state_dict()}
    assert torch.allclose(bn(x), ref(x))
    world = D.init_distributed("cpu", D.WorldInfo())
    assert world.size == 1 and not world.owner


@pytest.mark.slow
def test_cli_under_torchrun(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    features = make_feature_store(tmp_path / "features", n_train=24, n_dev=8, n_test=8)
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: 1\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(_port()),
         "-m", "selfalign.cli", "train", str(config), *tiny_overrides(features, tmp_path, "tr"), "train.epochs=1",
         "data.dev_max_images=8", "--quiet"],
        capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("run directory:") == 1  # printed by rank 0 only
    assert (tmp_path / "tr" / "model.safetensors").is_file() and (tmp_path / "tr" / "train_state.pt").is_file()
