"""The one projected step: everything that happens to one projected parameter in one optimizer step,
as a function over an explicit context (torch.optim's functional split: the
:class:`~gradproj.optim.engine.ProjectedOptimizer` keeps the bookkeeping, this module the maths).

Where the matrix lives (one process, FSDP2 rows, ...) is the context's placement
(:mod:`gradproj.optim.placement`); the step never asks. Per step, for ``W`` (m x n) and its gradient:

1. on the first step and every ``update_proj_gap`` steps (at the matrix's own phase when the group
   staggers them; or when the basis keeps too little of ``G``, ``update_proj_gap="auto"``:
   :mod:`gradproj.optim.adaptive`), recompute the basis from the full ``G`` (the projector), and carry
   the moments into it (``on_refresh``: keep, reset, rotate);
2. ``R = down(G)``; the rule advances the moments with this process's share of ``R``: ``(u, s)``;
3. the update is ``combine(G, R, u)`` (GaLore's ``scale * up(u)``, plus Fira's or APOLLO's terms);
4. decoupled decay ``W *= 1 - lr * weight_decay``, then ``W -= s * update``.

A weight-normalised group (``weight_norm=True``, GradNormLoRP: :mod:`gradproj.optim.weight_norm`) runs
steps 1-3 on the direction ``v`` of ``W = g v / ||v||`` and its gradient, then steps ``g`` and rebuilds ``W``.

Probes (:class:`StepProbe`, e.g. :class:`gradproj.dynamics.Dynamics`) see refreshes and sampled steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..projection.bases import Bases, derive_seed
from ..projection.projectors import Layout, Projector
from ..projection.rotate import rotate_first, rotate_second
from ..projection.sides import low_rank_shape, project_down
from ..rules.base import UpdateRule, learning_rate
from . import adaptive, weight_norm
from .placement import Local
from .precision import widen
from .ranks import auto_rank, resized
from .residual import combine, replicated_state


class StepProbe(Protocol):
    """What the engine tells a probe (the dynamics sampler) about a projected parameter."""

    def wants(self, engine_step: int) -> bool: ...
    def refreshed(self, name: str, grad: Tensor, old: Bases, new: Bases, low_old: Tensor | None) -> None: ...
    def sampled(
        self,
        name: str,
        engine_step: int,
        weight: Tensor,
        grad: Tensor | None,
        low: Tensor,
        update: Tensor,
        step_size: float,
        phi: Tensor | None,
        residual_norm: Tensor | None = None,
    ) -> None: ...


class InBackwardStepping(Protocol):
    """A helper that steps every parameter inside ``backward`` (layer-wise); ``step()`` is then a no-op."""

    def detach(self) -> None: ...


def absent(bases: Bases) -> bool:
    """No basis yet (before the first refresh)."""
    return bases[0] is None and bases[1] is None


@dataclass
class ProjectedContext:
    """One projected parameter as the step sees it: its names, options, state, shape and placement."""

    name: str  #: for messages and probes
    seed_key: int  #: mixed with the group's ``seed`` into ``proj_seed``
    group: dict[str, Any]
    state: dict[str, Any]
    layout: Layout  #: the whole matrix's shape, rank, side, dtype, device
    projector: Projector
    rule: UpdateRule
    placement: Local
    cache: dict[Any, Bases]  #: materialized bases kept between refreshes (projectors with ``cache``)
    key: Any  #: this parameter's key in ``cache``
    probe: StepProbe | None = None
    #: the dtype the step computes in (float32 for bf16 weights; their bases are stored in bf16)
    compute: torch.dtype | None = None
    #: this step's refresh, computed on another rank and shared (:mod:`gradproj.optim.spread`): the
    #: entries the projector would write (:meth:`~gradproj.projection.projectors.Projector.fresh_entries`)
    prepared: dict[str, Tensor] | None = None
    #: steps into each ``update_proj_gap`` at which this matrix refreshes (:func:`refresh_phases`)
    phase: int = 0

    @property
    def replicated(self) -> tuple[str, ...]:
        """State keys every process keeps whole under a row split: per-column statistics of the rule,
        the projector and the residual policy."""
        return (
            *self.rule.replicated_state,
            *self.projector.replicated_state,
            *replicated_state(self.group, self.layout.side),
        )

    @property
    def low_shape(self) -> tuple[int, int]:
        """The whole ``R``'s shape."""
        return low_rank_shape(self.layout.shape, self.layout.rank, self.layout.side)

    def bases(self) -> Bases:
        """The current basis, as the placement uses it, in the step's dtype."""
        cached = self.cache.get(self.key) if self.projector.cache else None
        if cached is not None:
            return self.widen(cached)
        bases = self.placement.materialize(self.state, self.layout, self.projector)
        if self.projector.cache and not absent(bases):
            self.cache[self.key] = bases
        return self.widen(bases)

    def widen(self, bases: Bases) -> Bases:
        """``bases`` (stored in the weight's dtype) in the dtype the step computes in."""
        if self.compute is None:
            return bases
        return widen(bases[0], self.compute), widen(bases[1], self.compute)

    def refresh_due(self) -> bool:
        return refresh_due(self.state, self.group)


