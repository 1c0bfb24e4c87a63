#!/usr/bin/env bash
# Install momrec into ./.venv and run the lint and the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup.sh
echo "[test] ruff"
ruff check .
ruff format --check .
echo "[test] pytest"
pytest -q "$@"
