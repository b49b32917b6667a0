"""Clocks and meters the benchmarks share: step timing with device synchronisation (a trainer
callback), time spent in basis refreshes (ours and the peers', by wrapping the function each
calls), and peak memory.

Example:
    >>> clock = StepClock("cpu")
    >>> clock.on_step_begin(1)
    >>> _ = sum(range(1000))
    >>> clock.on_step_end(1, loss=2.5)
    >>> len(clock.seconds), clock.seconds[0] > 0, clock.losses
    (1, True, [2.5])
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..optim.registry import Method
from ..train.progress import Callback


def synchronize(device: str) -> None:
    """Wait for queued kernels, so that wall-clock time is the work's time."""
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize(torch.device(device))


@dataclass
class StepClock(Callback):
    """Seconds and loss of each training step, synchronised on CUDA: a callback of the trainer
    (:class:`gradproj.train.progress.Callback`), so what is timed is the loop users run."""

    device: str
    seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    #: when each step began (``time.monotonic``: one clock for every process of the machine)
    started: list[float] = field(default_factory=list)
    _start: float = 0.0

    def on_step_begin(self, step: int) -> None:
        synchronize(self.device)
        self.started.append(time.monotonic())
        self._start = time.perf_counter()

    def on_step_end(self, step: int, loss: float) -> None:
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - self._start)
        self.losses.append(loss)

    def median(self, burn_in: int) -> float:
        """Median step time after the first ``burn_in`` steps (allocator warm-up, first refresh, compiles)."""
        kept = self.seconds[burn_in:] or self.seconds
        return statistics.median(kept)

    def mean(self, burn_in: int) -> float:
        kept = self.seconds[burn_in:] or self.seconds
        return sum(kept) / len(kept)

    def max(self, burn_in: int) -> float:
        """The slowest step after the burn-in (a refresh step, where every matrix refreshes at once)."""
        return max(self.seconds[burn_in:] or self.seconds)


@dataclass
class RefreshClock:
    """Total seconds and calls of a basis-refresh function."""

    seconds: float = 0.0
    calls: int = 0


#: (module, class or "", function) that recomputes a basis: ours (a module-level function: no class), ours under
#: rank="auto" (the SVD at the cap happens before the step), and each peer package's projector
_OURS = ("gradproj.optim.step", "", "refresh")
_OURS_AUTO_RANK = ("gradproj.optim.ranks", "", "basis_at_cap")
_PEERS = {
    "galore-torch": ("galore_torch.galore_projector", "GaLoreProjector", "get_orthogonal_matrix"),
    "fira": ("fira.gradient_projection", "GradientProjector", "get_orthogonal_matrix"),
    "apollo-torch": ("apollo_torch.random_projector", "GradientProjector", "get_orthogonal_matrix"),
}


def refresh_target(method: Method) -> tuple[str, str, str] | None:
    """What the bench times as ``method``'s basis refreshes (:func:`timed_refreshes`), or None: a method without
    a basis (full rank, the identity projector) or a peer whose refresh is not one function.

    >>> from gradproj.optim.registry import METHODS
    >>> refresh_target(METHODS["galore_adamw"])[2], refresh_target(METHODS["racs"]), refresh_target(METHODS["fira"])[1]
    ('refresh', None, 'GradientProjector')
    """
    if method.kind == "peer":
        return _PEERS.get(method.package or "")
    if method.kind != "preset" or not method.projected or method.default_option("projector") == "identity":
        return None
    return _OURS_AUTO_RANK if method.fixed_rank == "auto" else _OURS


@contextlib.contextmanager
def timed_refreshes(target: tuple[str, str, str] | None, device: str) -> Iterator[RefreshClock]:
    """Time every call of ``module.Class.method`` (the function that recomputes a basis) while inside;
    an empty class name means a function of the module itself.

    The method is wrapped on its owner and restored on exit; ``target=None`` times nothing.
    """
    clock = RefreshClock()
    if target is None:
        yield clock
        return
    module, cls_name, method = target
    owner = importlib.import_module(module)
    cls = getattr(owner, cls_name) if cls_name else owner
    original = cls.__dict__[method]

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        synchronize(device)
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            synchronize(device)
            clock.seconds += time.perf_counter() - start
            clock.calls += 1

    setattr(cls, method, timed)
    try:
        yield clock
    finally:
        setattr(cls, method, original)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: ``5 > /proc/self/clear_refs``); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def max_rss_bytes() -> int:
    """This process's peak resident set size (since the last :func:`reset_peak_rss`, where supported)."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def current_rss_bytes() -> int:
    """This process's resident set size now (its peak where the current value cannot be read)."""
    rss = _status_kib("VmRSS")
    return rss * 1024 if rss is not None else max_rss_bytes()


class MemoryMeter:
    """Peak memory of a run: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the process's
    peak RSS, reset at the start of the run where Linux allows (else a process's peak: one run per
    process, see ``run_isolated``). ``baseline`` is what was in use at the start."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.device = device
        if self.cuda:
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(torch.device(device))
            self.baseline = torch.cuda.memory_allocated(torch.device(device))
        else:
            gc.collect()
            self.reset = reset_peak_rss()
            self.baseline = current_rss_bytes()

    @property
    def kind(self) -> str:
        if self.cuda:
            return "cuda_max_memory_allocated"
        return "process_peak_rss" if self.reset else "process_peak_rss_since_start"

    def peak(self) -> int:
        if self.cuda:
            synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(torch.device(self.device)))
        return max_rss_bytes()
