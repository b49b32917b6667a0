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

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..rules.adam import torch_denom, update_moments
from ..rules.base import UpdateRule, learning_rate
from .component import LowRankUpdate, Reparametrisation

if TYPE_CHECKING:
    from .step import ProjectedContext

#: the state a weight-normalised matrix keeps beside its projected state: ``g``, ``||v||`` and ``g``'s moments
KEYS = ("magnitude", "direction_norm", "magnitude_exp_avg", "magnitude_exp_avg_sq")
#: the update rules whose groups may set ``weight_norm=True`` (the magnitude's step reads Adam's betas and eps)
RULES = ("adam", "adam8bit")


class WeightNorm(Reparametrisation):
    """``weight_norm=True``: GradNormLoRP's ``W = g v / ||v||`` per row, the projected step on ``v`` (the module)."""

    name = "weight_norm"
    value = True
    defaults: ClassVar[dict[str, Any]] = {}
    fast_blocker = "weight_norm=True steps the direction and the magnitude of one matrix at a time"
    sharding_blocker = "weight_norm=True rebuilds each matrix from its rows' magnitudes on one process"

    def step(
        self, ctx: ProjectedContext, weight: Tensor, grad: Tensor | None, low: Tensor | None, update: LowRankUpdate
    ) -> None:
        """Steps 1-4 of the module: the projected step moves the direction ``v``; then ``g``, then ``W``."""
        assert grad is not None, "a weight-normalised matrix always takes its full gradient (needs_full_gradient)"
        direction, grad_direction, grad_magnitude = split(weight, grad, ctx.state)
        move, step_size = update(ctx, direction, grad_direction, None)
        direction.add_(move, alpha=-step_size)
        recompose(weight, direction, grad_magnitude, ctx.state, ctx.group, ctx.state["step"] + 1)

    def needs_full_gradient(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        return True  # the direction's gradient reads G's rows

    def init_state(self, ctx: ProjectedContext, weight: Tensor) -> None:
        init_state(ctx.state, weight, ctx.name)

    def state_bytes(self, shape: tuple[int, ...], group: dict[str, Any], dtype: torch.dtype) -> int:
        return state_bytes(shape[0], dtype)

    def check(self, group: dict[str, Any]) -> None:
        if not isinstance(group["weight_norm"], bool):
            raise ValueError(f"weight_norm={group['weight_norm']!r} is not valid; expected True or False")

    def conflict(self, group: dict[str, Any], rule: UpdateRule | None) -> str | None:
        """GaLore on the direction of a weight-normalised matrix: no residual policy on it, no ranks planned from
        ``G`` (the direction has its own gradient), and a rule with Adam's betas and eps for the magnitude."""
        if group["residual"] != "none":
            return (
                f"weight_norm=True runs GaLore's step on each row's direction; residual={group['residual']!r} on the "
                "direction is not built (use residual='none')"
            )
        if group.get("rank") == "auto":
            return (
                "weight_norm=True is not supported with rank='auto' (its ranks are planned from G, not from the "
                "direction's gradient; use an integer rank)"
            )
        if rule is not None and rule.name not in RULES:
            return (
                f"weight_norm=True steps each row's magnitude with Adam's betas and eps; the {rule.name} rule has none "
                f"(use one of {RULES}: GradNormLoRP, GradNormLoRP8bit)"
            )
        return None


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
