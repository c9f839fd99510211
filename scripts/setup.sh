#!/usr/bin/env bash
# Create .venv and install forkrl with its test tools. torch is pinned by constraints.txt so a CPU
# machine gets the CPU build and never downloads CUDA wheels. On a GPU machine see README "On a GPU".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
