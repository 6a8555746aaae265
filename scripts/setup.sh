#!/usr/bin/env bash
# Create .venv and install harmon with pinned dependencies. torch is installed first and pinned:
# an unpinned torch pulled in by another package would be a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "import torch, transformers, harmon; print('harmon', harmon.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
