#!/usr/bin/env bash
# The GPU measurements of docs/BENCHMARKS.md and docs/DYNAMICS.md on one CUDA device.
# Usage: scripts/bench_cuda.sh OUT_DIR [PART]   PART: checks (tests, refresh, overhead, dynamics runs) | quality |
#        frontier (Alice, RACS and every peer: llama-20m, 2000 steps, 3 seeds; FRONTIER_METHODS to narrow or add,
#        e.g. galore_adamw,gradnorm_lorp,alice,cosmos for the issue-18 Pareto rows) | all
# quality reads the CPU sweep's learning rates from docs/records/ (each method at its best rates).
set -uo pipefail
out=${1:?usage: scripts/bench_cuda.sh OUT_DIR [checks|quality|frontier|all]}
part=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
gp="python3 -m gradproj.cli"
if [[ $part == checks || $part == all ]]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
  python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tail -5 | tee "$out/pytest_cuda.txt"
  $gp bench refresh --device cuda --shape 4096 11008 --rank 1024 --out "$out/refresh_cuda.jsonl"
  $gp bench refresh --device cuda --shape 2048 5504 --rank 512 --out "$out/refresh_cuda.jsonl"
  $gp bench refresh --device cuda --captured llama-20m --rank 96 --out "$out/refresh_cuda.jsonl"
  $gp bench overhead --device cuda --model llama-20m --steps 200 --batch-size 32 --seq-len 256 --rank 96 \
    --gap 100 --every 10 --repeats 3 --out "$out/overhead_cuda"
  for opt in galore_adamw fira_adamw adamw; do
    $gp pretrain --device cuda --model llama-20m --optimizer "$opt" --steps 1000 --batch-size 32 --seq-len 256 \
      --update-proj-gap 100 --eval-every 250 --save-every 0 --no-progress --out "$out/run-$opt" 2>&1 | tail -3
  done
  $gp report "$out/run-galore_adamw" "$out/run-fira_adamw" "$out/run-adamw" --out "$out/report.html"
fi
if [[ $part == quality || $part == all ]]; then
  $gp bench quality --device cuda --model llama-20m --steps 300 --batch-size 32 --seq-len 256 --rank 96 \
    --gap 100 --eval-every 100 --lr-matrix 1e-3,3e-3,1e-2 --lr-other 3e-2 --lr-from docs/records/sweep_llama5m_cpu.jsonl \
    --out "$out/quality_cuda"   # one run folder per method, and quality_cuda/records.jsonl
  $gp bench table "$out/quality_cuda" --plots "$out" | tee "$out/quality_cuda.md"
fi
if [[ $part == frontier || $part == all ]]; then
  # The issue-12 comparison at length: each method at its best llama-5m rates, three seeds, mean and spread.
  methods=${FRONTIER_METHODS:-adamw,galore_adamw,fira_adamw,apollo_mini,alice,alice0,racs,galore-torch,fira,apollo-torch,alice-pytorch-optimizer,racs-pytorch-optimizer,lora-peft}
  for seed in 0 1 2; do
    $gp bench quality --device cuda --model llama-20m --steps 2000 --batch-size 32 --seq-len 256 --rank 96 \
      --gap 200 --eval-every 500 --seed "$seed" --methods "$methods" \
      --lr-from docs/records/sweep_frontier_llama5m_cpu.jsonl docs/records/sweep_llama5m_cpu.jsonl \
      docs/records/cosmos_sweep_llama5m_cpu.jsonl docs/records/gradnorm_sweep_llama5m_cpu.jsonl \
      --out "$out/frontier_cuda"
  done
  $gp bench table "$out/frontier_cuda" | tee "$out/frontier_cuda.md"   # ends with the seeds table and its verdict
  # step time against AdamW, one step of each trainer in turn (bf16 autocast, as users train on a GPU)
  $gp bench speed --device cuda --autocast bf16 --model llama-20m --steps 100 --batch-size 32 --seq-len 256 \
    --rank 96 --gap 200 --repeats 2 --methods galore_adamw,fira_adamw,alice,alice0,racs,alice-pytorch-optimizer,racs-pytorch-optimizer \
    --out "$out/speed_cuda" | tee "$out/speed_cuda.md"
fi
