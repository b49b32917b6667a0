"""Fira's norm-growth limiter, shared by every policy that bounds how fast an update's norm may grow
(Fira's and APOLLO's scaled terms, Alice's compensation, RACS's scaled gradient).

If ``||x_t|| > gamma ||x_{t-1}||`` then ``x_t`` is rescaled to ``gamma ||x_{t-1}||``; the first call
only records the norm. The previous norm lives in ``state[key]`` (a float32-or-wider scalar tensor).

Example:
    >>> import torch
    >>> state = {}
    >>> _ = limit_growth(torch.ones(4), state, 1.01)          # norm 2, recorded
    >>> round(float(limit_growth(3 * torch.ones(4), state, 1.01).norm()), 4)
    2.02
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

TINY = 1e-8

#: ``norm(x, rows)``: the Frobenius norm of a whole tensor of which this process holds ``x``, its rows
#: when ``rows`` (a placement's :meth:`~gradproj.optim.placement.Local.norm`; one process: ``x.norm()``)
Norm = Callable[[Tensor, bool], Tensor]


def local_norm(x: Tensor, rows: bool) -> Tensor:
    """The norm of a tensor that is all on this process."""
    return x.norm()


def limit_growth(
    update: Tensor, state: dict[str, Any], gamma: float, norm_of: Norm = local_norm, key: str = "residual_norm"
) -> Tensor:
    """``update``, shrunk if its norm grew by more than ``gamma`` since the last call (norm kept in ``state[key]``)."""
    norm = norm_of(update, True).to(torch.promote_types(update.dtype, torch.float32))
    if state.get(key) is None:
        state[key] = norm
        return update
    return update / growth_divisor(norm, state, gamma, key).to(update.dtype)


def growth_divisor(norm: Tensor, state: dict[str, Any], gamma: float, key: str = "residual_norm") -> Tensor:
    """What :func:`limit_growth` divides an update of ``norm`` by (1 on the first call), for callers that
    know the norm without forming the update; records the limited norm in ``state[key]``."""
    previous = state.get(key)
    if previous is None:
        state[key] = norm
        return torch.ones_like(norm)
    limiter = torch.clamp(norm / (previous + TINY), min=gamma) / gamma
    state[key] = norm / limiter
    return limiter


def limiter_bytes(dtype: torch.dtype) -> int:
    """Bytes of the one scalar :func:`limit_growth` keeps for updates of ``dtype``."""
    return torch.promote_types(dtype, torch.float32).itemsize
