"""The fast path's last move: ``W <- keep * W - step_size * combine(G, R, u)`` in as few passes over ``W``
and ``G`` as each residual policy allows: the pieces its policies' ``fused_step``
(:mod:`gradproj.optim.residuals`) are made of, tested against the per-parameter ``combine`` (``keep = 1 - lr *
weight_decay``).

``none`` (GaLore)
    one ``addmm_``: decay, lift and update in one BLAS call.
``fira``, one-sided basis
    ``D = G - up(R)`` (one BLAS call), the limiter's norm from ``D``'s channel norms
    (``||D diag(phi)||^2 = sum_j phi_j^2 ||D_j||^2``: no ``m x n`` product is formed), then the ``addmm_``
    above and one ``addcmul_`` of ``D`` scaled per channel: four passes where the for-loop takes seven.
``apollo``, one-sided basis
    the limiter's norm from ``G``'s channel norms, then one ``addcmul_`` of ``G`` scaled per channel.
anything else (Alice, two-sided bases, the identity)
    the for-loop's own :func:`~gradproj.optim.residual.combine`, decay and add.

Example:
    >>> import torch
    >>> w, p = torch.zeros(4, 3), torch.eye(4, 2)  # a left basis: up(u) = P u is 4 x 3
    >>> lift_into(w, torch.ones(2, 3), (p, None), keep=1.0, alpha=-0.5)
    >>> w[:, 0].tolist()
    [-0.5, -0.5, 0.0, 0.0]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..projection.bases import Bases
from ..rules.limiter import growth_divisor


def decay_only(weight: Tensor, keep: float) -> None:
    """Decoupled decay alone (where no BLAS call can fold it in); nothing at all without decay."""
    if keep != 1:
        weight.mul_(keep)


def limited(x: Tensor, phi: Tensor, side: str, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
    """``phi`` divided by what the growth limiter divides ``x * phi`` by (its norm recorded in ``state``),
    with that norm taken from ``x``'s channel norms instead of the product."""
    channels = torch.linalg.vector_norm(x, dim=0 if side == "left" else 1, keepdim=side == "right")  # n or m x 1
    norm = (channels * phi).norm().to(torch.promote_types(x.dtype, torch.float32))
    return phi / growth_divisor(norm, state, group["growth_limit"]).to(phi.dtype)


def lift_into(weight: Tensor, u: Tensor, bases: Bases, keep: float, alpha: float) -> None:
    """``weight <- keep * weight + alpha * up(u)`` in one BLAS call (two for a two-sided basis; none for
    the identity, whose ``u`` is full size)."""
    left, right = bases
    if left is not None and right is not None:
        weight.addmm_(left @ u, right, beta=keep, alpha=alpha)  # (m, r) @ (r, n)
    elif left is not None:
        weight.addmm_(left, u, beta=keep, alpha=alpha)  # (m, r) @ (r, n)
    elif right is not None:
        weight.addmm_(u, right, beta=keep, alpha=alpha)  # (m, r) @ (r, n)
    else:
        weight.mul_(keep).add_(u, alpha=alpha)  # (m, n)
