"""Which side of a weight matrix a basis projects, and the down/up maps.

A basis is a pair ``(left, right)``: ``left`` is ``m x r`` with orthonormal columns,
``right`` is ``r x n`` with orthonormal rows (galore-torch's orientation). Either may be
``None``. For a gradient ``G`` (``m x n``)::

    down(G) = left^T @ G @ right^T        # r x n, m x r or r x r
    up(R)   = left @ R @ right            # m x n

Example:
    >>> import torch
    >>> resolve_side("std", (8, 4)), resolve_side("std", (4, 8))
    ('right', 'left')
    >>> g = torch.randn(6, 4)
    >>> q, _ = torch.linalg.qr(torch.randn(6, 2))
    >>> project_down(g, q, None).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

from torch import Tensor

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SIDES = ("left", "right", "full")


def resolve_side(proj_type: str, shape: tuple[int, ...]) -> str:
    """Map galore-torch's ``proj_type`` and a gradient shape to ``left``, ``right`` or ``full``.

    ``std`` projects the smaller dimension (right for tall or square, left for wide),
    ``reverse_std`` the larger one; ``left``/``right``/``full`` are explicit.
    """
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in SIDES:
        return proj_type
    raise ValueError(f"proj_type={proj_type!r} is not one of {PROJ_TYPES}")


def low_rank_shape(shape: tuple[int, ...], rank: int, side: str) -> tuple[int, int]:
    """Shape of ``down(G)`` for a gradient of ``shape``."""
    m, n = shape
    if side == "none":  # the identity projector: R is G itself
        return (m, n)
    if side == "left":
        return (rank, n)
    if side == "right":
        return (m, rank)
    return (rank, rank)


def compressed_dim(shape: tuple[int, ...], side: str) -> int:
    """Size of the dimension that the basis compresses (``m`` for left, ``n`` for right)."""
    m, n = shape
    return m if side == "left" else n


def project_down(grad: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``left^T @ grad @ right^T`` with absent factors skipped."""
    if left is not None:
        grad = left.t() @ grad  # (r, n)
    if right is not None:
        grad = grad @ right.t()  # (., r)
    return grad


def project_up(low: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``left @ low @ right`` with absent factors skipped (no scale applied)."""
    if left is not None:
        low = left @ low  # (m, .)
    if right is not None:
        low = low @ right  # (., n)
    return low
