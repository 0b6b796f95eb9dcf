#!/usr/bin/env bash
# Create .venv in the repo root and install selfmoe with its pinned dependencies.
# torch and torchvision (built for each other) go first, pinned, so that no later package pulls an
# unpinned multi-GB CUDA build (torch 2.14.1 is a CUDA build that also runs on a CPU-only machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
.venv/bin/python -c "import torch, megatron.core, deepspeed; print('selfmoe env ready: torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| deepspeed', deepspeed.__version__)"
