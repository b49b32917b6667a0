#!/usr/bin/env bash
# The memory promise on a GPU (issue 13), one short script for a lent device (about 10 minutes):
#   1. the GaLore paper's 7B recipe for a few steps: llama-7b, 8-bit GaLore, rank 1024, layer-wise, bf16 weights,
#      activation checkpointing, seq 256, batch 1; measured peak next to the plan (and the paper's 22.0 GB);
#   2. llama-1b planned against measured for AdamW, 8-bit AdamW, GaLore and 8-bit GaLore;
#   3. a 24 GB card emulated with torch.cuda.set_per_process_memory_fraction: the 7B recipe runs, AdamW's is
#      refused by the pre-flight check;
#   4. the planner's matrix (bench memory) on CUDA.
# Records land in $OUT (or runs/memory-cuda); copy them to docs/records/ and rebuild docs/SCALE.md with
#   gradproj bench docs docs/SCALE.md
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/memory-cuda}"
mkdir -p "$out"
common=(--device cuda --vocab-size 32000 --seq-len 256 --batch-size 1 --steps 3 --eval-every 0 --eval-tokens 512
        --no-progress --no-checkpoints --no-tensorboard --dynamics-every 0 --warmup 0)
seven=(--model llama-7b --optimizer galore_adamw8bit --rank 1024 --layerwise --dtype bf16 --activation-checkpointing)

run() {  # name, then gradproj pretrain flags; the summary's memory object goes to $out/<name>.json
    local name=$1; shift
    timeout 900 python3 -m gradproj.cli pretrain "${common[@]}" --out "$out/$name" "$@" 2>&1 | tail -4
    python3 - "$out/$name" "$name" >> "$out/records.jsonl" <<'EOF'
import json, sys
from pathlib import Path
path = Path(sys.argv[1]) / "summary.json"
if path.exists():
    s = json.loads(path.read_text())
    print(json.dumps({"kind": "memory_cuda", "name": sys.argv[2], "model": s.get("model_name"), "dtype": s.get("dtype"),
                      "planned": s["memory"]["planned"], "measured": s["memory"]["measured"], "device": s["memory"]["device"]}))
EOF
}

run 7b-galore8bit "${seven[@]}"
for method in adamw adamw8bit galore_adamw galore_adamw8bit; do
    run "1b-$method" --model llama-1b --optimizer "$method" --rank 512 --dtype bf16
done
# a 24 GB card: another process holds the rest of the device (so the pre-flight check sees 24 GB free) and each
# run caps itself at 24e9 bytes with set_per_process_memory_fraction (so the allocator refuses beyond it)
python3 - "$out" <<'EOF'
import subprocess, sys, time, torch
total = torch.cuda.get_device_properties(0).total_memory
fraction = 24e9 / total
hold = ("import torch, time; x = torch.empty(int(%d), dtype=torch.uint8, device='cuda'); print('held', flush=True); "
        "time.sleep(3600)") % (total - 24e9 - 2**30)  # 1 GiB of slack for this process's own context
holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
holder.stdout.readline()
print(f"emulating a 24 GB card: fraction {fraction:.4f} of {total / 2**30:.1f} GiB; free now "
      f"{torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB")
code = (f"import torch, sys; torch.cuda.set_per_process_memory_fraction({fraction}); "
        "from gradproj.cli import main; sys.exit(main(sys.argv[1:]))")
base = ["--device", "cuda", "--vocab-size", "32000", "--seq-len", "256", "--batch-size", "1", "--steps", "3",
        "--eval-every", "0", "--eval-tokens", "512", "--no-progress", "--no-checkpoints", "--no-tensorboard",
        "--dynamics-every", "0", "--warmup", "0", "--model", "llama-7b", "--dtype", "bf16"]
for name, flags in (("24gb-7b-galore8bit", ["--optimizer", "galore_adamw8bit", "--rank", "1024", "--layerwise",
                                            "--activation-checkpointing"]),
                    ("24gb-7b-adamw", ["--optimizer", "adamw"])):
    done = subprocess.run([sys.executable, "-c", code, "pretrain", *base, *flags, "--out", f"{sys.argv[1]}/{name}"],
                          capture_output=True, text=True, timeout=900)
    print(name, "exit", done.returncode, (done.stdout + done.stderr).strip().splitlines()[-2:])
holder.kill()
EOF
timeout 900 python3 -m gradproj.cli bench memory --device cuda --models llama-20m,llama-60m,llama-130m --out "$out/matrix"
