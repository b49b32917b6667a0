"""The fast path's last move: ``W <- keep * W - step_size * combine(G, R, u)`` in as few passes over ``W``
and ``G`` as each residual policy allows (:mod:`gradproj.optim.residual` is the per-parameter ground
truth these are tested against; ``keep = 1 - lr * weight_decay``).

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
    >>> w, g = torch.zeros(4, 3), torch.ones(4, 3)
    >>> p = torch.eye(4, 2)  # a left basis: R = P^T G is 2 x 3
    >>> group = {"residual": "none", "scale": 1.0, "weight_decay": 0.0}
    >>> step_weight(w, g, p.T @ g, torch.ones(2, 3), (p, None), "left", group, {}, keep=1.0, step_size=0.5)
    >>> w[:, 0].tolist()
    [-0.5, -0.5, 0.0, 0.0]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..projection.bases import Bases
from ..rules.limiter import growth_divisor
from .residual import combine, discarded, scaling_factor

#: the sides whose channels (columns of a left basis' ``R``, rows of a right one's) the fused policies scale
_ONE_SIDED = ("left", "right")


def step_weight(
    weight: Tensor,
    grad: Tensor,
    low: Tensor,
    u: Tensor,
    bases: Bases,
    side: str,
    group: dict[str, Any],
    state: dict[str, Any],
    *,
    keep: float,
    step_size: float,
) -> None:
    """``weight <- keep * weight - step_size * combine(grad, low, u)``; ``u`` is the rule's direction before
    ``scale`` (scaled here, in place), ``state`` the parameter's (the limiter's norm lives there)."""
    kind = group["residual"]
    if kind == "none":
        lift_into(weight, u.mul_(group["scale"]), bases, keep, -step_size)
    elif kind == "fira" and side in _ONE_SIDED:
        phi = scaling_factor(tuple(grad.shape), low, u, side, group)  # of u before its scale
        residual = discarded(grad, low, *bases)  # G - up(R), m x n
        w = limited(residual, phi, side, state, group)
        lift_into(weight, u.mul_(group["scale"]), bases, keep, -step_size)
        weight.addcmul_(residual, w.to(weight.dtype), value=-step_size)  # m x n, w per channel
    elif kind == "apollo" and side in _ONE_SIDED:
        phi = scaling_factor(tuple(grad.shape), low, u, side, group)
        w = limited(grad, phi, side, state, group) * group["scale"] ** 0.5
        _decay(weight, keep)
        weight.addcmul_(grad, w.to(weight.dtype), value=-step_size)  # m x n, w per channel
    else:
        update, _ = combine(grad, low, u, bases, side, group, state)
        _decay(weight, keep)
        weight.add_(update, alpha=-step_size)


def _decay(weight: Tensor, keep: float) -> None:
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
