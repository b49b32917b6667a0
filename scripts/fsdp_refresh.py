"""The optimizer step's time on refresh steps under FSDP2, with each refresh computed on one rank and
shared (gradproj's default) against every rank repeating every refresh (``optimizer.spread = False``),
on CPU/gloo. Both give the same bits, so one optimizer alternates between them, refresh by refresh.

    torchrun --standalone --nproc-per-node 2 scripts/fsdp_refresh.py docs/records/fsdp_refresh_cpu.jsonl

Shards ``--model`` (default llama-20m) as ``gradproj pretrain --fsdp`` does, steps it on random tokens
with a refresh every 2 steps, times each ``optimizer.step()`` (the slowest rank's), and appends one
record per method (rank 0) with the median refresh step spread and repeated, and a step between
refreshes. Give each rank its own cores (``--threads`` x ranks <= cores) or the timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gradproj.distributed import init_from_env
from gradproj.optim.build import OptimizerSpec, build_optimizer
from gradproj.train.models import build_causal_lm, default_rank
from gradproj.train.sharded import shard_model

GAP, VOCAB, SEQ, BATCH = 2, 4096, 64, 2


def slowest(seconds: float) -> float:
    """The slowest rank's time: a step is done when every rank is."""
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def measure(model_name: str, method: str, steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = shard_model(build_causal_lm(model_name, vocab_size=VOCAB, seq_len=SEQ), torch.device("cpu"))
    spec = OptimizerSpec(name=method, update_proj_gap=GAP, rank=default_rank(model))
    optimizer = build_optimizer(model, spec)
    times: dict[str, list[float]] = {"spread": [], "repeated": [], "between": []}
    tokens = torch.Generator().manual_seed(dist.get_rank())
    for step in range(steps):
        ids = torch.randint(VOCAB, (BATCH, SEQ), generator=tokens)
        model(input_ids=ids, labels=ids).loss.backward()
        refresh = step % GAP == 0
        kind = ("spread" if (step // GAP) % 2 else "repeated") if refresh else "between"
        optimizer.spread = kind != "repeated"  # type: ignore[attr-defined]
        dist.barrier()
        start = time.perf_counter()
        optimizer.step()
        elapsed = slowest(time.perf_counter() - start)
        optimizer.zero_grad()
        if step >= GAP:  # the first refresh creates the state: not timed
            times[kind].append(elapsed)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": model_name,
        "method": method,
        "world": dist.get_world_size(),
        "threads": torch.get_num_threads(),
        "rank": spec.rank,
        "steps": steps,
        "median_s": medians,
        "spread_speedup": medians["repeated"] / medians["spread"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="llama-20m")
    parser.add_argument("--methods", nargs="+", default=["galore_adamw", "fira_adamw"])
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    init_from_env()
    records = [measure(args.model, method, args.steps) for method in args.methods]
    if dist.get_rank() == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
                print(json.dumps(record))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
