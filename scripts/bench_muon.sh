#!/usr/bin/env bash
# The Muon-family benchmark of docs/BENCHMARKS.md (llama-5m, 16 x 64 tokens a step, rank 64, gap 50, CPU):
# 1. a rate sweep at 300 steps, seed 0, of the methods without a committed llama-5m sweep (the matrices'
#    rate; the other groups at 3e-2, as the COSMOS and GradNormLoRP sweeps);
# 2. every method at its best rates (the sweep's, else the committed sweeps') for 1,000 steps at seeds 0-2.
# Two one-thread runs at a time (the brief's rule for this 2-core machine). Usage:
#   bash scripts/bench_muon.sh [OUT] [sweep|seeds|all] [SEEDS]      (default: runs/muon all "0 1 2")
set -euo pipefail
OUT=${1:-runs/muon}
WHAT=${2:-all}
SEEDS=${3:-0 1 2}
export OMP_NUM_THREADS=1
GP=${GRADPROJ:-gradproj}
COMMON="--model llama-5m --batch-size 16 --seq-len 64 --rank 64 --gap 50"
SWEEP="$COMMON --steps 300 --eval-every 300 --lr-other 3e-2 --seed 0"
RECORDS="docs/records/sweep_llama5m_cpu.jsonl docs/records/sweep_frontier_llama5m_cpu.jsonl
  docs/records/cosmos_sweep_llama5m_cpu.jsonl docs/records/gradnorm_sweep_llama5m_cpu.jsonl"

if [[ $WHAT == sweep || $WHAT == all ]]; then
  $GP bench quality $SWEEP --methods muon,scale --lr-matrix 1e-3,3e-3,1e-2,3e-2 --out "$OUT/sweep-a" &
  $GP bench quality $SWEEP --methods muon-torch,subspace_muon --lr-matrix 1e-3,3e-3,1e-2,3e-2 --out "$OUT/sweep-b" &
  wait
  # SCALE was best at the grid's lowest rate: two lower ones
  $GP bench quality $SWEEP --methods scale --lr-matrix 3e-4 --out "$OUT/sweep-c" &
  $GP bench quality $SWEEP --methods scale --lr-matrix 1e-4 --out "$OUT/sweep-c2" &
  wait
fi
if [[ $WHAT == seeds || $WHAT == all ]]; then
  LR_FROM="$OUT/sweep-a $OUT/sweep-b $OUT/sweep-c $OUT/sweep-c2 $RECORDS"
  for s in $SEEDS; do
    $GP bench quality $COMMON --steps 1000 --eval-every 250 --seed "$s" --lr-from $LR_FROM \
      --methods muon-torch,muon,cosmos,scale --out "$OUT/seeds-a" &   # COSMOS's step is twice the others'
    $GP bench quality $COMMON --steps 1000 --eval-every 250 --seed "$s" --lr-from $LR_FROM \
      --methods adamw,alice-pytorch-optimizer,galore_adamw,subspace_muon,gradnorm_lorp --out "$OUT/seeds-b" &
    wait
  done
fi
