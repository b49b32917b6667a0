"""Step time side by side, in turn: every method's trainer in its own process, taking one step each in
round robin, so that a drifting host (another job, the clock) slows every method alike; each method's
median, mean and slowest step and their ratios to AdamW's.

``bench quality`` also records step times, but it runs each method once, one after another, for
minutes: a drift of the host lands on whichever methods ran during it, and on a shared 2-core machine
consecutive runs of one method differ by 10-30%. Here only one trainer computes at a time (the others
wait for their turn, and a trainer's work between its steps is done in its own turn), and the step
times of each method interleave with every other's. Each run is a ``gradproj pretrain`` run through
the same trainer, batches and parameter split as ``bench quality``, at the method's registry learning
rates (the rates do not change the arithmetic).

Each trainer has a process to itself, as a user's run has: trainers in threads of one process were
measured to slow each other's small kernels (on the 2-core CPU, llama-20m: fused AdamW's trainer step
373 -> 465 ms, GaLore's 1.047x -> 1.155x AdamW's), which inflated every ratio of the methods that run
many small kernels.

Example:
    >>> robin = RoundRobin(2)
    >>> robin.open(); robin.wait(0); robin.pass_on(0); robin.turn    # 0 stepped; 1's turn
    1
    >>> robin.leave(1); robin.turn                                     # 1 finished: 0 steps alone
    0
"""

from __future__ import annotations

import multiprocessing
import queue
import statistics
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..train.config import PretrainConfig
from ..train.progress import Callback
from ..train.text import PretrainData
from .methods import get_method
from .quality import prepare_data, run

#: the method every ratio is taken against
BASELINE = "adamw"
#: trainers start in fresh interpreters (a forked child would inherit the parent's thread pools)
_PROCESSES = multiprocessing.get_context("spawn")


class RoundRobin:
    """Seats for trainers in processes: each waits for its turn before a step and passes it on after.
    Nobody steps before :meth:`open` (``turn`` is -1), so that setting up one trainer never overlaps
    another's timed step. Built from ``multiprocessing`` primitives: hand it to the processes it seats."""

    def __init__(self, seats: int) -> None:
        self._turn = _PROCESSES.Value("i", -1, lock=False)
        self._done = _PROCESSES.Array("b", seats, lock=False)
        self._changed = _PROCESSES.Condition()
        #: set when a seat's trainer is ready for its first step (or gone): set-up is over
        self.arrived = [_PROCESSES.Event() for _ in range(seats)]

    @property
    def turn(self) -> int:
        return int(self._turn.value)

    def open(self) -> None:
        with self._changed:
            self._turn.value = self._next(-1)
            self._changed.notify_all()

    def wait(self, seat: int) -> None:
        self.arrived[seat].set()
        with self._changed:
            self._changed.wait_for(lambda: self._turn.value == seat)

    def pass_on(self, seat: int) -> None:
        with self._changed:
            self._turn.value = self._next(seat)
            self._changed.notify_all()

    def leave(self, seat: int) -> None:
        """``seat``'s trainer finished (or failed): the others go on without it."""
        self.arrived[seat].set()
        with self._changed:
            self._done[seat] = True
            if self._turn.value == seat:
                self._turn.value = self._next(seat)
            self._changed.notify_all()

    def _next(self, seat: int) -> int:
        count = len(self._done)
        for offset in range(1, count + 1):
            candidate = (seat + offset) % count
            if not self._done[candidate]:
                return candidate
        return seat

    def callbacks(self, seat: int) -> tuple[Callback, Callback]:
        """(before the step clock, after it). A trainer keeps its turn from one step to the next and
        passes it on only when it is about to wait for its next step (or leaves), so that what it does
        between steps (batches, logs, its final evaluation) never runs beside another trainer's timed
        step."""
        return _Turn(self, seat), Callback()


class _Turn(Callback):
    def __init__(self, robin: RoundRobin, seat: int) -> None:
        self.robin, self.seat, self.held = robin, seat, False

    def on_step_begin(self, step: int) -> None:
        if self.held:
            self.robin.pass_on(self.seat)
        self.robin.wait(self.seat)
        self.held = True


def _seat(
    robin: RoundRobin,
    seat: int,
    name: str,
    data: PretrainData,
    config: PretrainConfig,
    folder: Path,
    results: Any,
    dismissed: Any,
) -> None:
    """One trainer's process: its run, then its record (or None if it failed) on ``results``; it exits
    only when ``dismissed`` (tearing down an interpreter takes a CPU second, which would land on another
    trainer's timed step)."""
    record = None
    try:
        method = get_method(name)
        record = run(method, method.lr, method.other_lr, data, config, folder, robin.callbacks(seat))
    finally:
        robin.leave(seat)
        results.put((seat, record))
        dismissed.wait()


