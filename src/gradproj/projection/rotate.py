"""Map optimizer moments from an old basis into a new one (``on_refresh="rotate"``).

With ``R = P^T G`` in the old basis and ``R' = P'^T G`` in the new one, ``R' = C R`` whenever
``G`` lies in the old subspace, where ``C = P'^T P`` (``r x r``). So the first moment maps
exactly as ``M' = C M`` (right side: ``M' = M C_R`` with ``C_R = Q Q'^T``).

The second moment is elementwise, so no linear map is exact. We use the diagonal
approximation ``V' = (C o C) V``: it treats the coordinates of ``R`` as uncorrelated, so the
variance of ``sum_j C_ij r_j`` is ``sum_j C_ij^2 E[r_j^2]``. It is non-negative, exact when
``C`` is a signed permutation, and conserves total second-moment mass when ``C`` is
orthogonal (columns of ``C o C`` sum to 1).

Example:
    >>> import torch
    >>> p = torch.eye(4)[:, :2]
    >>> c_left, _ = change_of_basis((p, None), (p, None))
    >>> torch.equal(c_left, torch.eye(2))
    True
"""

from __future__ import annotations

from torch import Tensor

from .bases import Bases


def change_of_basis(old: Bases, new: Bases) -> tuple[Tensor | None, Tensor | None]:
    """``(C_left, C_right)`` taking coordinates in ``old`` to coordinates in ``new``."""
    c_left = new[0].t() @ old[0] if old[0] is not None and new[0] is not None else None
    c_right = old[1] @ new[1].t() if old[1] is not None and new[1] is not None else None
    return c_left, c_right


def rotate_first(moment: Tensor, c_left: Tensor | None, c_right: Tensor | None) -> Tensor:
    """``C_left @ M @ C_right`` (exact for the first moment)."""
    if c_left is not None:
        moment = c_left.to(moment.dtype) @ moment
    if c_right is not None:
        moment = moment @ c_right.to(moment.dtype)
    return moment


def rotate_second(moment: Tensor, c_left: Tensor | None, c_right: Tensor | None) -> Tensor:
    """``(C_left o C_left) @ V @ (C_right o C_right)`` (the diagonal approximation)."""
    return rotate_first(
        moment,
        None if c_left is None else c_left.square(),
        None if c_right is None else c_right.square(),
    )
