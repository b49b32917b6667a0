"""What happens to the part of the gradient the basis does not capture: the maths of each residual policy
(the policies themselves, their capabilities and registry: :mod:`gradproj.optim.residuals`).

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

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..projection.sides import project_up
from ..rules.base import ALL_ROWS, Rows
from ..rules.limiter import TINY as _TINY
from ..rules.limiter import Norm, growth_divisor, local_norm

SCALE_TYPES = ("channel", "tensor")
#: floor of Alice's per-channel discarded energy (the paper's and pytorch_optimizer's)
ENERGY_FLOOR = 1e-8


@dataclass
class Inputs:
    """One projected parameter's step as a residual policy sees it: its gradient (this process's rows; None where
    the policy does not read it), ``R``, the rule's direction ``u``, the basis and its side, the group's options,
    the parameter's state and the whole matrix's shape, and the placement's sums over rows."""

    grad: Tensor | None
    low: Tensor
    u: Tensor
    bases: tuple[Tensor | None, Tensor | None]
    side: str
    group: dict[str, Any]
    state: dict[str, Any]
    shape: tuple[int, ...]
    rows: Rows = ALL_ROWS

    @property
    def full(self) -> Tensor:
        """The gradient, which a policy that reads it always gets."""
        assert self.grad is not None
        return self.grad


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
    """Fira's or APOLLO's ``phi`` (per channel or per tensor) for a gradient of ``grad_shape`` (the whole matrix):
    APOLLO's (``group["residual"] == "apollo"``) in the norm of its Gaussian projection."""
    phi = norm_ratio(u, low, side, group["scale_type"], norm)
    if group["residual"] != "apollo":
        return phi
    if side == "none":  # the identity: R is G, nothing is compressed
        return phi
    rank = low.shape[0] if side == "left" else low.shape[-1]
    compressed = grad_shape[0] if side == "left" else grad_shape[1]
    numel = grad_shape[0] * grad_shape[1]
    return phi / ((compressed / rank) ** 0.5 if side != "full" else (numel / low.numel()) ** 0.5)


def galore_update(low: Tensor, u: Tensor, bases: tuple[Tensor | None, Tensor | None], group: dict[str, Any]) -> Tensor:
    """GaLore's ``scale * up(u)`` (m x n), scaled in the low-rank space."""
    return project_up((u * group["scale"]).to(low.dtype), *bases)


def discarded(grad: Tensor, low: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``G - up(R)``, the part of the gradient the basis leaves out, as a fresh tensor (m x n; one
    allocation for a one-sided basis)."""
    if left is not None and right is None:
        return torch.addmm(grad, left.to(grad.dtype), low.to(grad.dtype), alpha=-1)
    if right is not None and left is None:
        return torch.addmm(grad, low.to(grad.dtype), right.to(grad.dtype), alpha=-1)
    return grad - project_up(low, left, right)


def alice_update(x: Inputs) -> tuple[Tensor, Tensor]:
    """Alice's update ``scale * (up(u) + compensation_scale * limit(C))`` (m x n) and its per-channel
    factor ``sqrt(d - r) / sqrt(p)``, with one matmul and two passes over ``G``.

    Keeps ``p`` in ``state["compensation_sq"]`` (one number per uncompressed channel, float32 or wider).
    The basis is orthonormal, so ``C``'s norm follows from the channel energies already at hand
    (``||C||^2 = sum_j f_j^2 (||G_:j||^2 - ||R_:j||^2)``), and with ``w = scale * compensation_scale *
    f / limiter`` the update folds into ``w G + P (scale u - w R)`` (left; right: ``G w + (scale u - R w) Q``):
    ``C`` is never formed. ``x.grad`` may be this process's rows of a matrix of ``x.shape`` (FSDP2): sums over rows
    go through ``x.rows.total``.
    """
    grad, low, u, bases, side, group, state, rows = x.full, x.low, x.u, x.bases, x.side, x.group, x.state, x.rows
    shape = x.shape
    if side not in ("left", "right"):
        raise ValueError(f"residual='alice' needs a one-sided basis; got side {side!r} (use proj_type std/left/right)")
    compressed = 0 if side == "left" else 1  # energies sum over the compressed dimension
    wide = torch.promote_types(grad.dtype, torch.float32)
    # fused reductions: no m x n temporary for the squares
    energy = torch.linalg.vector_norm(grad, dim=compressed, dtype=wide).square()  # n (left) or m_i (right)
    if side == "left":  # summed over the rows of G that other processes hold; R is whole here
        energy = rows.total(energy)
    energy -= torch.linalg.vector_norm(low, dim=compressed, dtype=wide).square()  # what the basis discards
    p = state.get("compensation_sq")
    if p is None:
        p = state["compensation_sq"] = torch.zeros_like(energy)
    p.lerp_(energy, 1 - group["compensation_beta"]).clamp_min_(ENERGY_FLOOR)
    discarded = shape[compressed] - low.shape[compressed]  # d - r, of the whole matrix
    factor = discarded**0.5 / p.sqrt()  # per channel
    square = factor.square().mul_(energy.clamp_min(0)).sum()  # ||C||^2
    if side == "right":  # channels are rows: other processes hold the rest
        square = rows.total(square)
    shrink = growth_divisor(square.sqrt(), state, group["growth_limit"])
    weight = factor * (group["scale"] * group["compensation_scale"] / shrink)  # w, per channel
    scaled_u = u.to(grad.dtype) * group["scale"]
    left, right = bases
    if left is not None:  # scale P u + w (G - P R) = w G + P (scale u - w R)
        w = weight.unsqueeze(0).to(grad.dtype)  # 1 x n
        update = torch.addmm(grad * w, left.to(grad.dtype), scaled_u.sub_(low.to(grad.dtype) * w))
    else:
        w = weight.unsqueeze(1).to(grad.dtype)  # m_i x 1
        update = torch.addmm(grad * w, scaled_u.sub_(low.to(grad.dtype) * w), right.to(grad.dtype))  # type: ignore[union-attr]
    return update, factor.unsqueeze(0) if side == "left" else factor.unsqueeze(1)
