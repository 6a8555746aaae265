#!/usr/bin/env bash
# A second environment with lmms-eval beside harmon, for `lmms-eval --model harmon` and its test
# (tests/test_lmms_eval.py, skipped where this environment is absent).
# lmms-eval cannot go into .venv: its dependencies would replace the pinned CPU torch (torchvision and timm
# want a newer one). Here torch is pinned, and torchvision/timm are removed after the install: the
# torchvision that fits this torch build fails to import ("operator torchvision::nms does not exist"), and
# transformers imports torchvision whenever it is installed. lmms-eval 0.7.3 needs filelock 3 (filelock._api).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-lmms-eval
[ -x $VENV/bin/python ] || "$PYTHON" -m venv $VENV
$VENV/bin/python -m pip install --quiet "torch==2.13.0"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==2.13.0\nfilelock==3.32.7\n' > "$CONSTRAINTS"
$VENV/bin/python -m pip install --quiet -c "$CONSTRAINTS" "lmms-eval==0.7.3" -e .
$VENV/bin/python -m pip uninstall --quiet -y torchvision timm
$VENV/bin/python -c "import lmms_eval.models, harmon.evals.lmms; print('lmms-eval ready with harmon')"
