"""What happens to the part of the gradient the basis does not capture.

``none`` (GaLore)
    update = scale * up(u)

``fira`` (Chen et al., 2024)
    update = scale * up(u) + limit(phi * (G - up(R)))
    with ``phi = ||u|| / ||R||`` per channel of the uncompressed dimension. We ship the exact
    complement ``G - P P^T G``; the released Fira code subtracts ``scale * P P^T G`` instead,
    which leaks ``(1 - scale) P P^T G`` of the in-subspace gradient into the residual whenever
    ``scale != 1``. With ``scale = 1`` the two coincide (tested against ``fira==1.0.2``).

``apollo`` (Zhu et al., 2024)
    update = sqrt(scale) * limit(phi * G)
    with ``phi = ||u|| / ||R_jl||`` per channel (``scale_type="channel"``) or for the whole
    tensor (``"tensor"``; APOLLO-Mini is ``rank=1`` with it). APOLLO defines ``R_jl`` with a
    norm-preserving Gaussian projection (entries N(0, 1/r)); our bases are orthonormal, so we
    use ``||R_jl|| = sqrt(d / r) ||R||`` with ``d`` the compressed dimension, which keeps ``phi``
    and APOLLO's published ``scale`` values meaningful for every projector.

``limit`` is Fira's norm-growth limiter: if ``||x_t|| > gamma ||x_{t-1}||`` then ``x_t`` is
rescaled to ``gamma ||x_{t-1}||`` (``gamma = growth_limit = 1.01``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..projection.sides import project_up

RESIDUALS = ("none", "fira", "apollo")
SCALE_TYPES = ("channel", "tensor")
_TINY = 1e-8

#: ``norm(x, rows)``: the Frobenius norm of a whole tensor of which this process holds ``x``, its rows
#: when ``rows`` (a placement's :meth:`~gradproj.optim.placement.Local.norm`; one process: ``x.norm()``)
Norm = Callable[[Tensor, bool], Tensor]


def _local_norm(x: Tensor, rows: bool) -> Tensor:
    return x.norm()


def norm_ratio(u: Tensor, low: Tensor, side: str, scale_type: str, norm: Norm = _local_norm) -> Tensor:
    """``||u|| / (||low|| + 1e-8)`` per channel of the uncompressed dimension, or per tensor.

    Left projections (``r x n``) give one factor per column (shape ``n``); right projections
    (``m x r``) one per row (shape ``m x 1``); ``full`` has no uncompressed dimension and
    always uses the tensor-wise ratio. Per channel, the norms never cross processes (a right
    projection's rows are the weight's rows); per tensor, ``norm`` sums a right projection's rows.
    """
    if scale_type == "tensor" or side == "full":
        rows = side == "right"
        return norm(u, rows) / (norm(low, rows) + _TINY)
    if side == "left":
        return u.norm(dim=0) / (low.norm(dim=0) + _TINY)
    return (u.norm(dim=1) / (low.norm(dim=1) + _TINY)).unsqueeze(1)


def limit_growth(update: Tensor, state: dict[str, Any], gamma: float, norm_of: Norm = _local_norm) -> Tensor:
    """Fira's norm-growth limiter; keeps the previous norm in ``state["residual_norm"]``."""
    norm = norm_of(update, True).to(torch.promote_types(update.dtype, torch.float32))
    previous = state.get("residual_norm")
    if previous is None:
        state["residual_norm"] = norm
        return update
    limiter = torch.clamp(norm / (previous + _TINY), min=gamma) / gamma
    state["residual_norm"] = norm / limiter
    return update / limiter.to(update.dtype)


def scaling_factor(
    grad_shape: tuple[int, ...], low: Tensor, u: Tensor, side: str, group: dict[str, Any], norm: Norm = _local_norm
) -> Tensor:
    """Fira's or APOLLO's ``phi`` (per channel or per tensor) for a gradient of ``grad_shape`` (the whole matrix)."""
    phi = norm_ratio(u, low, side, group["scale_type"], norm)
    if group["residual"] != "apollo":
        return phi
    rank = low.shape[0] if side == "left" else low.shape[-1]
    compressed = grad_shape[0] if side == "left" else grad_shape[1]
    numel = grad_shape[0] * grad_shape[1]
    return phi / ((compressed / rank) ** 0.5 if side != "full" else (numel / low.numel()) ** 0.5)


def combine(
    grad: Tensor | None,
    low: Tensor,
    u: Tensor,
    bases: tuple[Tensor | None, Tensor | None],
    side: str,
    group: dict[str, Any],
    state: dict[str, Any],
    *,
    shape: tuple[int, int] | None = None,
    norm: Norm = _local_norm,
) -> tuple[Tensor, Tensor | None]:
    """The full-space update direction for one projected parameter (before ``-step_size``), and Fira's or
    APOLLO's scaling factor ``phi`` (None for GaLore), which probes report.

    ``grad`` may be None for the plain GaLore update (``residual="none"``), which needs only ``low``.
    ``shape`` is the whole matrix's (default ``grad``'s) and ``norm`` the placement's, for a process
    that holds only rows of ``grad`` (FSDP2; see :mod:`gradproj.optim.placement`).
    """
    kind = group["residual"]
    left, right = bases
    if kind != "none" and grad is None:
        raise ValueError(f"residual={kind!r} needs the full gradient")
    if kind == "apollo":
        assert grad is not None
        phi = scaling_factor(shape or tuple(grad.shape), low, u, side, group, norm)
        update = limit_growth(grad * phi.to(grad.dtype), state, group["growth_limit"], norm) * group["scale"] ** 0.5
        return update, phi
    update = project_up(u.to(low.dtype), left, right) * group["scale"]
    if kind != "fira":
        return update, None
    assert grad is not None
    phi = scaling_factor(shape or tuple(grad.shape), low, u, side, group, norm)
    residual = grad - project_up(low, left, right)
    return update + limit_growth(residual * phi.to(grad.dtype), state, group["growth_limit"], norm), phi
