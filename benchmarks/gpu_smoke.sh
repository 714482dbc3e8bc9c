#!/usr/bin/env bash
# GPU smoke test: a fresh virtualenv, the quick scenes demo on the GPU, then a few hundred training steps with
# train.device=cuda (bf16 autocast, pinned-memory batches), evaluation, and — with 2+ GPUs — the same run under
# torchrun with 2 processes (NCCL).
#
#   bash benchmarks/gpu_smoke.sh [WORKDIR]
#
# Environment: PYTHON (default python3; its torch must have CUDA), STEPS (default 300), REQUIRE_GPU=1 (exit 1 instead
# of 0 when no GPU is present), PIP_ARGS (extra pip arguments, e.g. "--no-index --find-links wheels/" offline).
# The venv sees the system site-packages, so a machine's CUDA build of torch is reused rather than downloaded.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-$(mktemp -d -t selfalign-gpu-XXXX)}"
PYTHON="${PYTHON:-python3}"
STEPS="${STEPS:-300}"
mkdir -p "$WORK"

no_gpu() {
    echo "gpu_smoke: $1 — nothing was run." >&2
    [[ "${REQUIRE_GPU:-0}" == "1" ]] && exit 1
    exit 0
}

command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || no_gpu "no NVIDIA GPU found (nvidia-smi)"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
    || no_gpu "$PYTHON has no CUDA-enabled torch (torch.cuda.is_available() is False)"
nvidia-smi -L

echo "== venv in $WORK/venv"
"$PYTHON" -m venv --system-site-packages "$WORK/venv"
VPY="$WORK/venv/bin/python"
# shellcheck disable=SC2086
"$VPY" -m pip install --quiet ${PIP_ARGS:-} -e "$REPO" || {
    echo "gpu_smoke: pip could not install the dependencies; retrying without them (offline machine)" >&2
    # shellcheck disable=SC2086
    "$VPY" -m pip install --quiet --no-deps --no-build-isolation ${PIP_ARGS:-} -e "$REPO"
}
"$VPY" - <<'EOF'
import torch, selfalign
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
      f"{torch.cuda.get_device_name(0)}; bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF
SA="$WORK/venv/bin/selfalign"
started=$SECONDS

echo "== 1/4 quick demo on the GPU (scenes -> features -> train -> evaluate)"
"$SA" demo --quick --workdir "$WORK/demo" --device cuda

FEATURES="$WORK/demo/features/scenes-quick"
CONFIG="$REPO/src/selfalign/configs/scenes.yaml"
# 60 quick-demo images x 5 captions in batches of 32 = 10 steps per epoch (the last one holds 12 pairs)
EPOCHS=$(( (STEPS + 9) / 10 ))
COMMON=(data.features="$FEATURES" data.image_size=96 out_dir="$WORK/runs" train.device=cuda train.batch_size=32
        train.epochs="$EPOCHS" train.validate_every_epochs=10 align.codebook_size=64 train.checkpoint_every_steps=50)

echo "== 2/4 train $((EPOCHS * 10)) steps with train.device=cuda (bf16 autocast)"
"$SA" train "$CONFIG" "${COMMON[@]}" name=gpu-1 --quiet
"$VPY" - "$WORK/runs/gpu-1" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(f"{sys.argv[1]}/log.csv")))
print(f"epochs {len(rows)}, steps {rows[-1]['step']}, loss {rows[0]['loss_rank']} -> {rows[-1]['loss_rank']}, "
      f"epoch time {rows[-1]['seconds']} s")
EOF

echo "== 3/4 evaluate on the GPU"
"$SA" evaluate "$WORK/runs/gpu-1" --split test --device cuda --json "$WORK/runs/gpu-1/eval_cuda.json"

N_GPU=$("$VPY" -c "import torch; print(torch.cuda.device_count())")
if (( N_GPU >= 2 )); then
    echo "== 4/4 the same training under torchrun, 2 processes (NCCL)"
    "$WORK/venv/bin/torchrun" --standalone --nproc-per-node 2 -m selfalign.cli train "$CONFIG" "${COMMON[@]}" \
        name=gpu-2 --quiet
    "$SA" evaluate "$WORK/runs/gpu-2" --split test --device cuda
else
    echo "== 4/4 skipped: torchrun needs 2 GPUs, this machine has $N_GPU"
fi
echo "gpu_smoke: OK in $((SECONDS - started)) s; everything is under $WORK"
