#!/usr/bin/env bash
# The GPU measurements of docs/BENCHMARKS.md: CUDA tests, refresh micro-benchmark, and the quality
# sweep split into parallel shards on one GPU. Usage: scripts/bench_cuda.sh OUT_DIR [SHARDS] [SECONDS]
set -uo pipefail
out=${1:?usage: scripts/bench_cuda.sh OUT_DIR [SHARDS] [SECONDS]}
shards=${2:-8}
budget=${3:-420}
mkdir -p "$out"
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -m pytest tests -q -p no:cacheprovider -x 2>&1 | tail -5 | tee "$out/pytest_cuda.txt"
python3 -m gradproj.cli bench refresh --device cuda --out "$out/refresh_cuda.jsonl" | tee "$out/refresh_cuda.md"
for ((i = 0; i < shards; i++)); do
  timeout "$budget" python3 -m gradproj.cli bench quality --device cuda --shard "$i/$shards" \
    --out "$out/quality_cuda.jsonl" >"$out/quality_$i.log" 2>&1 &
done
wait
python3 -m gradproj.cli bench table "$out/quality_cuda.jsonl" | tee "$out/quality_cuda.md"
