"""The planner against the run: every run records what :mod:`gradproj.memory` planned for its flags
and what one measured step held (``summary.json``'s ``"memory"``), and on CUDA refuses to start a
run whose plan does not fit the device (the pre-flight check).

Measured, on the second step (the first one with optimizer state; the first if the run has one):

- weights: the model's parameters as PyTorch's ``MemTracker`` sees them at the step's peak;
- gradients: the gradient tensors alive before the step (layer-wise: the stepper's measured peak);
- optimizer state: every tensor in the optimizer's state after the step;
- activations: the most bytes ``MemTracker`` counts as activations and temporaries at once during
  the first micro-batch's forward and backward;
- peak: ``MemTracker``'s peak of every tensor on the device over the step, the task's own data
  (the tokenized corpus) left out as the planner does (CPU), or
  ``torch.cuda.max_memory_allocated`` over the run so far (CUDA). Not RSS: tensors only.

Example:
    >>> format_memory({"planned": {"weights": 2**20, "gradients": 0, "optimizer_state": 0, "activations": None,
    ...     "peak": 2**21}, "measured": {"weights": 2**20, "gradients": 0, "optimizer_state": 0,
    ...     "activations": 2**20, "peak": 2**21}})
    'planned/measured MiB: weights 1.0/1.0, gradients 0.0/0.0, state 0.0/0.0, activations -/1.0, peak 2.0/2.0'
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

#: the byte counts every run records, planned and measured
FIELDS = ("weights", "gradients", "optimizer_state", "activations", "peak")


def planned(setup: Any, model: nn.Module) -> dict[str, int | None]:
    """What :func:`gradproj.memory.plan_model` plans for ``model`` under ``setup`` (None: not modelled)."""
    from ..memory import plan_model, planned_activations

    plan = plan_model(model, setup)
    modelled = planned_activations(model, setup) is not None
    return {
        "weights": plan.weights,
        "gradients": plan.gradients,
        "optimizer_state": plan.optimizer,
        "activations": plan.activations if modelled else None,
        "peak": plan.peak if modelled else None,
    }


class StepMemoryMeter:
    """Measures one training step (:data:`FIELDS`) with PyTorch's ``MemTracker`` (and CUDA's allocator)."""

    def __init__(self, device: torch.device, step: int) -> None:
        if device.type == "cuda" and device.index is None:  # MemTracker names devices with their index
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.step = device, step  #: the step measured (1-based)
        self.measured: dict[str, int] = {}
        self._tracker: Any = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def wants(self, step: int) -> bool:
        return step == self.step and not self.measured

    @contextlib.contextmanager
    def measure(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, resident: tuple[torch.Tensor, ...] = ()
    ) -> Iterator[None]:
        """Track every tensor during the step run inside; ``resident`` are the task's own tensors (the
        tokenized corpus: batches are views of it), counted apart and left out of the peak."""
        tracker = self._tracker = _tracker()
        tracker.track_external(model, optimizer, *resident)
        format_warning = warnings.formatwarning  # torch's module tracker replaces it for the whole process
        with tracker, warnings.catch_warnings():
            # its gradient hook also runs for gradients that layer-wise stepping already freed (None): harmless
            warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")
            # its module tracker warns when a module is entered again before autograd told it the last use
            # ended (a forward without gradients, a second micro-batch); the bytes it counts do not depend on
            # that bookkeeping (measured against the plan in tests/test_memory_truth.py), and the user can
            # do nothing about it
            warnings.filterwarnings("ignore", message="The module hierarchy tracking maybe be messed up")
            try:
                yield
            finally:
                warnings.formatwarning = format_warning
        peak = self._snapshot("peak")
        from ..optim.placement import is_sharded, local_bytes

        if any(is_sharded(p) for p in model.parameters()):  # FSDP2: the resident shards (gathered copies: peak)
            self.measured["weights"] = sum(local_bytes(p) for p in model.parameters())
        else:
            self.measured["weights"] = peak.get("PARAM", 0)
        self.measured["optimizer_state"] = _state_bytes(optimizer)
        if self.device.type == "cuda":
            self.measured["peak"] = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.measured["peak"] = peak.get("Total", 0) - peak.get("OTH", 0)
        self._tracker = None

    def after_backward(self, model: nn.Module, first_micro_batch: bool, stepper: Any) -> None:
        """Called after each micro-batch's backward of the measured step."""
        if self._tracker is None:
            return
        if first_micro_batch:  # the most activations and temporaries alive at once (not at the step's peak)
            self.measured["activations"] = int(self._tracker.activation_peak.get(self.device, 0))
        self._tracker.reset_mod_stats()  # the next micro-batch's forward is a new iteration to MemTracker
        if stepper is not None:
            self.measured["gradients"] = int(stepper.peak_gradient_bytes)
        else:
            from ..optim.placement import local  # FSDP2: this rank's shard of each gradient

            shards = [local(p.grad) for p in model.parameters() if p.grad is not None]
            grads = {g.untyped_storage().data_ptr(): g for g in shards}
            self.measured["gradients"] = sum(g.untyped_storage().nbytes() for g in grads.values())

    def _snapshot(self, kind: str) -> dict[str, int]:
        snapshot = self._tracker.get_tracker_snapshot(kind).get(self.device, {})
        return {str(key).split(".")[-1]: int(value) for key, value in snapshot.items()}


