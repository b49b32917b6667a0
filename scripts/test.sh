#!/usr/bin/env bash
# Install gradproj with its development extras and the reference implementations we test against,
# then run the linter, the type checker and the test suite (CPU; CUDA tests skip without a GPU).
# Installs into the active virtual environment, or into .venv (see scripts/venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
source scripts/torch.sh
python3 -m pip install -q -e ".[dev]"
# Reference implementations, pinned; --no-deps because their metadata pulls unrelated packages.
python3 -m pip install -q --no-deps galore-torch==1.0 fira==1.0.2 apollo-torch==1.0.3 pytorch-optimizer==4.1.0
python3 -m ruff check src tests
python3 -m ruff format --check src tests
python3 -m mypy
python3 -m pytest "$@"
