"""What the training loop counts and reports: its progress (saved in every checkpoint), the one policy
for non-finite steps, the learning-rate schedule, throughput, the progress bar, and the callbacks
through which benchmarks time the steps of the very loop users run.

Example:
    >>> progress, policy = Progress(), SkipPolicy(limit=2, run_dir=Path("runs/example"))
    >>> policy.admit(progress, applied=False, norm=float("nan"))
    gradproj: step 1 skipped: non-finite loss or gradient norm (nan)
    False
    >>> progress.skipped, progress.consecutive
    (1, 1)
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. ``code`` is the conventional exit status."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by signal {signal.Signals(signum).name}; checkpoint {checkpoint}")
        self.code, self.checkpoint = 128 + signum, checkpoint


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warmup then cosine decay to ``floor`` (the GaLore paper's schedule), a pure function.

    >>> [round(lr_factor(s, 10, 2, 0.1), 3) for s in (0, 1, 2, 10)]
    [0.5, 1.0, 1.0, 0.1]
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_note(step: int, before: tuple[int, int], after: tuple[int, int], floor: float) -> str | None:
    """What a resumed run prints when its ``(steps, warmup)`` differ from the checkpoint's: the schedule
    is a function of the run's length, so its rate at ``step`` moves (None when it does not change).

    >>> schedule_note(1000, (2000, 200), (4000, 400), 0.1).split(": ", 2)[2]
    'the learning-rate schedule follows the new length, so the rate here goes from 63% to 94% of its peak'
    """
    was, now = lr_factor(step, *before, floor), lr_factor(step, *after, floor)
    if before == after or was == now:
        return None
    return (
        f"gradproj: resuming at step {step} of {after[0]} (was {before[0]}): the learning-rate schedule follows "
        f"the new length, so the rate here goes from {was:.0%} to {now:.0%} of its peak"
    )


@dataclass
class Progress:
    """What a checkpoint stores about the loop (besides model, optimizer, scheduler and RNG)."""

    step: int = 0
    position: int = 0  # examples or windows consumed
    skipped: int = 0  # steps skipped for a non-finite loss or gradient (written by SkipPolicy alone)
    consecutive: int = 0  # of them, in a row up to now
    seen: int = 0  # tokens or examples trained on
    history: list[dict[str, float]] = field(default_factory=list)  # evaluations


@dataclass(frozen=True)
class SkipPolicy:
    """The one owner of non-finite steps: a step whose loss or gradient norm is not finite is
    skipped (the caller leaves weights and state untouched), counted in :class:`Progress`, and
    ``limit`` of them in a row stop the run without saving (naming ``run_dir``'s last checkpoint)."""

    limit: int
    run_dir: Path
    report: bool = True  # print each skip (under torchrun rank 0 does: every rank skips the same steps)

    def admit(self, progress: Progress, *, applied: bool, norm: float) -> bool:
        """Record the outcome of step ``progress.step + 1``; True if it may be applied."""
        if applied and math.isfinite(norm):
            progress.consecutive = 0
            return True
        progress.skipped += 1
        progress.consecutive += 1
        step = progress.step + 1
        if self.report:
            print(f"gradproj: step {step} skipped: non-finite loss or gradient norm ({norm})", flush=True)
        if progress.consecutive >= self.limit:
            from .checkpoint import latest_checkpoint

            last_good = latest_checkpoint(self.run_dir)
            raise NonFiniteError(
                f"{progress.consecutive} consecutive non-finite steps (up to step {step}); stopped without "
                f"saving. Last good checkpoint: {last_good or 'none'}; lower --lr or check the data"
            )
        return False


@dataclass
class RunResult:
    run_dir: Path
    progress: Progress
    final_eval: dict[str, float]
    losses: list[float]  # one per step, NaN where the step was skipped
    summary: dict[str, Any]
    model: Any = None  # the trained model (unwrapped: not its DDP wrapper)


class Callback:
    """Hooks into :class:`gradproj.train.loop.Trainer` (each optional; the base class does nothing).

    ``on_step_begin`` and ``on_step_end`` bracket exactly one optimizer step (forward, backward,
    clipping, the step), never evaluation or checkpoints: the bench times steps with them.
    """

    def on_step_begin(self, step: int) -> None:
        """Step ``step`` (1-based) is about to start."""

    def on_step_end(self, step: int, loss: float) -> None:
        """Step ``step`` finished with mean loss ``loss`` (NaN if it was skipped)."""


class Throughput:
    """Units (tokens or examples) per second of training, evaluation and checkpoint time excluded."""

    def __init__(self, unit: str) -> None:
        self.unit, self.units, self.start, self.last = unit, 0, time.perf_counter(), 0.0

    def add(self, units: int) -> None:
        self.units += units
        self.last = self.units / max(time.perf_counter() - self.start, 1e-9)

    def rate(self) -> dict[str, float]:
        """The rate since the previous call (the log row's value), then a new window."""
        rate = {f"{self.unit}_per_s": self.last}
        self.units, self.start = 0, time.perf_counter()
        return rate

    def exclude(self, seconds: float) -> None:
        """Leave out time spent evaluating or saving (it is not training time)."""
        self.start += seconds

    @property
    def postfix(self) -> dict[str, str]:
        return {f"{self.unit[:3]}/s": f"{self.last:.0f}"}


def eval_line(step: int, metrics: dict[str, float]) -> str:
    """What a held-out evaluation prints above the bar.

    >>> eval_line(200, {"loss": 4.5211, "ppl": 91.94})
    'step 200: held-out loss 4.521, perplexity 91.94'
    >>> eval_line(50, {"loss": 0.4, "accuracy": 0.91234, "f1": 0.9})
    'step 50: held-out loss 0.400, accuracy 0.9123, F1 0.9000'
    """
    parts = [f"loss {metrics['loss']:.3f}"]
    parts += [f"{label} {metrics[key]:{spec}}" for key, (label, spec) in EVAL_METRICS.items() if key in metrics]
    return f"step {step}: held-out {', '.join(parts)}"


#: the held-out metrics a task may report: key -> (name on screen, format)
EVAL_METRICS = {
    "ppl": ("perplexity", ".2f"),
    "accuracy": ("accuracy", ".4f"),
    "f1": ("F1", ".4f"),
    "exact_match": ("exact match", ".4f"),
}


def progress_bar(total: int, start: int, *, enabled: bool) -> Any:
    """A tqdm bar from ``start`` to ``total`` steps (a no-op bar when not ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)
