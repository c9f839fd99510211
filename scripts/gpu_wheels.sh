#!/usr/bin/env bash
# Make the wheels scripts/gpu_check.sh installs on a GPU machine that has no package registry, here (with one):
#
#   PYVER=3.11 bash scripts/gpu_wheels.sh [DIR]      # DIR: default wheels/; PYVER: the GPU machine's Python
#
# Only what an image with torch, transformers and peft may lack: pydantic and pytest, with their dependencies, at
# the versions this checkout's .venv runs (else the newest). WITH_TRL=1 adds trl for grpo_step's comparison (with
# datasets and pyarrow, tens of MB). Every wheel is a binary for manylinux x86_64 or pure Python.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-wheels}
PYVER=${PYVER:-$(python3 -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')}
PIP=python3
[ -x .venv/bin/python ] && PIP=.venv/bin/python
pin() { "$PIP" -c "import importlib.metadata as m; print('$1==' + m.version('$1'))" 2>/dev/null || echo "$1"; }
PKGS=("$(pin pydantic)" "$(pin pytest)")
[ "${WITH_TRL:-0}" = 1 ] && PKGS+=("trl==1.16.0")
mkdir -p "$DIR"
"$PIP" -m pip download -q --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DIR" "${PKGS[@]}"
du -sh "$DIR"
ls "$DIR"
