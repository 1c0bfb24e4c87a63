#!/usr/bin/env bash
# The RecBole peer check of momrec's SASRec baseline on MovieLens-100K (see launch/peers/recbole_ml100k.py).
#   bash launch/peers/recbole.sh --inter ../shared/data/movielens-100k/ml-100k.inter --model Pop --out runs/peers/pop.json
#   bash launch/peers/recbole.sh --inter ../shared/data/movielens-100k/ml-100k.inter --out runs/peers/sasrec.json
# RecBole gets its own environment ($RECBOLE_VENV, default .venv-recbole): torch first and pinned (left to resolve,
# recbole's dependencies pull a multi-GB CUDA torch on a CPU machine), then recbole 1.2.1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${RECBOLE_VENV:-$ROOT/.venv-recbole}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[recbole] creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import recbole" 2>/dev/null; then
    echo "[recbole] installing torch==2.13.0 and recbole==1.2.1 into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "recbole==1.2.1"
fi
exec "$VENV/bin/python" "$ROOT/launch/peers/recbole_ml100k.py" "$@"
