"""Bytes each rank sends per step under ``gradproj pretrain --fsdp``, by collective, on CPU/gloo.

    torchrun --standalone --nproc-per-node 2 scripts/fsdp_comm.py docs/records/fsdp_comm_cpu.jsonl

Trains ``--model`` (default llama-20m) for 4 steps with a basis refresh every 2 for AdamW and the
low-rank methods, counts what each collective is handed (gradproj.bench.comm), appends one record
per method to the JSONL file (rank 0) and prints the table docs/SCALE.md generates from it
(``gradproj bench docs docs/SCALE.md``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from gradproj.bench.comm import comm_table, counting_collectives
from gradproj.cli import build_parser
from gradproj.distributed import init_from_env
from gradproj.train.cli import build_config
from gradproj.train.loop import Trainer
from gradproj.train.pretrain import PretrainTask
from gradproj.train.progress import Callback

METHODS = ("adamw", "galore_adamw", "fira_adamw", "apollo_mini")
GAP, STEPS = 2, 4


class PerStep(Callback):
    def __init__(self, sent: dict[str, int]) -> None:
        self.sent, self.steps, self.before = sent, {}, dict(sent)  # type: ignore[var-annotated]

    def on_step_begin(self, step: int) -> None:
        self.before = dict(self.sent)

    def on_step_end(self, step: int, loss: float) -> None:
        self.steps[step] = {k: self.sent[k] - self.before[k] for k in self.sent if self.sent[k] - self.before[k]}


def measure(model: str, method: str, out: Path) -> dict[str, Any]:
    argv = ["pretrain", "--model", model, "--fsdp", "--optimizer", method, "--steps", str(STEPS), "--seq-len", "64"]
    argv += ["--batch-size", "2", "--update-proj-gap", str(GAP), "--no-checkpoints", "--eval-every", "0"]
    argv += ["--eval-tokens", "130", "--dynamics-every", "0", "--no-progress", "--no-tensorboard", "--out", str(out)]
    config, _ = build_config(build_parser().parse_args(argv))
    with counting_collectives() as sent:
        counter = PerStep(sent)
        result = Trainer(config, PretrainTask(config), callbacks=(counter,)).run()  # type: ignore[arg-type]
    weights = result.summary["parameters"] * 4
    # step 1 refreshes every basis; step 2 (2 % GAP != 0 after the first) does not; step 3 refreshes again
    return {
        "model": model,
        "method": method,
        "world": dist.get_world_size(),
        "fp32_weight_bytes": weights,
        "refresh_step": counter.steps[3],
        "between_refreshes": counter.steps[2],
    }


if __name__ == "__main__":
    init_from_env()
    path, model = Path(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "llama-20m")
    records = [measure(model, m, Path(f"/tmp/fsdp-comm-{m}")) for m in METHODS]
    if dist.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        print(comm_table(records))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)
