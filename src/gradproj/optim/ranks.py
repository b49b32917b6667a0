"""Energy-allocated ranks within a state budget (``rank="auto"``): at a refresh, each projected matrix
takes the smallest rank that keeps ``energy_target`` of its gradient's energy, as far as the group's
``state_budget`` (bytes, shared by the group's matrices) allows, the largest marginal energy per byte first.

At a refresh the projector's basis is computed at the matrix's cap (``max_rank``, or its smaller side);
its ``k``-th direction keeps the share ``s_k = ||p_k^T G||^2 / ||G||^2`` of the gradient's energy (for the
SVD ``s_k = sigma_k^2 / ||G||^2``, descending). One more rank costs ``c`` bytes of state (a basis
column and the moments' row: ``(d_basis + 2 d_other)`` numbers for Adam), so its worth is ``s_{r+1} / c``.
:func:`allocate` starts every matrix at rank 1 and hands out ranks in that order, each matrix up to its
*demand* (the smallest ``r`` whose shares sum to ``energy_target``), while the budget lasts. The shares
are relative, so a matrix whose gradient is small is not starved: what counts is how much of *its own*
gradient one more direction keeps.

Matrices refresh on their own schedules (``update_proj_gap="auto"``), so a step's due matrices are
allocated against the others' last spectra: the greedy pass over every matrix gives each its target,
and the due ones take their targets within what the others hold now (a matrix whose target fell keeps
its rank until its own refresh, when it gives the difference back). With a fixed gap every matrix
refreshes on the same steps and this is the one greedy pass over the model. The group never holds
more than its budget: each matrix's bytes at its rank include its spectrum (kept for the later passes).

The new basis is the first ``r`` directions of the one computed at the cap (for ``svd`` exactly the
basis a fixed rank ``r`` computes). The moments follow ``on_refresh``: ``rotate`` maps them with the
rectangular ``C = P_new^T P_old``; ``keep`` and ``reset`` truncate or zero-pad them along the rank
(:func:`resized`). The state keeps the rank (``rank``, an int) and the spectrum
(``rank_spectrum``, a tensor), so a resumed run allocates exactly as the uninterrupted one.

Example:
    >>> import torch
    >>> shares = [torch.tensor([0.5, 0.3, 0.1]), torch.tensor([0.9, 0.05, 0.01])]
    >>> allocate(shares, costs=[10, 10], bases=[0, 0], budget=40, target=0.99)  # 0.3 and 0.1 beat 0.05
    [3, 1]
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..options import count_or, integer_at_least, option, view
from ..projection.projectors import RANKED, Layout, Projector, get_projector, layout_of
from ..rules.base import UpdateRule
from .component import Engine, RankAllocator, StepPlan
from .placement import local
from .precision import compute_dtype
from .residuals import RESIDUALS

if TYPE_CHECKING:
    from .step import ProjectedContext

#: the ``rank`` value that turns energy-allocated ranks on
AUTO_RANK = "auto"


@dataclass(frozen=True)
class RankOptions:
    """A ``rank="auto"`` group's options. ``state_budget`` is required there (bytes; the trainer also takes a
    fraction of a fixed rank's state: :func:`parse_budget`).

    >>> RankOptions(energy_target=1.5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: energy_target=1.5 is not valid; expected a number in (0, 1]: ...
    """

    state_budget: int | None = option(None, help="bytes of optimizer state the group's matrices may hold together")
    max_rank: int = option(256, help="most rank one matrix takes (nor more than its smaller side)", minimum=1)
    energy_target: float = option(
        0.99, help="a matrix takes no more rank than keeps this share of its gradient's energy, in (0, 1]", above=0
    )

    def __post_init__(self) -> None:
        integer_at_least("max_rank", self.max_rank, 1)
        target = self.energy_target
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
            raise ValueError(
                f"energy_target={target!r} is not valid; expected a number in (0, 1]: the share of its gradient's "
                "energy beyond which a matrix takes no more rank"
            )


class EnergyRank(RankAllocator):
    """``rank="auto"``: ranks planned from the gradients' energy within the group's state budget (the module)."""

    name = "energy"
    value = AUTO_RANK
    options_type = RankOptions
    sharding_blocker = "rank='auto' allocates ranks across the whole group on one process"
    needs_state_costs = True

    def rank(self, state: dict[str, Any], planned: int | None) -> int | None:
        return planned if planned is not None else state.get("rank")

    def refreshing(self, ctx: ProjectedContext) -> bool:
        state = ctx.state
        resizes = state["last_refresh"] >= 0 and state["rank"] != ctx.layout.rank
        state["rank"] = ctx.layout.rank  # this refresh's allocation
        return resizes

    def resize(self, ctx: ProjectedContext) -> None:
        """Truncate or zero-pad the moments to the new rank (``on_refresh`` other than rotate)."""
        with ctx.placement.local_state(ctx.state, ctx.low_shape, ctx.replicated) as plain:
            ctx.rule.set_moments(plain, {k: resized(v, ctx.low_shape) for k, v in ctx.rule.moments(plain).items()})

    def plan(self, engine: Engine, groups: Sequence[dict[str, Any]], plan: StepPlan) -> None:
        """The ranks of this step's refreshing matrices, and their bases (:func:`plan_group`)."""
        for group in groups:
            params = group["params"]
            due = [p.grad is not None and engine.refresh_due(p) for p in params]
            if not any(due):
                continue  # most steps: no context is built
            contexts = [engine.context(p) for p in params]
            matrices, counters = [], []
            for p, ctx, now in zip(params, contexts, due, strict=True):
                grad = local(p.grad).to(compute_dtype(p.dtype)) if now else None  # as the step widens it
                at_cap = layout_of((int(p.shape[0]), int(p.shape[1])), group, p.dtype, p.device, group["max_rank"])
                matrices.append((ctx.state, at_cap, grad, *engine.state_costs(p)))
                counters.append(ctx.state if "step" in ctx.state else ctx.initial_counters())
            planned = plan_group(get_projector(group["projector"]), group, matrices, counters)
            for p, one in zip(params, planned, strict=True):
                if one is not None:
                    plan.ranks[p], plan.prepared[p] = one

    def check(self, group: dict[str, Any]) -> None:
        check_rank(group)

    def conflict(self, group: dict[str, Any], rule: UpdateRule | None) -> str | None:
        """What ``rank="auto"`` does not take yet: a basis whose directions are not ordered by energy, two-sided
        bases, switching, and residual policies with state shaped by the rank."""
        if group["projector"] not in RANKED:
            return (
                f"rank='auto' takes a prefix of a basis ordered by captured energy; projector={group['projector']!r} "
                f"has no such order (use one of {RANKED})"
            )
        if group["proj_type"] == "full":
            return (
                "rank='auto' allocates one rank per matrix; proj_type='full' projects both sides (use std/left/right)"
            )
        if group["switching"]:
            return "rank='auto' keeps the leading directions; switching=True draws some at random (use switching=False)"
        if not RESIDUALS[group["residual"]].resizable:
            resizable = tuple(name for name, policy in RESIDUALS.items() if policy.resizable)
            return f"rank='auto' supports residual {resizable}; residual={group['residual']!r} is not supported yet"
        return None


def check_rank(group: dict[str, Any]) -> None:
    """``rank`` (an int >= 1, or ``"auto"``) and the energy-allocated ranks' keys."""
    rank = group["rank"]
    if rank != AUTO_RANK and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank={rank!r} is not valid; expected an integer >= 1 or {AUTO_RANK!r}")
    view(RankOptions, group)
    budget = group["state_budget"]
    if rank == AUTO_RANK and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(
            f"state_budget={budget!r} is not valid; rank='auto' needs the bytes of optimizer state its matrices may "
            "hold together, an integer >= 1"
        )


def auto_rank(group: dict[str, Any]) -> bool:
    """Whether ``group`` allocates its ranks from the gradient's energy (``rank="auto"``)."""
    return group.get("rank") == AUTO_RANK


def cap(group: dict[str, Any], shape: tuple[int, int]) -> int:
    """The most rank one matrix of ``shape`` may take."""
    return min(int(group["max_rank"]), *shape)


def demand(shares: Tensor, target: float) -> int:
    """The smallest rank whose shares sum to ``target`` (all of them if none does).

    >>> demand(torch.tensor([0.6, 0.3, 0.1]), 0.9)
    2
    """
    reached = (shares.cumsum(0) >= target * (1 - 1e-12)).nonzero()
    return int(reached[0, 0]) + 1 if len(reached) else len(shares)


def allocate(
    shares: Sequence[Tensor],
    costs: Sequence[int],
    bases: Sequence[int],
    budget: int,
    target: float,
    caps: Sequence[int] | None = None,
) -> list[int]:
    """Ranks for matrices with these per-direction ``shares``: each starts at 1 and gains ranks in the
    order of ``share / cost`` (``costs[i]``: bytes of one more rank; ``bases[i] + costs[i] * r``: its bytes at
    rank ``r``), up to its demand for ``target`` (and ``caps[i]``), while ``budget`` lasts. Ties go to the
    earlier matrix. Raises ValueError if rank 1 everywhere does not fit."""
    ranks = [1] * len(shares)
    left = budget - sum(b + c for b, c in zip(bases, costs, strict=True))
    if left < 0:
        raise ValueError(f"state_budget={budget} bytes is below {budget - left}, what rank 1 everywhere holds")
    limits = [demand(s, target) for s in shares]
    if caps is not None:
        limits = [min(limit, c) for limit, c in zip(limits, caps, strict=True)]
    values = [s.tolist() for s in shares]  # one transfer per matrix, then plain numbers
    heap = [(-values[i][1] / costs[i], i) for i in range(len(shares)) if limits[i] > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if costs[i] > left:
            continue  # this matrix's next rank does not fit; a cheaper one may
        ranks[i] += 1
        left -= costs[i]
        if ranks[i] < limits[i]:
            heapq.heappush(heap, (-values[i][ranks[i]] / costs[i], i))
    return ranks


def allocate_due(
    shares: Sequence[Tensor],
    costs: Sequence[int],
    bases: Sequence[int],
    budget: int,
    target: float,
    held: Sequence[int | None],
) -> list[int]:
    """Ranks for a step on which only some matrices refresh: ``held[i]`` is matrix ``i``'s rank now, or
    None if it refreshes on this step. The due ones take their targets from the pass over every matrix
    (:func:`allocate`), within what the others hold now; returns every matrix's rank (the held ones kept).

    >>> shares = [torch.tensor([0.5, 0.3, 0.1]), torch.tensor([0.9, 0.05, 0.01])]
    >>> allocate_due(shares, [10, 10], [0, 0], 40, 0.99, held=[None, 3])  # matrix 1 holds 3 until it refreshes
    [1, 3]
    """
    targets = allocate(shares, costs, bases, budget, target)
    due = [i for i, r in enumerate(held) if r is None]
    others = sum(bases[i] + costs[i] * r for i, r in enumerate(held) if r is not None)
    mine = allocate(
        [shares[i] for i in due],
        [costs[i] for i in due],
        [bases[i] for i in due],
        budget - others,
        target,
        caps=[targets[i] for i in due],
    )
    ranks = [r if r is not None else 0 for r in held]
    for i, r in zip(due, mine, strict=True):
        ranks[i] = r
    return ranks


def basis_at_cap(
    projector: Projector, grad: Tensor, layout: Layout, group: dict[str, Any], counters: dict[str, Any]
) -> tuple[dict[str, Tensor], Tensor]:
    """The projector's fresh state entries at ``layout``'s rank (the cap) and each direction's share
    ``||p_k^T G||^2 / ||G||^2`` (``(k,)``, in the gradient's working dtype); ``counters`` holds the matrix's
    ``proj_seed`` and ``step`` (what a seeded projector draws from)."""
    scratch = {"proj_seed": counters["proj_seed"], "step": counters["step"]}
    left, right = projector.refresh(grad, scratch, layout, group)
    work = grad.to(torch.promote_types(grad.dtype, torch.float32))
    if layout.side == "left":
        kept = (left.to(work.dtype).t() @ work).pow(2).sum(1)  # type: ignore[union-attr]  # (k,): rows of R
    else:
        kept = (work @ right.to(work.dtype).t()).pow(2).sum(0)  # type: ignore[union-attr]  # (k,): columns of R
    entries = {key: scratch[key] for key in projector.fresh_entries(layout)}
    return entries, kept / work.pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)


def truncate_entries(entries: dict[str, Tensor], rank: int) -> dict[str, Tensor]:
    """A basis computed at the cap cut to its first ``rank`` directions (left: columns; right: rows)."""
    return {
        key: (value[:, :rank] if key == "basis_left" else value[:rank]).contiguous() for key, value in entries.items()
    }


def resized(moment: Tensor, shape: tuple[int, int]) -> Tensor:
    """``moment`` (shaped like ``R`` at the old rank) truncated or zero-padded to ``shape`` (one of the two
    dimensions is the rank): the directions both bases number alike keep their moments, new ones start at 0.

    >>> resized(torch.ones(2, 3), (3, 3)).sum().item(), resized(torch.ones(2, 3), (1, 3)).shape
    (6.0, torch.Size([1, 3]))
    """
    out = moment.new_zeros(shape)
    rows, cols = min(moment.shape[0], shape[0]), min(moment.shape[1], shape[1])
    out[:rows, :cols] = moment[:rows, :cols]
    return out


#: a ``rank`` written as text: a number, or ``auto``
parse_rank = count_or(AUTO_RANK, "parse_rank")


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*(b|kb|mb|gb|kib|mib|gib)?\s*$", re.IGNORECASE)
_FRACTION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*x(?:\s*@\s*([0-9]+))?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_budget(text: str) -> int | tuple[float, int | None]:
    """``--state-budget``: bytes (``24000000``, ``24MB``, ``22.9MiB``), or a fraction of the state fixed-rank
    GaLore keeps at a rank (``0.75x``: at ``--rank-ref``, default the trainer's rank; ``0.75x@128``).

    >>> parse_budget("24MB"), parse_budget("1.5KiB"), parse_budget("0.5x"), parse_budget("1x@128")
    (24000000, 1536, (0.5, None), (1.0, 128))
    """
    size = _SIZE.match(text)
    if size:
        value = int(float(size.group(1)) * _UNITS[(size.group(2) or "b").lower()])
        if value >= 1:
            return value
    fraction = _FRACTION.match(text)
    if fraction and float(fraction.group(1)) > 0 and (fraction.group(2) is None or int(fraction.group(2)) >= 1):
        return float(fraction.group(1)), None if fraction.group(2) is None else int(fraction.group(2))
    raise ValueError(
        f"state_budget {text!r} is not valid; expected bytes (24000000, 24MB, 22.9MiB) or a positive fraction of "
        "fixed-rank GaLore's state (0.75x, or 0.75x@RANK)"
    )


def plan_group(
    projector: Projector,
    group: dict[str, Any],
    matrices: Sequence[tuple[dict[str, Any], Layout, Tensor | None, int, int]],
    counters: Sequence[dict[str, Any]],
) -> list[tuple[int, dict[str, Tensor]] | None]:
    """One step's ranks for a ``rank="auto"`` group: ``matrices[i]`` is ``(state, layout at the cap, grad or
    None if it does not refresh now, base bytes, bytes per rank)``, ``counters[i]`` its ``proj_seed`` and
    ``step``. Returns, for each matrix that refreshes, its rank and the state entries its refresh
    writes (the basis cut to that rank, and its spectrum); None for the others."""
    shares: list[Tensor] = []
    held: list[int | None] = []
    fresh: dict[int, tuple[dict[str, Tensor], Tensor]] = {}
    for i, (state, layout, grad, _, _) in enumerate(matrices):
        if grad is not None:
            fresh[i] = basis_at_cap(projector, grad, layout, group, counters[i])
            shares.append(fresh[i][1])
            held.append(None)
        elif "rank_spectrum" in state:
            shares.append(state["rank_spectrum"])
            held.append(int(state["rank"]))
        else:  # not stepped yet: rank 1 stays reserved for it
            shares.append(torch.ones(1))
            held.append(1)
    bases, costs = [m[3] for m in matrices], [m[4] for m in matrices]
    ranks = allocate_due(shares, costs, bases, int(group["state_budget"]), float(group["energy_target"]), held)
    out: list[tuple[int, dict[str, Tensor]] | None] = [None] * len(matrices)
    for i, (entries, spectrum) in fresh.items():
        out[i] = ranks[i], {**truncate_entries(entries, ranks[i]), "rank_spectrum": spectrum}
    return out
