"""Projectors: how each kind of basis is refreshed, stored in optimizer state, and rebuilt.

A projector keeps only tensors and plain numbers in the per-parameter state:

=========  ===========================================  ==========================
name       state it owns                                per-layer bytes
=========  ===========================================  ==========================
``svd``    ``basis_left`` (m x r) / ``basis_right``     m*r (or r*n) elements
``rsvd``   same as ``svd``                              same as ``svd``
``dct``    ``index_left`` / ``index_right`` (int64)     r indices per side
``random`` nothing beyond the shared ``proj_seed``      0 (one int)
=========  ===========================================  ==========================

``dct`` shares one DCT matrix per size across layers; ``random`` regenerates its basis from
``(proj_seed, last_refresh)`` and lets the optimizer cache it between refreshes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .bases import Bases, dct_bases, dct_indices, derive_seed, random_bases, rsvd_basis, svd_basis

PROJECTORS = ("svd", "rsvd", "dct", "random")


@dataclass(frozen=True)
class Layout:
    """What a projector needs to know about one parameter."""

    shape: tuple[int, int]
    rank: int
    side: str
    dtype: torch.dtype
    device: torch.device


def _cast(bases: Bases, layout: Layout) -> Bases:
    return tuple(  # type: ignore[return-value]
        None if b is None else b.to(dtype=layout.dtype, device=layout.device) for b in bases
    )


def _refresh_seed(state: dict[str, Any]) -> int:
    return derive_seed(int(state["proj_seed"]), int(state["step"]))


class Projector:
    """Base class: subclasses implement :meth:`compute` and the storage hooks."""

    name = ""
    #: whether the optimizer should keep the materialized basis between refreshes
    cache = False

    def refresh(self, grad: Tensor, state: dict[str, Any], layout: Layout, group: dict[str, Any]) -> Bases:
        """Compute a new basis from ``grad``, store it in ``state`` and return it materialized."""
        raise NotImplementedError

    def materialize(self, state: dict[str, Any], layout: Layout) -> Bases:
        """Rebuild the current basis from ``state`` alone."""
        raise NotImplementedError

    def state_numel(self, layout: Layout) -> tuple[int, int]:
        """(floating elements in the basis dtype, int64 elements) this projector stores."""
        raise NotImplementedError


class _StoredBasis(Projector):
    def _compute(self, grad: Tensor, state: dict[str, Any], layout: Layout, group: dict[str, Any]) -> Bases:
        raise NotImplementedError

    def refresh(self, grad: Tensor, state: dict[str, Any], layout: Layout, group: dict[str, Any]) -> Bases:
        left, right = _cast(self._compute(grad, state, layout, group), layout)
        for key, value in (("basis_left", left), ("basis_right", right)):
            if value is not None:
                state[key] = value
        return left, right

    def materialize(self, state: dict[str, Any], layout: Layout) -> Bases:
        return state.get("basis_left"), state.get("basis_right")

    def state_numel(self, layout: Layout) -> tuple[int, int]:
        m, n = layout.shape
        r = layout.rank
        return (m * r if layout.side != "right" else 0) + (n * r if layout.side != "left" else 0), 0


class SVDProjector(_StoredBasis):
    name = "svd"

    def _compute(self, grad: Tensor, state: dict[str, Any], layout: Layout, group: dict[str, Any]) -> Bases:
        return svd_basis(grad, layout.rank, layout.side)


class RSVDProjector(_StoredBasis):
    name = "rsvd"

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
        for key, value in (("index_left", left), ("index_right", right)):
            if value is not None:
                state[key] = value.to(device=layout.device)
        return self.materialize(state, layout)

    def materialize(self, state: dict[str, Any], layout: Layout) -> Bases:
        if "index_left" not in state and "index_right" not in state:
            return None, None
        return dct_bases(state.get("index_left"), state.get("index_right"), layout.shape, layout.dtype, layout.device)

    def state_numel(self, layout: Layout) -> tuple[int, int]:
        return 0, layout.rank * (2 if layout.side == "full" else 1)


class RandomProjector(Projector):
    name = "random"
    cache = True

    def refresh(self, grad: Tensor, state: dict[str, Any], layout: Layout, group: dict[str, Any]) -> Bases:
        # the optimizer has already set state["last_refresh"]; the seed follows from it
        return self.materialize(state, layout)

    def materialize(self, state: dict[str, Any], layout: Layout) -> Bases:
        if int(state.get("last_refresh", -1)) < 0:
            return None, None
        seed = derive_seed(int(state["proj_seed"]), int(state["last_refresh"]))
        return _cast(random_bases(seed, layout.shape, layout.rank, layout.side, layout.dtype, layout.device), layout)

    def state_numel(self, layout: Layout) -> tuple[int, int]:
        return 0, 0


_REGISTRY: dict[str, Projector] = {
    p.name: p for p in (SVDProjector(), RSVDProjector(), DCTProjector(), RandomProjector())
}


def get_projector(name: str) -> Projector:
    """Look up a projector by name; the error lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"projector={name!r} is not one of {PROJECTORS}") from None
