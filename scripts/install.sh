#!/usr/bin/env bash
# One command sets up everything: a virtualenv in .venv with ourvidz-worker and its dev tools.
# Torch goes in first so that nothing pulls a different build in behind our back: a local
# wheel where one is available (CPU machines here), else the registry's build (CUDA on a GPU
# machine); set TORCH_INDEX_URL to take torch from another index (e.g. a CPU-only one).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
  elif ! "${PIP[@]}" --no-index "$TORCH_SPEC" 2>/dev/null; then
    "${PIP[@]}" "$TORCH_SPEC"
  fi
fi

"${PIP[@]}" -e ".[dev]"
echo "installed: $(.venv/bin/ourvidz-worker --help >/dev/null && echo ourvidz-worker) in .venv"
