#!/usr/bin/env bash
# The main job: install what is needed, then fine-tune SmolLM2 on the demo task.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh all
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Idle OpenMP threads sleep instead of spinning: on a 2-core machine with anything else running, spinning
# made a training step 3x slower (see docs/demo.md).
export OMP_WAIT_POLICY=PASSIVE
exec .venv/bin/lorakit demo "$@"
