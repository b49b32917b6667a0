"""GradNormLoRP's weight normalisation (Huang et al., 2025), kept inside the optimizer.

GradNormLoRP writes each projected matrix row by row as ``W = g * v / ||v||`` (Salimans & Kingma's
weight normalisation; the paper's ``M (W0 + IJ) / ||W0 + IJ||_c`` in ``W``-transposed notation, one
magnitude per output unit), starts from ``v = W0`` and ``g = ||W0||``, and trains the direction ``v``
with GaLore and the magnitude ``g`` with Adam. By the chain rule, with ``w_hat = v / ||v||`` (the rows
of ``W / g``):

* ``dL/dg = rowsum(G * w_hat)`` (one number per row),
* ``dL/dv = (g / ||v||) (G - dL/dg w_hat)``: the gradient with each row's radial part removed, scaled.

The model is never changed: the optimizer keeps ``g`` and ``||v||`` (one number per row each) and the
magnitude's two Adam moments, and rebuilds ``v = ||v|| W / g`` from the weight itself, so that the
reparametrisation costs ``4 m`` numbers of state for an ``m x n`` matrix, no extra weight copy, no extra
activation memory and nothing at inference (export has nothing to merge). Each step:

1. ``v, G_v, G_g`` from ``W``, ``G`` and the state (:func:`split`);
2. the projected step (:func:`gradproj.optim.step.projected_step`) moves ``v`` by ``-s * update``, its
   basis refreshed from ``G_v``;
3. ``g`` takes AdamW's step at ``lr * scale`` (the rate GaLore's update of ``W`` has), its decoupled
   decay ``g *= 1 - lr * weight_decay`` being the same decay of ``W`` GaLore applies;
4. ``W = g * v / ||v||`` and ``||v||`` is stored (:func:`recompose`).

Example:
    >>> import torch
    >>> w, state = torch.tensor([[3.0, 4.0]]), {}
    >>> init_state(state, w, "w")
    >>> v, grad_v, grad_g = split(w, torch.tensor([[1.0, 0.0]]), state)
    >>> grad_g, grad_v   # the radial part (0.6 of the gradient along w_hat = [0.6, 0.8]) is removed
    (tensor([0.6000]), tensor([[ 0.6400, -0.4800]]))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..rules.adam import torch_denom, update_moments
from ..rules.base import learning_rate

#: the state a weight-normalised matrix keeps beside its projected state: ``g``, ``||v||`` and ``g``'s moments
KEYS = ("magnitude", "direction_norm", "magnitude_exp_avg", "magnitude_exp_avg_sq")
#: the update rules whose groups may set ``weight_norm=True`` (the magnitude's step reads Adam's betas and eps)
RULES = ("adam", "adam8bit")


def normalized(group: dict[str, Any]) -> bool:
    """Whether ``group``'s matrices are weight-normalised (``weight_norm=True``)."""
    return bool(group.get("weight_norm", False))


def init_state(state: dict[str, Any], weight: Tensor, name: str) -> None:
    """``g = ||v|| = ||W||`` per row (``v`` starts as ``W`` itself, as ``torch.nn.utils.parametrizations.weight_norm``
    does) and zeroed moments of ``g``; a zero row has no direction, so it is refused."""
    norms = torch.linalg.vector_norm(weight, dim=1)  # m
    zero = torch.nonzero(norms == 0)
    if zero.numel():
        raise ValueError(
            f"{name} has {zero.numel()} zero row(s) (row {int(zero[0])} first); weight_norm=True writes each row as "
            "g * v / ||v|| and a zero row has no direction v (initialise those rows, or put the matrix in a group "
            "with weight_norm=False)"
        )
    state["magnitude"] = norms
    state["direction_norm"] = norms.clone()
    state["magnitude_exp_avg"] = torch.zeros_like(norms)
    state["magnitude_exp_avg_sq"] = torch.zeros_like(norms)


def split(weight: Tensor, grad: Tensor, state: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """``(v, dL/dv, dL/dg)`` for the weight ``W = g v / ||v||`` and its gradient ``G``; ``v`` is a fresh tensor."""
    magnitude, norm = state["magnitude"], state["direction_norm"]  # m, m
    unit = weight / magnitude[:, None]  # m x n: w_hat, rows of norm one
    grad_magnitude = (grad * unit).sum(1)  # m
    grad_direction = (grad - grad_magnitude[:, None] * unit).mul_((magnitude / norm)[:, None])  # m x n
    return unit.mul_(norm[:, None]), grad_direction, grad_magnitude


def recompose(
    weight: Tensor, direction: Tensor, grad_magnitude: Tensor, state: dict[str, Any], group: dict[str, Any], step: int
) -> None:
    """After the projected step moved ``direction`` (``v``): AdamW's ``step``-th step of ``g`` at ``lr * scale``,
    then ``W = g v / ||v||`` in place and the new ``||v||`` kept."""
    magnitude = state["magnitude"]
    lr = learning_rate(group)
    rate = {**group, "lr": lr * group["scale"]}
    magnitude.mul_(1 - lr * group["weight_decay"])  # decoupled decay of g: the same as of W
    update_moments(state["magnitude_exp_avg"], state["magnitude_exp_avg_sq"], grad_magnitude, rate)
    denom, step_size = torch_denom(state["magnitude_exp_avg_sq"], step, rate)
    magnitude.addcdiv_(state["magnitude_exp_avg"], denom, value=-step_size)
    norm = torch.linalg.vector_norm(direction, dim=1)  # m
    state["direction_norm"] = norm
    weight.copy_(direction.mul_((magnitude / norm)[:, None]))


def state_bytes(rows: int, dtype: torch.dtype) -> int:
    """Bytes of :data:`KEYS` for a matrix of ``rows`` rows whose step computes in ``dtype``."""
    return len(KEYS) * rows * dtype.itemsize
