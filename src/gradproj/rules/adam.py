"""Adam in the (projected) space.

For the ``t``-th update of the moments, ``m = lerp(m, g, 1 - beta1)`` and
``v = beta2 v + (1 - beta2) g^2``. Where ``eps`` goes differs between the implementations we
reproduce, and we follow each one in the place it is the reference:

* full-rank groups (no ``rank``) use torch.optim.AdamW's arithmetic, ``eps`` inside the bias
  correction: ``p -= lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps)``, so such a group
  is bit-for-bit ``torch.optim.AdamW``;
* projected groups use galore-torch's (also Fira's and APOLLO's): ``u = m / (sqrt(v) + eps)``
  with ``step_size = lr sqrt(1-beta2^t)/(1-beta1^t)`` (``lr`` alone when the group sets
  ``bias_correction=False``, as Alice's paper-literal moments do). The direction ``u`` then has the
  scale those methods' norm-ratio scaling and growth limiter were tuned on, and their
  published ``eps`` means the same thing here.

The two agree exactly when ``eps = 0``.

Example:
    >>> import torch
    >>> rule, state = Adam(), {}
    >>> rule.init_state(state, (2, 3), torch.zeros(1))
    >>> u, s = rule.direction(torch.ones(2, 3), state, {"lr": 0.1, "betas": (0.9, 0.999), "eps": 0.0}, None)
    >>> round(float(u[0, 0]), 4), round(s, 4)
    (3.1623, 0.0316)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import ALL_ROWS, Rows, UpdateRule, learning_rate


def update_moments(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
    """Advance Adam's moments in place (torch's ``lerp_`` form)."""
    beta1, beta2 = group["betas"]
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def torch_denom(exp_avg_sq: Tensor, step: int, group: dict[str, Any]) -> tuple[Tensor, float]:
    """torch.optim.AdamW's ``(denom, step_size)``: eps inside the bias correction."""
    beta1, beta2 = group["betas"]
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
    return denom, learning_rate(group) / bias_correction1


def galore_direction(exp_avg: Tensor, exp_avg_sq: Tensor, step: int, group: dict[str, Any]) -> tuple[Tensor, float]:
    """galore-torch's ``(m / (sqrt(v) + eps), lr sqrt(1-beta2^t) / (1-beta1^t))``; with the group's
    ``bias_correction`` off (Alice's moments), the step size is ``lr`` itself."""
    return galore_ratio(exp_avg, exp_avg_sq, group["eps"]), galore_step_size(step, group)


def galore_ratio(exp_avg: Tensor, exp_avg_sq: Tensor, eps: float) -> Tensor:
    """``m / (sqrt(v) + eps)``, a fresh tensor."""
    return exp_avg / exp_avg_sq.sqrt().add_(eps)


def galore_step_size(step: int, group: dict[str, Any]) -> float:
    """The step size of :func:`galore_direction` at the ``step``-th moment update."""
    if not group.get("bias_correction", True):
        return float(learning_rate(group))
    beta1, beta2 = group["betas"]
    return float(learning_rate(group) * math.sqrt(1 - beta2**step) / (1 - beta1**step))


class Adam(UpdateRule):
    """Adam moments in the dtype of the gradient they follow."""

    name = "adam"
    fast_kernel = True

    def init_state(
        self, state: dict[str, Any], shape: tuple[int, ...], like: Tensor, full_shape: tuple[int, ...] | None = None
    ) -> None:
        state["exp_avg"] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        state["moment_step"] = 0

    def direction(
        self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], param: Tensor, rows: Rows = ALL_ROWS
    ) -> tuple[Tensor, float]:
        state["moment_step"] += 1
        update_moments(state["exp_avg"], state["exp_avg_sq"], grad, group)
        return galore_direction(state["exp_avg"], state["exp_avg_sq"], state["moment_step"], group)

    def apply_full(
        self, param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any], rows: Rows = ALL_ROWS
    ) -> None:
        state["moment_step"] += 1
        update_moments(state["exp_avg"], state["exp_avg_sq"], grad, group)
        denom, step_size = torch_denom(state["exp_avg_sq"], state["moment_step"], group)
        param.addcdiv_(state["exp_avg"], denom, value=-step_size)

    def moments(self, state: dict[str, Any]) -> dict[str, Tensor]:
        return {"first": state["exp_avg"], "second": state["exp_avg_sq"]}

    def set_moments(self, state: dict[str, Any], moments: dict[str, Tensor]) -> None:
        state["exp_avg"] = moments["first"].to(state["exp_avg"].dtype)
        state["exp_avg_sq"] = moments["second"].clamp_min(0).to(state["exp_avg_sq"].dtype)

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any] | None = None) -> int:
        return 2 * _numel(shape) * dtype.itemsize


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
