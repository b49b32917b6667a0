"""Adaptive refresh (``update_proj_gap="auto"``): each projected matrix refreshes its basis when the
basis has gone stale by its own measure, not on a fixed schedule.

The signal is the share of the gradient's energy the basis keeps, ``e = ||R||^2 / ||G||^2`` with
``R = down(G)`` (the projection the step computes anyway; ``||G||^2`` is one more pass over ``G``).
Its reference ``e_ref`` is the share on the step after a refresh: the fresh basis on a gradient it was
not fitted to (on the gradient it was computed from, a basis keeps the most any rank-``r`` basis can,
and in a layer whose gradient is mostly noise the very next gradient keeps far less, however fresh
the basis). A matrix refreshes on the first step at which

* at least ``min_gap`` steps have passed since its last refresh and the share measured at the last
  check fell below ``energy_threshold * e_ref``, or
* ``max_gap`` steps have passed (the fixed schedule's cap; also what bounds a signal that cannot fall,
  such as a gradient that was already projected before the optimizer saw it).

The threshold is relative to ``e_ref`` because layers differ in how much of their gradient a rank-``r``
basis can keep (an MLP ``down_proj`` with a high stable rank keeps less than ``v_proj``, docs/DYNAMICS.md):
an absolute threshold would refresh the first at every ``min_gap`` and the second never.

Cost and syncs: the share is measured on the step after each refresh and on *check* steps, the
steps whose index ``t`` has ``(t + 1) % check_every == 0`` (the same steps for every matrix), once
``min_gap`` is near. It stays on
the device (a 0-d tensor in the state) until the next step, where the engine reads every matrix's
check in one transfer (:func:`read_checks`), so a step has no host sync of its own and a check step one
for the whole model. Layer-wise stepping reads each matrix's check on its own (one sync per matrix per
check). Under FSDP2 the two squared norms are summed over the ranks before the division, so every rank
holds the same share and makes the same decision; under DDP every rank has the same reduced gradient.

The decision is kept in the state as plain numbers and tensors (``energy_ref``, ``energy_now``,
``energy_unread``, ``refresh_pending``), so a resumed run continues in lockstep.

Example:
    >>> import torch, gradproj
    >>> import math
    >>> w = torch.nn.Parameter(torch.zeros(16, 12))
    >>> auto = {"update_proj_gap": "auto", "min_gap": 2, "max_gap": 8, "check_every": 2}
    >>> opt = gradproj.GaLoreAdamW([{"params": [w], "rank": 1, **auto}], lr=1e-2)
    >>> for t in range(12):  # a rank-1 gradient whose row space turns 0.3 rad a step
    ...     turning = torch.zeros(12)
    ...     turning[0], turning[1] = math.cos(0.3 * t), math.sin(0.3 * t)
    ...     w.grad = torch.outer(torch.ones(16), turning)
    ...     opt.step()
    >>> opt.state[w]["refreshes"]  # steps 0, 4 and 8: each basis kept 42% of its reference by its check
    3
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..options import count_or, defaults_of, integer_at_least, option, view
from ..rules.base import AllRows, UpdateRule
from .component import RefreshSchedule

if TYPE_CHECKING:
    from .step import ProjectedContext

#: the ``update_proj_gap`` value that turns adaptive refresh on
AUTO = "auto"


@dataclass(frozen=True)
class AdaptiveOptions:
    """An adaptive group's options: the settings of the best of our first measurements (docs/ALGORITHMS.md);
    ``max_gap`` is the fixed schedule's default gap. Validated on construction (each error names the value).

    >>> AdaptiveOptions(min_gap=50, max_gap=20)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: min_gap=50 > max_gap=20; an adaptive refresh waits at least min_gap and at most max_gap steps ...
    """

    min_gap: int = option(10, help="fewest steps between two refreshes", minimum=1)
    max_gap: int = option(200, help="most steps between two refreshes", minimum=1)
    energy_threshold: float = option(
        0.9,
        help="refresh once the basis keeps less than this fraction of the energy share it kept on the step after "
        "its refresh, in (0, 1)",
        above=0,
    )
    check_every: int = option(10, help="measure the kept share every this many steps", minimum=1)

    def __post_init__(self) -> None:
        integer_at_least("min_gap", self.min_gap, 1)
        integer_at_least("max_gap", self.max_gap, 1)
        if self.min_gap > self.max_gap:
            raise ValueError(
                f"min_gap={self.min_gap} > max_gap={self.max_gap}; an adaptive refresh waits at least min_gap and "
                "at most max_gap steps (use min_gap <= max_gap)"
            )
        integer_at_least("check_every", self.check_every, 1)
        threshold = self.energy_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            raise ValueError(
                f"energy_threshold={threshold!r} is not valid; expected a number in (0, 1): the share of the fresh "
                "basis' captured energy below which a matrix refreshes"
            )


#: the keys an adaptive group adds (with their defaults, filled into every projected group)
ADAPTIVE_DEFAULTS: dict[str, Any] = defaults_of(AdaptiveOptions)


#: an ``update_proj_gap`` written as text: a number of steps, or ``auto``
parse_gap = count_or(AUTO, "parse_gap")


class AdaptiveGap(RefreshSchedule):
    """``update_proj_gap="auto"``: each matrix refreshes when its basis keeps too little (the module's rule)."""

    name = "adaptive"
    value = AUTO
    options_type = AdaptiveOptions

    def due(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        return due(state, group)

    def refreshed(self, state: dict[str, Any]) -> None:
        refreshed(state)

    def observe(self, ctx: ProjectedContext, low: Tensor, grad: Tensor) -> None:
        if measures(ctx.state, ctx.group):
            place = ctx.placement
            record(ctx.state, captured_share(place, place.share(low, ctx.layout.side), grad))  # 0-d, on the device

    def needs_full_gradient(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        return measures(state, group)  # ||G|| is read on the steps the share is measured on

    def skips_fast(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        return measures(state, group)  # the per-parameter step measures the share

    def init_state(self, ctx: ProjectedContext, weight: Tensor) -> None:
        ctx.state.update(initial_energy(weight.device))

    def state_bytes(self, shape: tuple[int, ...], group: dict[str, Any], dtype: torch.dtype) -> int:
        return 2 * dtype.itemsize  # the reference share and the last check, in the step's dtype

    def plan(self, engine: Any, groups: Any, plan: Any) -> None:
        """The last check step's shares of every adaptive matrix, read back at once (one sync)."""
        read_checks((engine.state[p], g) for g in groups for p in g["params"] if "step" in engine.state[p])

    def check(self, group: dict[str, Any]) -> None:
        check_gap(group)

    def conflict(self, group: dict[str, Any], rule: UpdateRule | None) -> str | None:
        if group["projector"] == "identity":
            return "update_proj_gap='auto' refreshes a basis that keeps too little; projector='identity' keeps all of G"
        return None


def check_gap(group: dict[str, Any]) -> None:
    """``update_proj_gap`` (an int >= 1, or ``"auto"``) and the adaptive refresh's keys."""
    gap = group["update_proj_gap"]
    if gap != AUTO and (isinstance(gap, bool) or not isinstance(gap, int) or gap < 1):
        raise ValueError(f"update_proj_gap={gap!r} is not valid; expected an integer >= 1 or {AUTO!r}")
    view(AdaptiveOptions, group)
    if gap == AUTO and group["refresh_offset"] != 0:
        raise ValueError(
            f"refresh_offset={group['refresh_offset']!r} applies to a fixed update_proj_gap; with 'auto' each "
            "matrix refreshes on its own signal (use refresh_offset=0)"
        )


def adaptive(group: dict[str, Any]) -> bool:
    """Whether ``group`` refreshes on its signal (``update_proj_gap="auto"``)."""
    return group.get("update_proj_gap") == AUTO


def initial_energy(device: torch.device) -> dict[str, Any]:
    """The signal's state before the first refresh: tensors on the weight's device, and two flags."""
    one = torch.ones((), dtype=torch.float32, device=device)
    return {"energy_ref": one, "energy_now": one.clone(), "energy_unread": 0, "refresh_pending": 0}


def captured_share(place: AllRows, share: Tensor, grad: Tensor) -> Tensor:
    """``||R||^2 / ||G||^2`` of the whole matrix, a 0-d tensor (float32, or float64) on the device: ``share`` is this
    process's part of ``R`` (its rows when ``R`` is whole on every rank, so that no row counts twice),
    ``grad`` its rows of ``G``; ``place`` sums both over the ranks that hold the matrix (on one process,
    nothing to sum)."""
    wide = torch.promote_types(grad.dtype, torch.float32)  # float64 stays float64 (the twins' tests)
    parts = torch.stack([share.to(wide).pow(2).sum(), grad.to(wide).pow(2).sum()])  # (2,)
    parts = place.total(parts)
    return parts[0] / parts[1].clamp_min(torch.finfo(torch.float32).tiny)


def measures(state: dict[str, Any], group: dict[str, Any]) -> bool:
    """Whether this step measures the share: the step after a refresh (the reference), or a check step
    (one whose next step may refresh)."""
    if not adaptive(group) or "last_refresh" not in state or state["last_refresh"] < 0:
        return False
    step, last = state["step"], state["last_refresh"]
    if step == last + 1:
        return True
    options = view(AdaptiveOptions, group)
    return step > last + 1 and (step + 1) % options.check_every == 0 and step + 1 - last >= options.min_gap


def refreshed(state: dict[str, Any]) -> None:
    """A new basis: no decision is pending until its reference and a check are measured."""
    state["energy_unread"] = state["refresh_pending"] = 0


def record(state: dict[str, Any], share: Tensor) -> None:
    """Keep this step's share: the reference on the step after a refresh, or a check awaiting its read."""
    if "energy_ref" not in state:  # a state saved under a fixed gap, loaded into an adaptive group
        state.update(initial_energy(share.device))
    if state["step"] == state["last_refresh"] + 1:
        state["energy_ref"] = share
    else:
        state["energy_now"] = share
        state["energy_unread"] = 1


def due(state: dict[str, Any], group: dict[str, Any]) -> bool:
    """Whether an adaptive matrix (past its first refresh) refreshes on this step."""
    since, options = state["step"] - state["last_refresh"], view(AdaptiveOptions, group)
    if since >= options.max_gap:
        return True
    if since < options.min_gap:
        return False
    if state.get("energy_unread"):
        read_one(state, group)  # the engine has read every check of the step at once before this
    return bool(state.get("refresh_pending", 0))  # a state saved under a fixed gap has no signal yet


def read_one(state: dict[str, Any], group: dict[str, Any]) -> None:
    """One matrix's unread check (layer-wise stepping: one sync per matrix per check)."""
    read_checks([(state, group)])


def read_checks(pending: Iterable[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """Turn every unread check into a decision, with one host transfer per device."""
    unread = [(s, g) for s, g in pending if s.get("energy_unread")]
    by_device: dict[torch.device, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for state, group in unread:
        by_device.setdefault(state["energy_now"].device, []).append((state, group))
    for pairs in by_device.values():
        ratios = torch.stack([s["energy_now"] / s["energy_ref"].clamp_min(1e-30) for s, _ in pairs]).tolist()
        for (state, group), ratio in zip(pairs, ratios, strict=True):
            state["refresh_pending"] = int(ratio < view(AdaptiveOptions, group).energy_threshold)
            state["energy_unread"] = 0
