"""The one projected step: everything that happens to one projected parameter in one optimizer step,
as a function over an explicit context (torch.optim's functional split: the
:class:`~gradproj.optim.engine.ProjectedOptimizer` keeps the bookkeeping, this module the maths).

Where the matrix lives (one process, FSDP2 rows, ...) is the context's placement
(:mod:`gradproj.optim.placement`); the step never asks. Per step, for ``W`` (m x n) and its gradient:

1. on the first step and whenever the group's refresh schedule says so (every ``update_proj_gap`` steps
   by default), recompute the basis from the full ``G`` (the projector) at the rank the group's rank
   allocator gives, and carry the moments into it (``on_refresh``: keep, reset, rotate);
2. ``R = down(G)``; the rule advances the moments with this process's share of ``R``: ``(u, s)``;
3. the update is ``combine(G, R, u)`` (GaLore's ``scale * up(u)``, plus Fira's or APOLLO's terms);
4. decoupled decay ``W *= 1 - lr * weight_decay``, then ``W -= s * update``.

Step 4 is the group's reparametrisation's (:class:`~gradproj.optim.component.Reparametrisation`): by default
the weight itself moves; a reparametrised group runs steps 1-3 on another tensor and rebuilds ``W`` from it.
The step features (:mod:`gradproj.optim.features`) are the context's ``features``; this module names none.

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
from .component import decay
from .features import Features, refresh_due
from .placement import Local
from .precision import widen
from .residuals import combine, replicated_state


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
    #: the step features the parameter's group chose (:func:`gradproj.optim.features.features_of`)
    features: Features
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
        """Whether this step recomputes the basis (:func:`gradproj.optim.features.refresh_due`)."""
        return refresh_due(self.state, self.group)

    def initial_counters(self) -> dict[str, int]:
        """The step counters, the refresh phase and the basis seed the parameter's state starts with."""
        seed = derive_seed(self.group["seed"], self.seed_key)
        return {"step": 0, "last_refresh": -1, "refresh_phase": self.phase, "proj_seed": seed, "refreshes": 0}


def init_state(ctx: ProjectedContext, weight: Tensor) -> None:
    """Step counters, the seed, each step feature's entries and zeroed moments of this process's share of ``R``."""
    state = ctx.state
    state.update(ctx.initial_counters())
    for feature in ctx.features:
        feature.init_state(ctx, weight)
    with ctx.placement.local_state(state, ctx.low_shape, ctx.replicated) as plain:
        ctx.rule.init_state(plain, ctx.placement.moment_shape(ctx.layout), weight, full_shape=ctx.low_shape)


def refresh(ctx: ProjectedContext, grad: Tensor, old: Bases) -> Bases:
    """A new basis from the full gradient; the moments follow ``on_refresh``."""
    state, group, place = ctx.state, ctx.group, ctx.placement
    first = state["last_refresh"] < 0
    resizes = ctx.features.allocator.refreshing(ctx)  # whether the allocated rank changed
    state["last_refresh"] = state["step"]
    state["refreshes"] = state.get("refreshes", 0) + 1  # checkpoints from before the counter start at 0
    ctx.features.schedule.refreshed(state)
    new = place.after_refresh(state, ctx.layout, fresh_basis(ctx, grad))
    if ctx.projector.cache:
        ctx.cache[ctx.key] = new
    new = ctx.widen(new)
    if resizes and group["on_refresh"] != "rotate":  # rotate maps the moments into the new rank itself
        ctx.features.allocator.resize(ctx)
    if first or group["on_refresh"] == "keep" or not ctx.projector.changes_basis:
        return new
    if group["on_refresh"] == "reset":
        with place.local_state(state, ctx.low_shape, ctx.replicated) as plain:
            ctx.rule.reset(plain)
        return new
    c_left, c_right = place.change_of_basis(old, new)
    with place.local_state(state, ctx.low_shape, ctx.replicated) as plain:
        ctx.projector.rotate_state(plain, c_left, c_right)  # what the projector keeps in R's coordinates
    with place.moments_for_rotation(ctx.rule, state, ctx.layout) as moments:  # a rule may keep either or both
        if "second" in moments:
            moments["second"] = rotate_second(moments["second"], c_left, c_right)
        if "first" in moments:
            moments["first"] = rotate_first(moments["first"], c_left, c_right)
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
    ctx.features.reparametrisation.step(ctx, weight, grad, low, low_rank_update)  # steps 1-3, then 4
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
        ctx.features.schedule.observe(ctx, low, grad)
    with place.local_state(state, ctx.low_shape, ctx.replicated) as plain:
        ctx.projector.observe(low, plain, layout, group, place)  # a tracking projector's running statistics
        u, step_size = ctx.rule.direction(place.share(low, layout.side), plain, group, weight, place)
        u = place.gather(u, layout.side, (low.shape[0], low.shape[1]))  # shaped like low
        update, phi = combine(grad, low, u, bases, layout.side, group, plain, shape=layout.shape, rows=place)  # m_i x n
    if probe is not None:
        # the residual term's norm after the limiter (a residual policy's): the limiter's state
        probe.sampled(ctx.name, state["step"], weight, grad, low, update, step_size, phi, state.get("residual_norm"))
    return update, step_size


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
