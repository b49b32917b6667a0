#!/usr/bin/env bash
# Install gradproj with its training extras (CPU PyTorch unless a torch is already installed)
# and run the demo: a small LLaMA trained on Shakespeare by AdamW, GaLore, Fira and APOLLO-Mini.
# Extra arguments go to `gradproj demo` (see `gradproj demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[train]"
exec python3 -m gradproj.cli demo "$@"
