#!/usr/bin/env bash
# Creates .venv if missing and installs what Numerics needs, skipping what is already there.
# Order matters: torch first (a range would pull CUDA wheels), DeepSpeed without build
# isolation (its build would pull a CUDA torch), then the package itself.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
DEEPSPEED_VERSION="${DEEPSPEED_VERSION:-0.19.8}"
PY="${PYTHON:-python3}"

[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$VPY" -c "import torch" 2>/dev/null; then
    echo "installing torch==$TORCH_VERSION"
    pip_install "torch==$TORCH_VERSION"
fi
if ! "$VPY" -c "import deepspeed" 2>/dev/null; then
    echo "installing deepspeed==$DEEPSPEED_VERSION"
    DS_BUILD_OPS=0 pip_install --no-build-isolation "deepspeed==$DEEPSPEED_VERSION"
fi
if ! "$VPY" -c "import numerics, pytest, peft, accelerate" 2>/dev/null; then
    echo "installing numerics[test]"
    pip_install -e ".[test]"
fi
# DeepSpeed JIT-builds its CPU ops on first use; build them once here, before ranks start in parallel.
.venv/bin/numerics prepare