def refresh_due(state: dict[str, Any], group: dict[str, Any]) -> bool:
    """Whether a parameter with this state refreshes its basis on its next step: on its first step
    (no state, or no basis yet) and then whenever ``step - refresh_phase`` is a multiple of
    ``update_proj_gap`` (the phase is 0 unless the group staggers its refreshes), or, for
    ``update_proj_gap="auto"``, when its signal says so (:func:`gradproj.optim.adaptive.due`)."""
    if "last_refresh" not in state or state["last_refresh"] < 0:  # a gradient policy's keys may come first
        return True
    if adaptive.adaptive(group):
        return adaptive.due(state, group)
    return (state["step"] - state.get("refresh_phase", 0)) % group["update_proj_gap"] == 0


#: the trainer's ``--refresh-offset``: every matrix at phase 0 (galore-torch's schedule), or spread out
REFRESH_SCHEDULES = ("aligned", "staggered")


def refresh_phases(offset: int | str, count: int, gap: int) -> list[int]:
    """The refresh phase of each of a group's ``count`` matrices: ``offset`` itself for every one, or,
    for ``"staggered"``, phases spread evenly over the gap in the group's order (the ``j``-th of
    ``count`` refreshes ``floor(j * gap / count)`` steps into each gap), so that a step carries at most
    ``ceil(count / gap)`` refreshes instead of all of them. Every rank builds the same groups, so every
    rank agrees. An adaptive group (``gap="auto"``) has offset 0: each matrix keeps its own time anyway.

    >>> refresh_phases("staggered", 4, 200), refresh_phases(3, 2, 200)
    ([0, 50, 100, 150], [3, 3])
    """
    if offset == "staggered":
        return [j * gap // count for j in range(count)]
    return [int(offset)] * count


def initial_counters(ctx: ProjectedContext) -> dict[str, int]:
    """The step counters, the refresh phase and the basis seed a parameter's state starts with."""
    seed = derive_seed(ctx.group["seed"], ctx.seed_key)
    return {"step": 0, "last_refresh": -1, "refresh_phase": ctx.phase, "proj_seed": seed, "refreshes": 0}


def init_state(ctx: ProjectedContext, weight: Tensor) -> None:
    """Step counters, the seed, the adaptive refresh's signal and zeroed moments of this process's share of ``R``."""
    state = ctx.state
    state.update(initial_counters(ctx))
    if adaptive.adaptive(ctx.group):
        state.update(adaptive.initial_energy(weight.device))
    if weight_norm.normalized(ctx.group):
        weight_norm.init_state(state, weight, ctx.name)
    with ctx.placement.local_state(state, ctx.low_shape, ctx.replicated) as plain:
        ctx.rule.init_state(plain, ctx.placement.moment_shape(ctx.layout), weight, full_shape=ctx.low_shape)


def refresh(ctx: ProjectedContext, grad: Tensor, old: Bases) -> Bases:
    """A new basis from the full gradient; the moments follow ``on_refresh``."""
    state, group, place = ctx.state, ctx.group, ctx.placement
    first = state["last_refresh"] < 0
    resizes = auto_rank(group) and not first and state["rank"] != ctx.layout.rank
    if auto_rank(group):
        state["rank"] = ctx.layout.rank  # this refresh's allocation (:mod:`gradproj.optim.ranks`)
    state["last_refresh"] = state["step"]
    state["refreshes"] = state.get("refreshes", 0) + 1  # checkpoints from before the counter start at 0
    if adaptive.adaptive(group):
        adaptive.refreshed(state)
    new = place.after_refresh(state, ctx.layout, fresh_basis(ctx, grad))
    if ctx.projector.cache:
        ctx.cache[ctx.key] = new
    new = ctx.widen(new)
    if resizes and group["on_refresh"] != "rotate":  # rotate maps the moments into the new rank itself
        with place.local_state(state, ctx.low_shape, ctx.replicated) as plain:
            ctx.rule.set_moments(plain, {k: resized(v, ctx.low_shape) for k, v in ctx.rule.moments(plain).items()})
    if first or group["on_refresh"] == "keep" or not ctx.projector.changes_basis:
        return new
    if group["on_refresh"] == "reset":
        with place.local_state(state, ctx.low_shape, ctx.replicated) as plain:
            ctx.rule.reset(plain)
        return new
    c_left, c_right = place.change_of_basis(old, new)
    with place.local_state(state, ctx.low_shape, ctx.replicated) as plain:
        ctx.projector.rotate_state(plain, c_left, c_right)  # what the projector keeps in R's coordinates
    with place.moments_for_rotation(ctx.rule, state, ctx.layout) as moments:
        first_moment = moments.get("first")
        moments["second"] = rotate_second(moments["second"], c_left, c_right)
        if first_moment is not None:
            moments["first"] = rotate_first(first_moment, c_left, c_right)
    return new


def fresh_basis(ctx: ProjectedContext, grad: Tensor) -> Bases:
    """Store this refresh's basis (whole) in the state and return it: computed here from the whole
    gradient, or the one another rank computed (``ctx.prepared``)."""
    if ctx.prepared is not None:
        ctx.state.update(ctx.prepared)
        return ctx.projector.materialize(ctx.prepared, ctx.layout)
    place, projector = ctx.placement, ctx.projector
    full = place.full_gradient(grad) if projector.reads_gradient else grad  # a seeded basis reads no gradient
    with place.whole_bases(ctx.state, last_basis=projector.warm_starts) as whole:
        return projector.refresh(full, whole, ctx.layout, ctx.group)


def projected_step(ctx: ProjectedContext, weight: Tensor, grad: Tensor | None, low: Tensor | None = None) -> None:
    """Step ``weight`` (this process's part of it) with its gradient ``grad``, or with ``low``, the
    projected gradient summed over micro-batches (layer-wise accumulation, between refreshes)."""
    state = ctx.state
    if "step" not in state:
        init_state(ctx, weight)
    if not weight_norm.normalized(ctx.group):
        update, step_size = low_rank_update(ctx, weight, grad, low)
        decay(weight, ctx.group, decay_rate(ctx.rule, ctx.group, step_size))
        weight.add_(update, alpha=-step_size)
    else:  # GradNormLoRP: the projected step moves the direction v of W = g v / ||v||; then g, then W
        assert grad is not None, "a weight-normalised matrix always takes its full gradient (needs_full_gradient)"
        direction, grad_direction, grad_magnitude = weight_norm.split(weight, grad, state)
        update, step_size = low_rank_update(ctx, direction, grad_direction, None)
        direction.add_(update, alpha=-step_size)
        weight_norm.recompose(weight, direction, grad_magnitude, state, ctx.group, state["step"] + 1)
    state["step"] += 1


def low_rank_update(
    ctx: ProjectedContext, weight: Tensor, grad: Tensor | None, low: Tensor | None
) -> tuple[Tensor, float]:
    """Steps 1-3: refresh the basis when due, advance the rule on ``R`` and return ``(update, step_size)``
    for ``weight -= step_size * update`` (``low``: ``R`` itself, summed over micro-batches)."""
    state, group, layout, place = ctx.state, ctx.group, ctx.layout, ctx.placement
    bases = ctx.bases()
    probe = ctx.probe if ctx.probe is not None and ctx.probe.wants(state["step"]) else None
    if low is None:
        assert grad is not None
        if ctx.refresh_due():
            old = bases
            bases = refresh(ctx, grad, old)
            if ctx.probe is not None:  # every refresh is recorded, on a sampled step or not
                stale = None if absent(old) else project_down(grad, *old)
                ctx.probe.refreshed(ctx.name, grad, old, bases, stale)
                probe = ctx.probe
        low = place.down(grad, bases)  # the whole R (r x n, r x r) or this process's rows of it (m_i x r)
        if adaptive.measures(state, group):
            share = adaptive.captured_share(place, place.share(low, layout.side), grad)  # 0-d, on the device
            adaptive.record(state, share)
    with place.local_state(state, ctx.low_shape, ctx.replicated) as plain:
        ctx.projector.observe(low, plain, layout, group, place)  # Alice's tracking: the moving average of R R^T
        u, step_size = ctx.rule.direction(place.share(low, layout.side), plain, group, weight, place)
        u = place.gather(u, layout.side, (low.shape[0], low.shape[1]))  # shaped like low
        update, phi = combine(grad, low, u, bases, layout.side, group, plain, shape=layout.shape, rows=place)  # m_i x n
    if probe is not None:
        # the residual term's norm after the limiter (Fira, APOLLO, Alice's compensation): the limiter's state
        probe.sampled(ctx.name, state["step"], weight, grad, low, update, step_size, phi, state.get("residual_norm"))
    return update, step_size


def decay(weight: Tensor, group: dict[str, Any], rate: float) -> None:
    """Decoupled weight decay ``W *= 1 - rate * weight_decay`` (``rate``: :func:`decay_rate`)."""
    if group["weight_decay"] != 0:
        weight.mul_(1 - rate * group["weight_decay"])


def decay_rate(rule: UpdateRule, group: dict[str, Any], step_size: float) -> float:
    """The rate decoupled decay runs at: the group's ``lr``, or for a rule whose step size is relative
    (Adafactor's ``relative_step``) the step size it computed, as ``transformers.Adafactor`` decays."""
    return step_size if rule.relative_step(group) else learning_rate(group)


def full_step(
    rule: UpdateRule, placement: Local, weight: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]
) -> None:
    """A group without ``rank``: the rule in full (Adam rules: torch.optim.AdamW's arithmetic)."""
    whole = placement.whole_shape(weight)
    with placement.local_state(state, whole, rule.replicated_state) as plain:
        if "step" not in plain:
            init_full_state(rule, plain, weight, whole)
        if not rule.relative_step(group):
            decay(weight, group, learning_rate(group))
            rule.apply_full(weight, grad, plain, group, placement)
        else:  # the decay rate is the step size the rule computes
            u, step_size = rule.direction(grad, plain, group, weight, placement)
            decay(weight, group, step_size)
            weight.add_(u.to(weight.dtype), alpha=-step_size)
        plain["step"] += 1


def init_full_state(rule: UpdateRule, state: dict[str, Any], weight: Tensor, whole: tuple[int, ...]) -> None:
    """A group without ``rank``: the step counter and the rule's zeroed state for this process's ``weight``."""
    state["step"] = 0
    rule.init_state(state, tuple(weight.shape), weight, full_shape=whole)
