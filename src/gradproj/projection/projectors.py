"""Projectors: how each kind of basis is refreshed, stored in optimizer state, and rebuilt.

A projector keeps only tensors and plain numbers in the per-parameter state:

============  ===========================================  ==========================
name          state it owns                                per-layer bytes
============  ===========================================  ==========================
``svd``       ``basis_left`` (m x r) / ``basis_right``     m*r (or r*n) elements
``rsvd``      same as ``svd``                              same as ``svd``
``eigh``      same, plus ``tracked_cov`` (r x r) if        m*r (+ r*r) elements
              ``track_beta > 0``
``dct``       ``index_left`` / ``index_right`` (int64)     r indices per side
``random``    nothing beyond the shared ``proj_seed``      0 (one int)
``identity``  nothing: ``R = G`` (RACS)                    0
============  ===========================================  ==========================

``eigh`` is Alice's tracked eigenbasis: the leading eigenvectors of
``track_beta * P Q P^T + (1 - track_beta) * G G^T`` (``G^T G`` for a right basis), where ``Q`` is the
moving average of ``R R^T`` kept in the low-rank space; with ``track_beta = 0`` it is the eigenbasis of
the current ``G G^T`` (the SVD basis), found from the last basis by one step of subspace iteration.

``switching=True`` (svd, rsvd, eigh, dct) keeps the ``leading_basis`` leading directions at a
refresh and draws the others from the complement, seeded by ``(proj_seed, step)``
(:func:`~gradproj.projection.bases.switch_basis`). ``dct`` shares one DCT matrix per size across
layers; ``random`` regenerates its basis from ``(proj_seed, last_refresh)`` and lets the optimizer
cache it between refreshes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..rules.base import ALL_ROWS, Rows
from .bases import (
    Bases,
    covariance,
    dct_bases,
    dct_indices,
    derive_seed,
    random_bases,
    rsvd_basis,
    svd_basis,
    switch_basis,
    switch_indices,
    top_eigenvectors,
    working_dtype,
)
from .sides import resolve_side

#: Alice's default share of leading directions a switching refresh keeps: the paper's 40 of 256
LEADING_SHARE = 40 / 256


@dataclass(frozen=True)
class Layout:
    """What a projector needs to know about one parameter."""

    shape: tuple[int, int]
    rank: int
    side: str
    dtype: torch.dtype
    device: torch.device


def layout_of(
    shape: tuple[int, int], group: dict[str, Any], dtype: torch.dtype, device: torch.device, rank: int | None = None
) -> Layout:
    """A projected matrix's layout: the rank (``rank``, else the group's; ``"auto"``: ``max_rank``) capped
    by the shape, the side from ``proj_type`` (``"none"`` for the identity projector, whose ``R`` is the
    whole gradient)."""
    if group["projector"] == "identity":
        return Layout(shape, min(shape), "none", dtype, device)
    if rank is None:
        rank = group["max_rank"] if group["rank"] == "auto" else group["rank"]
    return Layout(shape, min(int(rank), *shape), resolve_side(group["proj_type"], shape), dtype, device)


def leading_count(group: dict[str, Any], rank: int) -> int:
    """How many leading directions a switching refresh keeps at ``rank``."""
    leading = group.get("leading_basis")
    return max(1, round(rank * LEADING_SHARE)) if leading is None else min(int(leading), rank)


def _cast(bases: Bases, layout: Layout) -> Bases:
    return tuple(  # type: ignore[return-value]
        None if b is None else b.to(dtype=layout.dtype, device=layout.device) for b in bases
    )


def _refresh_seed(state: dict[str, Any]) -> int:
    return derive_seed(int(state["proj_seed"]), int(state["step"]))


def _switch_seed(state: dict[str, Any]) -> int:
    return derive_seed(_refresh_seed(state), 3)  # independent of rsvd's test matrix at the same step


class Projector:
    """Base class: subclasses implement :meth:`compute` and the storage hooks."""

    name = ""
    #: whether the optimizer should keep the materialized basis between refreshes
    cache = False
    #: whether a refresh can change the basis (the identity never does: no on_refresh policy applies)
    changes_basis = True
    #: state keys in ``R``'s coordinates that every process keeps whole under a row split (FSDP2)
    replicated_state: tuple[str, ...] = ()
    #: whether a refresh reads the gradient (under FSDP2 that gathers it whole; a seeded basis does not)
    reads_gradient = True
    #: whether a refresh reads the last basis (the eigh projector warm-starts from it)
    warm_starts = False
    #: whether the basis has leading directions, so a refresh can switch (keep some, draw the rest)
    switchable = True
    #: whether the basis' directions are ordered by the energy they keep, so a prefix is a smaller basis
    ranked = False
    #: whether it can project both sides at once (``proj_type="full"``)
    two_sided = True

    def refresh(self, grad: Tensor, state: dict[str, Any], layout: Layout, group: dict[str, Any]) -> Bases:
        """Compute a new basis from ``grad``, store it in ``state`` and return it materialized."""
        raise NotImplementedError

    def materialize(self, state: dict[str, Any], layout: Layout) -> Bases:
        """Rebuild the current basis from ``state`` alone."""
        raise NotImplementedError

    def fresh_entries(self, layout: Layout) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``{key: (shape, dtype)}`` of what :meth:`refresh` writes into the state, in a fixed order: what
        a refresh computed on one rank sends the others (:mod:`gradproj.optim.spread`)."""
        return {}

    def observes(self, group: dict[str, Any]) -> bool:
        """Whether :meth:`observe` keeps anything for a group with these options."""
        return False

    def observe(
        self, low: Tensor, state: dict[str, Any], layout: Layout, group: dict[str, Any], rows: Rows = ALL_ROWS
    ) -> None:
        """See every step's projected gradient ``R`` (the tracked eigenbasis keeps statistics of it);
        ``low`` may be this process's rows of ``R`` (``rows`` completes sums over them)."""

    def rotate_state(self, state: dict[str, Any], c_left: Tensor | None, c_right: Tensor | None) -> None:
        """Carry statistics kept in ``R``'s coordinates into a new basis (``on_refresh="rotate"``)."""

    def state_numel(self, layout: Layout, group: dict[str, Any] | None = None) -> tuple[int, int]:
        """(floating elements in the basis dtype, int64 elements) this projector stores."""
        raise NotImplementedError


