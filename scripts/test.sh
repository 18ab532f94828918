#!/usr/bin/env bash
# Sets up (scripts/bootstrap.sh) and runs the whole test suite: ruff, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest -q "$@"
