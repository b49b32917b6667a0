#!/usr/bin/env bash
# --fsdp on a lent GPU (issue 14), one short script (about 5 minutes): on one GPU a world of one still runs
# FSDP2's all-gathers, its memory layout and the sharded checkpoint path. For llama-60m and llama-350m in bf16,
# GaLore and AdamW, with and without --fsdp: tokens/s and measured peak (summary.json), then a sharded save and
# a resume. Records land in $OUT (or runs/fsdp-cuda)/records.jsonl; copy them to docs/records/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/fsdp-cuda}"
mkdir -p "$out"
common=(--device cuda --vocab-size 32000 --seq-len 256 --batch-size 8 --steps 30 --eval-every 0 --eval-tokens 2048
        --no-progress --no-tensorboard --dynamics-every 0 --dtype bf16 --save-every 0)

run() {  # name, then gradproj pretrain flags
    local name=$1; shift
    timeout 600 python3 -m gradproj.cli pretrain "${common[@]}" --out "$out/$name" "$@" 2>&1 | tail -3
    python3 - "$out/$name" "$name" >> "$out/records.jsonl" <<'EOF'
import json, sys
from pathlib import Path
path = Path(sys.argv[1]) / "summary.json"
rows = [json.loads(line) for line in (Path(sys.argv[1]) / "metrics.jsonl").read_text().splitlines()] if path.exists() else []
if path.exists():
    s = json.loads(path.read_text())
    rates = [r["tokens_per_s"] for r in rows if r.get("kind") == "train" and "tokens_per_s" in r]
    print(json.dumps({"kind": "fsdp_cuda", "name": sys.argv[2], "model": s.get("model_name"),
                      "tokens_per_s": rates[-1] if rates else None, "memory": s["memory"], "seconds": s["seconds"]}))
EOF
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for model in llama-60m llama-350m; do
  for method in adamw galore_adamw; do
    run "$model-$method" --model "$model" --optimizer "$method"
    run "$model-$method-fsdp" --model "$model" --optimizer "$method" --fsdp
  done
done
# the sharded checkpoint path on CUDA: a save at the end, then one more step resumed from it
python3 -m gradproj.cli pretrain --resume "$out/llama-60m-galore_adamw-fsdp" --steps 31 2>&1 | tail -2
cat "$out/records.jsonl"