class _StoredBasis(Projector):
    def _compute(self, grad: Tensor, state: dict[str, Any], layout: Layout, group: dict[str, Any]) -> Bases:
        raise NotImplementedError

    def refresh(self, grad: Tensor, state: dict[str, Any], layout: Layout, group: dict[str, Any]) -> Bases:
        left, right = self._compute(grad, state, layout, group)
        if group.get("switching"):
            leading, seed = leading_count(group, layout.rank), _switch_seed(state)
            left = None if left is None else switch_basis(left, leading, seed)
            right = None if right is None else switch_basis(right.t(), leading, derive_seed(seed, 2)).t()
        left, right = _cast((left, right), layout)
        for key, value in (("basis_left", left), ("basis_right", right)):
            if value is not None:
                state[key] = value
        return left, right

    def materialize(self, state: dict[str, Any], layout: Layout) -> Bases:
        return state.get("basis_left"), state.get("basis_right")

    def fresh_entries(self, layout: Layout) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        (m, n), r = layout.shape, layout.rank
        left = {"basis_left": ((m, r), layout.dtype)} if layout.side in ("left", "full") else {}
        return {**left, **({"basis_right": ((r, n), layout.dtype)} if layout.side in ("right", "full") else {})}

    def state_numel(self, layout: Layout, group: dict[str, Any] | None = None) -> tuple[int, int]:
        m, n = layout.shape
        r = layout.rank
        return (m * r if layout.side != "right" else 0) + (n * r if layout.side != "left" else 0), 0


class SVDProjector(_StoredBasis):
    name = "svd"
    ranked = True

    def _compute(self, grad: Tensor, state: dict[str, Any], layout: Layout, group: dict[str, Any]) -> Bases:
        return svd_basis(grad, layout.rank, layout.side)


class RSVDProjector(_StoredBasis):
    name = "rsvd"
    ranked = True

    def _compute(self, grad: Tensor, state: dict[str, Any], layout: Layout, group: dict[str, Any]) -> Bases:
        return rsvd_basis(
            grad,
            layout.rank,
            layout.side,
            seed=_refresh_seed(state),
            oversample=int(group["oversample"]),
            power_iters=int(group["power_iters"]),
        )


class DCTProjector(Projector):
    name = "dct"

    def refresh(self, grad: Tensor, state: dict[str, Any], layout: Layout, group: dict[str, Any]) -> Bases:
        left, right = dct_indices(grad, layout.rank, layout.side)
        if group.get("switching"):
            leading, seed = leading_count(group, layout.rank), _switch_seed(state)
            m, n = layout.shape
            left = None if left is None else switch_indices(left, m, leading, seed)
            right = None if right is None else switch_indices(right, n, leading, derive_seed(seed, 2))
        for key, value in (("index_left", left), ("index_right", right)):
            if value is not None:
                state[key] = value.to(device=layout.device)
        return self.materialize(state, layout)

    def materialize(self, state: dict[str, Any], layout: Layout) -> Bases:
        if "index_left" not in state and "index_right" not in state:
            return None, None
        return dct_bases(state.get("index_left"), state.get("index_right"), layout.shape, layout.dtype, layout.device)

    def fresh_entries(self, layout: Layout) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        sides = {"index_left": ("left", "full"), "index_right": ("right", "full")}
        return {key: ((layout.rank,), torch.int64) for key, on in sides.items() if layout.side in on}

    def state_numel(self, layout: Layout, group: dict[str, Any] | None = None) -> tuple[int, int]:
        return 0, layout.rank * (2 if layout.side == "full" else 1)


