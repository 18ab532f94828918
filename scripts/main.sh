#!/usr/bin/env bash
# Sets up (scripts/bootstrap.sh) and runs the main job: answer questions over the bundled
# documents with the default model on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
exec cascade-rag demo "$@"
