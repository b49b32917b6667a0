"""Refreshes spread over the ranks (FSDP2): each rank computes about ``1/world`` of the new bases and
sends them to the others, instead of every rank gathering every gradient and repeating every SVD.

On a step where projected matrices refresh, before any of them steps, :func:`spread_refreshes`:

1. orders the due matrices by the cost of their refresh (``m * n * min(m, n)``, largest first) and cuts
   them into rounds of ``world`` matrices; in a round each rank owns one (in snake order, so the largest
   matrices of successive rounds go to different ranks);
2. gathers each matrix's rows on its owner only (``dist.gather``: one whole gradient per rank and
   round, as the unspread refresh holds, and no rank receives a gradient it does not own);
3. lets every owner run the projector on its matrix (all ranks at once);
4. broadcasts what each projector wrote (its
   :meth:`~gradproj.projection.projectors.Projector.fresh_entries`: whole bases, or the DCT's indices)
   from the owner; the step then stores them as if computed here (``ctx.prepared``, read by
   :func:`gradproj.optim.step.fresh_basis`).

The owner runs the same projector on the same gathered gradient as every rank did before, and the
others receive its bits, so the result is the unspread one bit for bit. Projectors that read no
gradient (``random``, ``identity``) are not spread: they gather nothing. microsoft/dion spreads its
orthogonalization over ranks in the same way.

Example (one process: a group of one has nothing to spread):
    >>> spread_refreshes([])
    {}
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .features import refresh_due
from .placement import RowSharded, is_sharded, local
from .precision import compute_dtype
from .step import ProjectedContext

#: one due refresh: the parameter (its key in the result), its context, this rank's rows of its gradient
Due = tuple[Any, ProjectedContext, Tensor]


def spreadable(ctx: ProjectedContext) -> bool:
    """Whether a refresh of ``ctx``'s matrix can be computed on one rank for all: a row-sharded matrix
    over more than one rank whose projector reads the gradient."""
    place = ctx.placement
    return isinstance(place, RowSharded) and place.world > 1 and ctx.projector.reads_gradient


def due_refreshes(engine: Any) -> list[Due]:
    """This step's due refreshes of row-sharded matrices that :func:`spreadable` admits, in the groups' order
    (the same on every rank); ``engine``: the :class:`~gradproj.optim.engine.ProjectedOptimizer`."""
    due = []
    for group in engine.param_groups:
        for p in group["params"] if "rank" in group else ():
            if p.grad is None or not is_sharded(p) or not refresh_due(engine.state[p], group):
                continue
            ctx = engine.context(p)
            if spreadable(ctx):
                due.append((p, ctx, local(p.grad).to(compute_dtype(p.dtype))))  # as the step widens it
    return due


def spread_refreshes(due: list[Due]) -> dict[Any, dict[str, Tensor]]:
    """The fresh state entries of every matrix in ``due`` (each :func:`spreadable`, in the same order on
    every rank), each computed by one rank and broadcast; keyed by the parameter."""
    prepared: dict[Any, dict[str, Tensor]] = {}
    pending: list[Any] = []
    for round_ in rounds(due):
        whole = [_rows(ctx).gather_to(grad, owner) for owner, (_, ctx, grad) in enumerate(round_)]
        views = [_view(ctx) for _, ctx, _ in round_]  # collective if the projector warm-starts
        for owner, (key, ctx, _) in enumerate(round_):
            gradient = whole[owner]()  # the owner's whole gradient; the others' sends are done
            entries = _refreshed(ctx, gradient, views[owner]) if gradient is not None else _buffers(ctx)
            pending += _rows(ctx).broadcast_from(list(entries.values()), owner)
            prepared[key] = entries
    for work in pending:
        work.wait()
    return prepared


def rounds(due: list[Due]) -> Iterator[list[Due]]:
    """``due`` by shard group (in order of first appearance), largest refresh first, in rounds of ``world``;
    the snake order gives each rank the largest matrix of every other round."""
    by_group: dict[int, list[Due]] = {}
    for item in due:
        by_group.setdefault(id(_rows(item[1]).group), []).append(item)
    for items in by_group.values():
        world = _rows(items[0][1]).world
        items = sorted(items, key=lambda item: -_cost(item[1]))  # stable: ties keep the parameters' order
        for k, start in enumerate(range(0, len(items), world)):
            round_ = items[start : start + world]
            yield round_[::-1] if k % 2 else round_


def _rows(ctx: ProjectedContext) -> RowSharded:
    assert isinstance(ctx.placement, RowSharded), "spreadable() admits row-sharded matrices only"
    return ctx.placement


def _cost(ctx: ProjectedContext) -> int:
    m, n = ctx.layout.shape
    return m * n * min(m, n)


def _view(ctx: ProjectedContext) -> dict[str, Any]:
    """The state a refresh reads (a parameter's first step: its initial counters)."""
    if not ctx.state:
        return ctx.initial_counters()
    return ctx.placement.whole_view(ctx.state, last_basis=ctx.projector.warm_starts)


def _refreshed(ctx: ProjectedContext, gradient: Tensor, view: dict[str, Any]) -> dict[str, Tensor]:
    """Run the projector on the whole gradient; what it wrote into the state, in ``fresh_entries`` order."""
    before = dict(view)
    ctx.projector.refresh(gradient, view, ctx.layout, ctx.group)
    written = {key: value for key, value in view.items() if value is not before.get(key)}
    expected = ctx.projector.fresh_entries(ctx.layout)
    entries = {key: written.pop(key, None) for key in expected}
    shapes = {key: None if t is None else (tuple(t.shape), t.dtype) for key, t in entries.items()}
    if written or shapes != expected:  # the other ranks allocated what fresh_entries promised
        raise RuntimeError(
            f"{ctx.name}: the {ctx.projector.name!r} projector wrote {sorted(set(written) | set(entries))} "
            f"({shapes}), not its fresh_entries {expected}"
        )
    return {key: t.contiguous() for key, t in entries.items()}  # type: ignore[union-attr]


def _buffers(ctx: ProjectedContext) -> dict[str, Tensor]:
    """Empty tensors for the owner's broadcast of ``ctx``'s fresh entries."""
    device = ctx.layout.device
    return {
        key: torch.empty(shape, dtype=dtype, device=device)
        for key, (shape, dtype) in ctx.projector.fresh_entries(ctx.layout).items()
    }