def _tracker() -> Any:
    """A ``MemTracker`` that also keeps the most activation and temporary bytes alive at once per
    device: its own peak snapshot is taken where the total peaks, which with checkpointing can be the
    end of backward (every gradient, few activations)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.activation_peak: dict[torch.device, int] = {}

        def _update_peak_stats(self, peak_state: Any) -> None:  # after every op MemTracker dispatches
            super()._update_peak_stats(peak_state)
            for device, snapshot in self._curr_mem_snap.items():
                used = sum(v for k, v in snapshot.items() if str(k).split(".")[-1] in ("ACT", "TEMP"))
                if used > self.activation_peak.get(device, 0):
                    self.activation_peak[device] = used

    return Tracker()


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    from .logs import optimizer_state_bytes

    return optimizer_state_bytes(optimizer)


def format_memory(memory: dict[str, Any]) -> str:
    """One line: planned/measured MiB per field (``-`` where not planned or not measured)."""
    names = {"optimizer_state": "state"}
    cells = []
    for key in FIELDS:
        plan, seen = memory["planned"].get(key), memory["measured"].get(key)
        cells.append(f"{names.get(key, key)} {_mib(plan)}/{_mib(seen)}")
    return "planned/measured MiB: " + ", ".join(cells)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def preflight(setup: Any, needed: int, free: int) -> None:
    """Refuse a run whose planned peak (``needed`` bytes) exceeds the device's ``free`` bytes: one line
    naming both and the cheapest flags that would make it fit (from the planner)."""
    if needed <= free:
        return
    fixes = cheapest_fits(setup, free)
    advice = f"; it fits with {fixes}" if fixes else "; no combination of the memory flags makes it fit"
    raise ValueError(
        f"the plan needs {needed / 2**30:.2f} GiB at its peak but the device has {free / 2**30:.2f} GiB free{advice} "
        "(gradproj memory shows the plan; --no-preflight starts anyway)"
    )


def cheapest_fits(setup: Any, free: int) -> str | None:
    """The fewest memory flags (then the smallest peak) under which ``setup``'s plan fits in ``free``
    bytes: ``--layerwise``, the method's 8-bit sibling, ``--activation-checkpointing``, and a micro-batch
    of 1 with the same batch through ``--grad-accum``."""
    import itertools
    from dataclasses import replace

    from ..memory import meta_model, plan_model
    from ..optim.registry import get_method

    options: list[tuple[str, dict[str, Any]]] = [("--layerwise", {"layerwise": True})]
    eight_bit = get_method(setup.optimizer).eight_bit
    if eight_bit is not None:
        options.append((f"--optimizer {eight_bit}", {"optimizer": eight_bit}))
    options.append(("--activation-checkpointing", {"activation_checkpointing": True}))
    if setup.batch > 1:
        accum = setup.batch * setup.grad_accum
        options.append((f"--batch-size 1 --grad-accum {accum}", {"batch": 1, "grad_accum": accum}))
    model = meta_model(setup)
    best: tuple[int, int, str] | None = None
    for count in range(1, len(options) + 1):
        for chosen in itertools.combinations(options, count):
            changes = {k: v for _, change in chosen for k, v in change.items()}
            trial = replace(setup, **changes)
            if "optimizer" in changes and trial.optim is not None:
                trial = replace(trial, optim=replace(trial.optim, name=changes["optimizer"]))
            peak = plan_model(model, trial).peak
            if peak <= free and (best is None or (count, peak) < best[:2]):
                best = (count, peak, " ".join(flag for flag, _ in chosen) + f" ({peak / 2**30:.2f} GiB)")
        if best is not None:
            return best[2]
    return None
