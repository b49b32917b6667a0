"""Whole-matrix directions spread over the ranks (FSDP2): Muon's orthogonalizations of several matrices run at
the same time, each on another rank, instead of one after another.

A rule whose direction is a function of the whole matrix (:meth:`~gradproj.rules.base.UpdateRule.whole_input`:
Muon's Newton-Schulz iterations of its Nesterov momentum) reads, under FSDP2's row split, a matrix no rank
holds. Stepped alone, each matrix is gathered on one rank and its rows sent back while the others wait
(:mod:`gradproj.optim.whole_matrix`). Before a step, :func:`spread_whole` instead:

1. asks each due matrix's rule for the matrix it will read and the function it will apply, without advancing
   its state (the step advances it, and computes the same bits);
2. orders the matrices by cost (``m * n * min(m, n)``, largest first) in rounds of ``world``, each rank owning
   one matrix a round, in snake order (as the refreshes are dealt: :func:`gradproj.optim.spread.rounds`);
3. gathers each matrix on its owner, lets every owner compute at once, and scatters each rank its rows;
4. leaves each rank's rows with the matrix's placement, whose ``whole`` returns them when the step asks.

The owner computes the same function of the same matrix as one process, so the step's bits do not change.
Matrices whose ``R`` must first be projected (a basis to refresh: the subspace Muon) take the one-by-one path.

Example (one process: nothing is row-sharded, nothing to spread):
    >>> spread_whole([])
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..rules.base import UpdateRule
from .component import Reparametrisation
from .placement import RowSharded, is_sharded, local
from .precision import compute_dtype
from .spread import Due, rounds
from .step import ProjectedContext
from .whole_matrix import scatter_rows


def reads_whole(rule: UpdateRule) -> bool:
    """Whether ``rule``'s direction takes a function of the whole matrix (it implements ``whole_input``)."""
    return type(rule).whole_input is not UpdateRule.whole_input


def spreadable(ctx: ProjectedContext) -> bool:
    """A row-sharded matrix over more than one rank whose rule reads it whole, stepped on ``R = G`` itself
    (nothing to project or refresh first) by the default reparametrisation (the weight moves itself)."""
    place = ctx.placement
    return (
        isinstance(place, RowSharded)
        and place.world > 1
        and ctx.layout.side == "none"
        and type(ctx.features.reparametrisation) is Reparametrisation
        and "step" in ctx.state  # the first step creates the state: it takes the one-by-one path
    )


def due_whole(engine: Any) -> list[Due]:
    """This step's matrices :func:`spreadable` admits, in the groups' order (the same on every rank)."""
    due = []
    for group in engine.param_groups:
        if "rank" not in group or not reads_whole(engine.rule_of(group)):
            continue
        for p in group["params"]:
            if p.grad is None or not is_sharded(p):
                continue
            ctx = engine.context(p)
            if spreadable(ctx):
                due.append((p, ctx, local(p.grad).to(compute_dtype(p.dtype))))  # as the step widens it
    return due


def spread_whole(due: list[Due]) -> None:
    """Compute each due matrix's whole-matrix function on one rank, all ranks at once; each placement keeps its
    rows for the step (``RowSharded.prepared``)."""
    pending: list[tuple[RowSharded, Tensor, Any, int]] = []
    for round_ in rounds(due):
        inputs = []
        for _, ctx, grad in round_:
            with ctx.placement.local_state(ctx.state, ctx.low_shape, ctx.replicated) as plain:
                found = ctx.rule.whole_input(grad, plain, ctx.group)
            assert found is not None, "due_whole admits rules that read a whole matrix only"
            inputs.append((ctx, *found))
        whole = [_rows(ctx).gather_to(x, owner) for owner, (ctx, x, _) in enumerate(inputs)]
        for owner, (ctx, x, fn) in enumerate(inputs):
            place = _rows(ctx)
            gathered = whole[owner]()  # the owner's whole matrix; the others' sends are done
            result = fn(gathered).to(x.dtype) if gathered is not None else None
            out, work = scatter_rows(result, place.shape[0], x, place.group, owner, place.world)
            pending.append((place, out, work, x.shape[0]))
    for place, out, work, rows in pending:
        work.wait()
        place.prepared = out[:rows]


def _rows(ctx: ProjectedContext) -> RowSharded:
    assert isinstance(ctx.placement, RowSharded), "spreadable() admits row-sharded matrices only"
    return ctx.placement
