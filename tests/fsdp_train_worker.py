"""Run by ``torchrun`` from tests/test_fsdp_trainer.py: the trainer under ``--fsdp`` on CPU/gloo.

``methods OUT``: one short run per FSDP-capable trainer method (``OUT/<method>``), and :data:`FLAG_RUNS`.
``interrupt OUT``: an uninterrupted run (``OUT/straight``); the same run stopped by SIGTERM sent to
rank 1 alone after step 3 (``OUT/stopped``, which every rank saves once) and resumed on this many
ranks (``OUT/resumed``); a run whose loss is NaN on rank 1 only at step 3 (``OUT/nan``; every rank's
skipped-step count in ``OUT/nan/skipped-<rank>.json``); 8-bit GaLore's run (``OUT/eight_bit``).
``fault OUT``: rank 1 raises at the start of step 5, after the checkpoint of step 4.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from gradproj.cli import build_parser
from gradproj.distributed import init_from_env
from gradproj.optim.registry import METHODS, trainer_methods
from gradproj.train.cli import build_config, run
from gradproj.train.loop import Trainer
from gradproj.train.pretrain import PretrainTask
from gradproj.train.progress import Callback, Interrupted

TINY = ["--model", "llama-tiny", "--seq-len", "32", "--update-proj-gap", "2", "--log-every", "1", "--no-progress"]
TINY += ["--no-tensorboard", "--eval-tokens", "256", "--eval-every", "0", "--dynamics-every", "0", "--rank", "8"]
#: the trainer's methods that step FSDP2 parameters (the registry decides), each run briefly
METHOD_RUN = [*TINY, "--steps", "4", "--save-every", "0", "--no-checkpoints"]
LONG_RUN = [*TINY, "--steps", "6", "--save-every", "2", "--optimizer", "galore_adamw"]
FAULT_STEP, STOP_STEP, NAN_STEP = 5, 3, 3
#: runs with a memory flag: bf16 weights (stochastic rounding, gradients reduced in float32), and
#: activation checkpointing (each block gathers its weights again for the recompute): "<method>-<flag>"
FLAG_RUNS = ("galore_adamw-bf16", "galore_adamw-checkpointing")
FLAGS = {"bf16": ["--dtype", "bf16"], "checkpointing": ["--activation-checkpointing"]}


def fsdp_methods() -> list[str]:
    return [m.name for m in trainer_methods() if METHODS[m.name].supports_fsdp]


def run_options(run: str) -> list[str]:
    """A run's name as its method and flags: "galore_adamw" or "galore_adamw-bf16"."""
    method, _, flag = run.partition("-")
    return [method, *(FLAGS[flag] if flag else [])]


def rank() -> int:
    return dist.get_rank()


class AtStep(Callback):
    """Calls ``action`` on rank 1 when step ``step`` begins (``begin``) or ends."""

    def __init__(self, step: int, action: Any, *, begin: bool) -> None:
        self.step, self.action, self.begin = step, action, begin

    def on_step_begin(self, step: int) -> None:
        if self.begin and step == self.step and rank() == 1:
            self.action()

    def on_step_end(self, step: int, loss: float) -> None:
        if not self.begin and step == self.step and rank() == 1:
            self.action()


class NaNOnRankOne:
    """The pretraining task, but rank 1's loss is NaN on step ``NAN_STEP`` (the others' is finite)."""

    def __init__(self, task: Any) -> None:
        self.task, self.step = task, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def loss(self, model: Any, batch: Any) -> Any:
        loss = self.task.loss(model, batch)
        return loss * float("nan") if self.step == NAN_STEP and rank() == 1 else loss


class StepCounter(Callback):
    def __init__(self, task: NaNOnRankOne) -> None:
        self.task = task

    def on_step_begin(self, step: int) -> None:
        self.task.step = step


def trainer(argv: list[str], *, callbacks: tuple[Callback, ...] = (), nan: bool = False) -> Trainer:
    args = build_parser().parse_args(["pretrain", *argv])
    config, resume = build_config(args)
    task: Any = PretrainTask(config)  # type: ignore[arg-type]
    if nan:
        task = NaNOnRankOne(task)
        callbacks = (*callbacks, StepCounter(task))
    return Trainer(config, task, resume=resume, callbacks=callbacks)


def methods(out: Path) -> None:
    for name in [*fsdp_methods(), *FLAG_RUNS]:
        method, *options = run_options(name)
        argv = ["pretrain", *METHOD_RUN, "--fsdp", "--batch-size", "4", "--optimizer", method, *options]
        assert run(build_parser().parse_args([*argv, "--out", str(out / name)])) == 0, name


def interrupt(out: Path) -> None:
    per_rank = str(8 // dist.get_world_size())
    common = [*LONG_RUN, "--fsdp", "--batch-size", per_rank]
    trainer([*common, "--out", str(out / "straight")]).run()
    stop = AtStep(STOP_STEP, lambda: os.kill(os.getpid(), signal.SIGTERM), begin=False)
    try:
        trainer([*common, "--out", str(out / "stopped")], callbacks=(stop,)).run()
        raise AssertionError("SIGTERM on rank 1 did not stop the run")
    except Interrupted as stopped:
        assert stopped.checkpoint.name == f"step-{STOP_STEP:08d}", stopped.checkpoint
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    resumed = out / "resumed"
    resumed.mkdir(parents=True, exist_ok=True)
    if rank() == 0:
        import shutil

        shutil.copytree(out / "stopped" / "checkpoints", resumed / "checkpoints")
    dist.barrier()
    trainer(["--resume", str(resumed), "--out", str(resumed)]).run()
    eight_bit = [*LONG_RUN[:-2], "--optimizer", "galore_adamw8bit", "--fsdp", "--batch-size", per_rank]
    trainer([*eight_bit, "--out", str(out / "eight_bit")]).run()  # re-sharded by the test
    result = trainer([*common, "--out", str(out / "nan")], nan=True).run()
    (out / "nan" / f"skipped-{rank()}.json").write_text(json.dumps(result.progress.skipped))


def fault(out: Path) -> int:
    """Through the command line (its one-message handling), with rank 1's step made to raise."""
    per_rank = str(8 // dist.get_world_size())
    step = Trainer._train_step

    def failing(self: Trainer, *args: Any) -> Any:
        if args[-1].step + 1 == FAULT_STEP and rank() == 1:
            raise RuntimeError(f"injected fault on rank 1 at step {FAULT_STEP}")
        return step(self, *args)

    Trainer._train_step = failing  # type: ignore[method-assign]
    return run(
        build_parser().parse_args(["pretrain", *LONG_RUN, "--fsdp", "--batch-size", per_rank, "--out", str(out)])
    )


if __name__ == "__main__":
    init_from_env()
    mode, out = sys.argv[1], Path(sys.argv[2])
    code = {"methods": methods, "interrupt": interrupt, "fault": fault}[mode](out) or 0
    if code == 0:
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