class RandomProjector(Projector):
    name = "random"
    switchable = False
    cache = True
    reads_gradient = False

    def refresh(self, grad: Tensor, state: dict[str, Any], layout: Layout, group: dict[str, Any]) -> Bases:
        # the optimizer has already set state["last_refresh"]; the seed follows from it
        return self.materialize(state, layout)

    def materialize(self, state: dict[str, Any], layout: Layout) -> Bases:
        if int(state.get("last_refresh", -1)) < 0:
            return None, None
        seed = derive_seed(int(state["proj_seed"]), int(state["last_refresh"]))
        return _cast(random_bases(seed, layout.shape, layout.rank, layout.side, layout.dtype, layout.device), layout)

    def state_numel(self, layout: Layout, group: dict[str, Any] | None = None) -> tuple[int, int]:
        return 0, 0


class EighProjector(_StoredBasis):
    """Alice's tracked eigenbasis (one-sided bases only)."""

    name = "eigh"
    two_sided = False  # it tracks the covariance of one side
    replicated_state = ("tracked_cov",)
    warm_starts = True

    def _compute(self, grad: Tensor, state: dict[str, Any], layout: Layout, group: dict[str, Any]) -> Bases:
        left = layout.side == "left"
        previous = state.get("basis_left") if left else state.get("basis_right")
        previous = None if previous is None else (previous if left else previous.t())  # d x r
        cov = covariance(grad, layout.side)  # d x d
        beta = float(group["track_beta"])
        if beta > 0 and previous is not None:
            tracked = state["tracked_cov"].to(cov.dtype)  # r x r, in the last basis' coordinates
            basis = previous.to(cov.dtype)
            cov = beta * (basis @ tracked @ basis.t()) + (1 - beta) * cov
        top = top_eigenvectors(cov, layout.rank, previous)  # d x r
        return (top, None) if left else (None, top.t())

    def observes(self, group: dict[str, Any]) -> bool:
        return float(group["track_beta"]) > 0

    def observe(
        self, low: Tensor, state: dict[str, Any], layout: Layout, group: dict[str, Any], rows: Rows = ALL_ROWS
    ) -> None:
        beta = float(group["track_beta"])
        if beta == 0:
            return
        work = low.to(working_dtype(low.dtype))
        # left: R (r x n) is whole on every process; right: R's rows are the weight's, so R^T R sums over them
        outer = work @ work.t() if layout.side == "left" else rows.total(work.t() @ work)  # r x r
        tracked = state.get("tracked_cov")
        if tracked is None:
            tracked = state["tracked_cov"] = torch.zeros_like(outer, dtype=layout.dtype)
        tracked.lerp_(outer.to(tracked.dtype), 1 - beta)

    def rotate_state(self, state: dict[str, Any], c_left: Tensor | None, c_right: Tensor | None) -> None:
        tracked = state.get("tracked_cov")
        if tracked is None:
            return
        change = c_left if c_left is not None else c_right.t()  # type: ignore[union-attr]  # r x r, new <- old
        state["tracked_cov"] = (change @ tracked @ change.t()).to(tracked.dtype)  # C Q C^T

    def state_numel(self, layout: Layout, group: dict[str, Any] | None = None) -> tuple[int, int]:
        basis, _ = super().state_numel(layout)
        tracking = group is not None and float(group.get("track_beta", 0)) > 0
        return basis + (layout.rank**2 if tracking else 0), 0


class IdentityProjector(Projector):
    """No projection: ``R = G`` (RACS steps the whole matrix); keeps nothing."""

    name = "identity"
    switchable = False
    changes_basis = False
    reads_gradient = False

    def refresh(self, grad: Tensor, state: dict[str, Any], layout: Layout, group: dict[str, Any]) -> Bases:
        return None, None

    def materialize(self, state: dict[str, Any], layout: Layout) -> Bases:
        return None, None

    def state_numel(self, layout: Layout, group: dict[str, Any] | None = None) -> tuple[int, int]:
        return 0, 0


#: every projector by name; a new projector is its class and one entry here
REGISTRY: dict[str, Projector] = {
    p.name: p
    for p in (SVDProjector(), RSVDProjector(), EighProjector(), DCTProjector(), RandomProjector(), IdentityProjector())
}
PROJECTORS = tuple(REGISTRY)
#: projectors whose basis has leading directions, so a refresh can switch (keep some, draw the rest)
SWITCHABLE = tuple(name for name, p in REGISTRY.items() if p.switchable)
#: projectors whose directions are ordered by the energy they keep (a prefix is a smaller basis: rank="auto")
RANKED = tuple(name for name, p in REGISTRY.items() if p.ranked)


def get_projector(name: str) -> Projector:
    """Look up a projector by name; the error lists the valid names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"projector={name!r} is not one of {PROJECTORS}") from None