def speed(
    cfg: PretrainConfig, methods: list[str], repeats: int = 1, checkpointing: bool = False
) -> list[dict[str, Any]]:
    """One record per method (AdamW added first if missing): its median step in each round of a round
    robin, the median over rounds, and that against AdamW's. ``checkpointing``: every method also runs
    with activation checkpointing in the same round robin (``NAME+checkpointing``, its ratio to NAME)."""
    names = [BASELINE, *(name for name in methods if name != BASELINE)]
    seats = [(name, get_method(name).name, cfg) for name in names]  # a bad name fails here, before any process
    if checkpointing:
        seats += [
            (f"{name}+checkpointing", method, replace(c, activation_checkpointing=True)) for name, method, c in seats
        ]
    data = prepare_data(cfg)
    kinds = ("median", "mean", "max")
    times: dict[str, dict[str, list[float]]] = {kind: {name: [] for name, _, _ in seats} for kind in kinds}
    started: dict[str, list[list[float]]] = {name: [] for name, _, _ in seats}
    with tempfile.TemporaryDirectory(prefix="gradproj-speed-") as out:
        for _ in range(repeats):
            records = _round(seats, data, Path(out))
            for (name, _, _), record in zip(seats, records, strict=True):
                for kind in kinds:
                    times[kind][name].append(record[f"step_seconds_{kind}"])
                started[name].append(record["step_started"])
    medians = {name: statistics.median(rounds) for name, rounds in times["median"].items()}
    means = {name: statistics.median(rounds) for name, rounds in times["mean"].items()}
    return [
        {
            "benchmark": "step_speed",
            "method": name,
            "step_seconds_median": medians[name],
            "step_seconds_rounds": times["median"][name],
            "vs_adamw": medians[name] / medians[BASELINE],
            # the mean over the run: refresh steps included (amortized over the gap when a run spans one)
            "step_seconds_mean": means[name],
            "vs_adamw_mean": means[name] / means[BASELINE],
            "step_seconds_max": statistics.median(times["max"][name]),
            "max_vs_median": statistics.median(times["max"][name]) / medians[name],
            **(
                {"vs_without_checkpointing": medians[name] / medians[name.split("+checkpointing")[0]]}
                if name.endswith("+checkpointing")
                else {}
            ),
            "rounds": repeats,
            "step_started": started[name],  # each round's step start times (monotonic, shared by the processes)
            "config": asdict(config),
        }
        for name, _, config in seats
    ]


def _round(seats: list[tuple[str, str, PretrainConfig]], data: PretrainData, out: Path) -> list[dict[str, Any]]:
    """One round robin: every seat's run in its own process; their records in seat order."""
    robin, results, dismissed = RoundRobin(len(seats)), _PROCESSES.Queue(), _PROCESSES.Event()
    processes = [
        _PROCESSES.Process(
            target=_seat, args=(robin, seat, method, data, config, out / str(seat), results, dismissed), daemon=True
        )
        for seat, (_, method, config) in enumerate(seats)  # a method may sit twice (with and without checkpointing)
    ]
    for process in processes:  # they import and build at once; nobody steps before every one is ready
        process.start()
    for event in robin.arrived:
        event.wait()
    robin.open()
    records = _collect(results, processes)
    dismissed.set()
    for process in processes:
        process.join()
    found = []
    for seat, (name, _, _) in enumerate(seats):
        record = records.get(seat)
        if not record:
            raise RuntimeError(f"bench speed: the {name} run failed (its error is printed above)")
        found.append(record)
    return found


def _collect(results: Any, processes: list[Any]) -> dict[int, dict[str, Any] | None]:
    """Every seat's record, read before the processes are joined (a child exits once its record is read);
    a child that died without one (killed, a crash in C) ends the wait instead of hanging it."""
    records: dict[int, dict[str, Any] | None] = {}
    while len(records) < len(processes):
        try:
            seat, record = results.get(timeout=1.0)
            records[seat] = record
        except queue.Empty:
            if not any(process.is_alive() for process in processes) and results.empty():
                break
    return records


def speed_table(records: list[dict[str, Any]]) -> str:
    """Markdown of ``gradproj bench speed`` records, fastest first; the mean and the slowest step where
    the records have them (older records kept the median alone)."""
    amortized = all("step_seconds_mean" in r for r in records)
    head = "| method | median step ms | vs AdamW |" + (" mean step ms | vs AdamW | slowest / median |" * amortized)
    lines = [f"{head} rounds |", "|---|---:|---:|" + "---:|---:|---:|" * amortized + "---:|"]
    for r in sorted(records, key=lambda r: r["step_seconds_median"]):
        plain = f" ({r['vs_without_checkpointing']:.2f}x without)" if "vs_without_checkpointing" in r else ""
        row = f"| {r['method']} | {1000 * r['step_seconds_median']:.1f} | {r['vs_adamw']:.2f}{plain} |"
        if amortized:
            row += f" {1000 * r['step_seconds_mean']:.1f} | {r['vs_adamw_mean']:.2f} | {r['max_vs_median']:.2f} |"
        lines.append(f"{row} {r['rounds']} |")
    return "\n".join(lines)


def optimizer_step_table(records: list[dict[str, Any]]) -> str:
    """Markdown of ``scripts/optimizer_step.py`` records (the optimizer step alone, over one gap)."""
    lines = [
        "| optimizer | median step ms | vs AdamW | mean over the gap, ms | vs AdamW | slowest / median |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(records, key=lambda r: r["step_seconds_mean"]):
        lines.append(
            f"| {r['method']} | {1000 * r['step_seconds_median']:.1f} | {r['vs_adamw']:.2f} | "
            f"{1000 * r['step_seconds_mean']:.1f} | {r['vs_adamw_mean']:.2f} | {r['max_vs_median']:.2f} |"
        )
    return "\n".join(lines)
