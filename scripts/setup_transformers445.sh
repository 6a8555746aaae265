#!/usr/bin/env bash
# A second environment holding the transformers of the original code and of the release's remote code
# (4.45.2, with no torch): tests/test_release_compat.py checks in it that the tokenizer files and the
# config.json that harmon writes load there as well as in our transformers 5. Skipped where it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv-transformers445/bin/python ] || "$PYTHON" -m venv .venv-transformers445
.venv-transformers445/bin/python -m pip install --quiet "transformers==4.45.2" "tokenizers==0.20.3" \
    "huggingface_hub==0.36.2"
