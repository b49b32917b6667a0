"""Pure functions on tensors behind the dynamics rows: captured energy, basis overlap, stable rank,
and reading many 0-d tensors back with one transfer per device.

Example:
    >>> import torch
    >>> q = torch.linalg.qr(torch.randn(8, 2)).Q
    >>> round(float(basis_overlap((q, None), (q, None))), 6)  # the same subspace
    1.0
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

Bases = tuple[Tensor | None, Tensor | None]


def wide(x: Tensor) -> Tensor:
    """float32 for half-precision tensors (sums of squares overflow or round badly), else unchanged."""
    return x if x.dtype == torch.float64 else x.float()


def norm(x: Tensor) -> Tensor:
    """The Frobenius norm in float32 or wider, as one kernel (no cast of a half-precision tensor)."""
    return torch.linalg.vector_norm(x, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


def captured_energy(low: Tensor, grad: Tensor) -> Tensor:
    """``||down(G)||^2 / ||G||^2`` for an orthonormal basis, as a 0-d tensor (no device sync)."""
    return wide(low).pow(2).sum() / wide(grad).pow(2).sum().clamp_min(1e-30)


def basis_overlap(old: Bases, new: Bases) -> Tensor:
    """``||Q_old^T Q_new||_F^2 / r`` averaged over the projected sides (1: same subspace)."""
    values = []
    for side, (a, b) in enumerate(zip(old, new, strict=True)):
        if a is None or b is None:
            continue
        a, b = (wide(a), wide(b)) if side == 0 else (wide(a).T, wide(b).T)  # columns span the subspace
        values.append((a.T @ b).pow(2).sum() / min(a.shape[1], b.shape[1]))
    return torch.stack(values).mean() if values else torch.tensor(math.nan)


def stable_rank(grad: Tensor, start: Tensor, iterations: int = 5) -> Tensor:
    """``||G||_F^2 / sigma_max^2`` with ``sigma_max`` from ``iterations`` power iterations from ``start``
    (a vector of ``G``'s smaller dimension); power iteration can only underestimate ``sigma_max``, so this
    is an upper bound. ``G`` is iterated in its smaller dimension."""
    g = wide(grad)
    g = g if g.shape[0] >= g.shape[1] else g.T
    v = start
    for _ in range(iterations):
        v = g.T @ (g @ v)
        v = v / v.norm().clamp_min(1e-30)
    return g.pow(2).sum() / (g @ v).pow(2).sum().clamp_min(1e-30)


def materialize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace 0-d tensors in rows by floats with one transfer per device (one sync, not one per value)."""
    slots = [(row, key) for row in rows for key, value in row.items() if isinstance(value, Tensor)]
    by_device: dict[torch.device, list[tuple[dict[str, Any], str]]] = {}
    for row, key in slots:
        by_device.setdefault(row[key].device, []).append((row, key))
    for items in by_device.values():
        values = torch.stack([row[key].double() for row, key in items]).tolist()
        for (row, key), value in zip(items, values, strict=True):
            row[key] = value
    return rows
