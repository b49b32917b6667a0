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

``alice`` (Gong et al., 2025: Alice's compensation, Alg. 3)
    update = scale * (up(u) + compensation_scale * limit(C))
    with ``C = sqrt(d - r) (G - up(R)) Diag(p)^{-1/2}``, ``d`` the compressed dimension and ``p`` the
    moving average (``compensation_beta``) of each uncompressed channel's discarded energy
    ``||G_:j||^2 - ||R_:j||^2``, floored at 1e-8. With an orthonormal basis that energy is
    ``||(G - up(R))_:j||^2``: ``C`` is the residual whitened per channel, as if its energy were spread
    evenly over the ``d - r`` discarded directions.

``limit`` is Fira's norm-growth limiter (:func:`gradproj.rules.limiter.limit_growth`): if
``||x_t|| > gamma ||x_{t-1}||`` then ``x_t`` is rescaled to ``gamma ||x_{t-1}||`` (``gamma = growth_limit = 1.01``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..projection.sides import project_up
from ..rules.limiter import TINY as _TINY
from ..rules.limiter import Norm, limit_growth, local_norm

RESIDUALS = ("none", "fira", "apollo", "alice")
SCALE_TYPES = ("channel", "tensor")
#: floor of Alice's per-channel discarded energy (the paper's and pytorch_optimizer's)
ENERGY_FLOOR = 1e-8


def norm_ratio(u: Tensor, low: Tensor, side: str, scale_type: str, norm: Norm = local_norm) -> Tensor:
    """``||u|| / (||low|| + 1e-8)`` per channel of the uncompressed dimension, or per tensor.

    Left projections (``r x n``) give one factor per column (shape ``n``); right projections
    (``m x r``) one per row (shape ``m x 1``); ``full`` has no uncompressed dimension and
    always uses the tensor-wise ratio. Per channel, the norms never cross processes (a right
    projection's rows are the weight's rows); per tensor, ``norm`` sums a right projection's rows.
    """
    if scale_type == "tensor" or side in ("full", "none"):
        rows = side in ("right", "none")  # R's rows are the weight's (sharded) rows
        return norm(u, rows) / (norm(low, rows) + _TINY)
    if side == "left":
        return u.norm(dim=0) / (low.norm(dim=0) + _TINY)
    return (u.norm(dim=1) / (low.norm(dim=1) + _TINY)).unsqueeze(1)


def scaling_factor(
    grad_shape: tuple[int, ...], low: Tensor, u: Tensor, side: str, group: dict[str, Any], norm: Norm = local_norm
) -> Tensor:
    """Fira's or APOLLO's ``phi`` (per channel or per tensor) for a gradient of ``grad_shape`` (the whole matrix)."""
    phi = norm_ratio(u, low, side, group["scale_type"], norm)
    if group["residual"] != "apollo":
        return phi
    if side == "none":  # the identity: R is G, nothing is compressed
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
    norm: Norm = local_norm,
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
    if kind == "alice":
        assert grad is not None
        compensation, phi = alice_compensation(grad, low, bases, side, group, state, norm)
        return update.add_(compensation, alpha=group["scale"] * group["compensation_scale"]), phi
    if kind != "fira":
        return update, None
    assert grad is not None
    phi = scaling_factor(shape or tuple(grad.shape), low, u, side, group, norm)
    residual = grad - project_up(low, left, right)
    return update + limit_growth(residual * phi.to(grad.dtype), state, group["growth_limit"], norm), phi


def alice_compensation(
    grad: Tensor,
    low: Tensor,
    bases: tuple[Tensor | None, Tensor | None],
    side: str,
    group: dict[str, Any],
    state: dict[str, Any],
    norm: Norm = local_norm,
) -> tuple[Tensor, Tensor]:
    """Alice's limited compensation ``limit(C)`` (m x n) and its per-channel factor ``sqrt(d - r) / sqrt(p)``.

    Keeps ``p`` in ``state["compensation_sq"]`` (one number per uncompressed channel, float32 or wider).
    """
    if side not in ("left", "right"):
        raise ValueError(f"residual='alice' needs a one-sided basis; got side {side!r} (use proj_type std/left/right)")
    compressed = 0 if side == "left" else 1  # energies sum over the compressed dimension
    wide = torch.promote_types(grad.dtype, torch.float32)
    # fused reductions: no m x n temporary for the squares
    energy = torch.linalg.vector_norm(grad, dim=compressed, dtype=wide).square()  # n (left) or m
    energy -= torch.linalg.vector_norm(low, dim=compressed, dtype=wide).square()
    p = state.get("compensation_sq")
    if p is None:
        p = state["compensation_sq"] = torch.zeros_like(energy)
    p.lerp_(energy, 1 - group["compensation_beta"]).clamp_min_(ENERGY_FLOOR)
    discarded = grad.shape[compressed] - low.shape[compressed]  # d - r
    factor = discarded**0.5 / p.sqrt()  # per channel
    factor = factor.unsqueeze(0) if side == "left" else factor.unsqueeze(1)
    left, right = bases
    if left is not None:  # one m x n allocation: G - P R
        residual = torch.addmm(grad, left.to(grad.dtype), low.to(grad.dtype), alpha=-1)
    else:
        residual = torch.addmm(grad, low.to(grad.dtype), right.to(grad.dtype), alpha=-1)  # type: ignore[union-attr]
    compensation = limit_growth(residual.mul_(factor.to(grad.dtype)), state, group["growth_limit"], norm)
    return compensation, factor
