"""The trainer's step against a bare loop (the previous bench harness's step): the same model,
optimizer and batches, alternated in one process; prints the median step times (ms) of each.

Run: python scripts/trainer_step_overhead.py   (about 3 minutes on 2 CPU cores)
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace

import torch

from gradproj.bench.quality import bench_config, prepare_data
from gradproj.bench.timing import StepClock
from gradproj.optim.build import build_optimizer
from gradproj.train.config import PretrainConfig
from gradproj.train.loop import Trainer
from gradproj.train.pretrain import PretrainTask, next_token_loss
from gradproj.train.text import PretrainData

BURN_IN = 10
CFG = bench_config(model="llama-5m", steps=60, batch_size=16, seq_len=64, rank=64, gap=50, eval_windows=4)


def _config(name: str) -> PretrainConfig:
    return replace(CFG, optim=replace(CFG.optim, name=name, lr=1e-3, other_lr=1e-2), out=tempfile.mkdtemp())


def bare(name: str, data: PretrainData) -> float:
    """Median seconds of forward, backward, clipping and step in a plain loop over prebuilt batches."""
    config = _config(name)
    task = PretrainTask(config, data)
    torch.manual_seed(config.seed)
    model = task.build_model()
    optimizer = build_optimizer(model, config.optimizer_spec(CFG.optim.rank))
    batches = [task.batch(i * CFG.batch_size, CFG.batch_size)["tokens"] for i in range(CFG.steps)]
    seconds = []
    for tokens in batches:
        start = time.perf_counter()
        next_token_loss(model, tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CFG.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[BURN_IN:])


def trainer(name: str, data: PretrainData) -> float:
    """Median seconds of the trainer's steps (timed by the bench's callback)."""
    config = _config(name)
    clock = StepClock("cpu")
    Trainer(config, PretrainTask(config, data), callbacks=[clock]).run()
    return clock.median(BURN_IN)


if __name__ == "__main__":
    data = prepare_data(CFG)
    for method in ("adamw", "galore_adamw"):
        rows = [(bare(method, data), trainer(method, data)) for _ in range(2)]
        print(method, "bare ms", [round(1000 * b) for b, _ in rows], "trainer ms", [round(1000 * t) for _, t in rows])
