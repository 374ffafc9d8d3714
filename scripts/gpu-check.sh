#!/usr/bin/env bash
# The CUDA paths, proven on a GPU (benchmarks/gpu_check.py): training steps against peft (LoRA, DoRA,
# QLoRA/bitsandbytes, bf16 and fp16 autocast), fused loss and lean activations, the mixed-adapter serving
# engine, NCCL DDP with 2+ GPUs. Writes benchmarks/results/gpu.{md,json}; under 8 minutes on one H200.
# Without a CUDA device it says so and exits 0. Extra arguments go to benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: skipped (scripts/gpu-check.sh needs an NVIDIA GPU; nothing was measured)"
    exit 0
fi
exec timeout 900 "$python" benchmarks/gpu_check.py "$@"
