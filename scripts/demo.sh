#!/usr/bin/env bash
# The main job: install what is needed, then fine-tune SmolLM2 on the demo task.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh all
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/lorakit demo "$@"
