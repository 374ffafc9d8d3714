#!/usr/bin/env bash
# The whole test suite (lint included): install what is needed, then run it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh all,test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check .
# Two single-threaded pytest workers fill the two cores; more threads per worker only contend.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
exec .venv/bin/python -m pytest -n 2 -q "$@"
