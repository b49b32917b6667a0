"""Adafactor (Shazeer & Stern, 2018) with the conventions of ``transformers.Adafactor``.

For the ``t``-th update, with ``beta2_t = 1 - t^decay_rate`` and the step ``rho_t = lr`` (or, when
``relative_step``, transformers' relative step ``min(1e-2, 1/sqrt(t))`` scaled by ``lr / 1e-2``, so the
default ``lr = 1e-2`` is transformers' exactly and a scheduler's factor scales every step)::

    V  ~ row (x) col / mean(row)   rows/cols are EMAs of mean(g^2 + eps1) (factored, >= 2-D)
    u  = g / sqrt(V);  u /= max(1, RMS(u) / clip_threshold)
    u  = EMA_beta1(u) if beta1 is set
    step_size = rho_t * max(eps2, RMS(param)) if scale_parameter else rho_t

Example:
    >>> import torch
    >>> rule, state = Adafactor(), {}
    >>> rule.init_state(state, (4, 3), torch.zeros(1))
    >>> sorted(k for k in state if k.startswith("exp"))
    ['exp_avg_sq_col', 'exp_avg_sq_row']
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .adam import _numel
from .base import ALL_ROWS, Rows, UpdateRule, learning_rate

#: the relative step's ceiling in ``transformers.Adafactor``, and the ``lr`` at which ours equals it
RELATIVE_LR = 1e-2


def _rms(x: Tensor) -> Tensor:
    return x.norm(2) / (x.numel() ** 0.5)


def _factored(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2


class Adafactor(UpdateRule):
    """Factored second moment; optional first moment when ``beta1`` is set."""

    name = "adafactor"
    shardable = False
    unshardable_because = "its factored statistics average over whole rows and columns"

    def init_state(
        self, state: dict[str, Any], shape: tuple[int, ...], like: Tensor, full_shape: tuple[int, ...] | None = None
    ) -> None:
        def zeros(size: tuple[int, ...]) -> Tensor:
            return torch.zeros(size, dtype=like.dtype, device=like.device)

        if _factored(shape):
            state["exp_avg_sq_row"] = zeros(shape[:-1])
            state["exp_avg_sq_col"] = zeros(shape[:-2] + shape[-1:])
        else:
            state["exp_avg_sq"] = zeros(shape)
        state["moment_step"] = 0

    def relative_step(self, group: dict[str, Any]) -> bool:
        return bool(group["relative_step"])

    @staticmethod
    def step_size(state: dict[str, Any], group: dict[str, Any], param: Tensor) -> float:
        # a state dict from before lr was always a number holds None: transformers' relative step
        t, lr = state["moment_step"], RELATIVE_LR if group.get("lr") is None else learning_rate(group)
        if group["relative_step"]:
            ceiling = 1e-6 * t if group["warmup_init"] else RELATIVE_LR
            rho = lr / RELATIVE_LR * min(ceiling, 1.0 / math.sqrt(t))
        else:
            rho = lr
        if group["scale_parameter"]:
            rho *= max(group["eps"][1], float(_rms(param.to(torch.promote_types(param.dtype, torch.float32)))))
        return rho

    def direction(
        self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], param: Tensor, rows: Rows = ALL_ROWS
    ) -> tuple[Tensor, float]:
        state["moment_step"] += 1
        t = state["moment_step"]
        beta2t = 1.0 - math.pow(t, group["decay_rate"])
        squared = grad.square() + group["eps"][0]
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(squared.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(squared.mean(dim=-2), alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = grad * r_factor * c_factor
        else:
            state["exp_avg_sq"].mul_(beta2t).add_(squared, alpha=1.0 - beta2t)
            update = grad * state["exp_avg_sq"].rsqrt()
        update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        if group["beta1"] is not None:
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(update)
            state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
            update = state["exp_avg"].clone()
        return update, self.step_size(state, group, param)

    def moments(self, state: dict[str, Any]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            out["second"] = (
                row.unsqueeze(-1) * col.unsqueeze(-2) / row.mean(dim=-1, keepdim=True).unsqueeze(-1).clamp_min(1e-30)
            )
        else:
            out["second"] = state["exp_avg_sq"]
        if "exp_avg" in state:
            out["first"] = state["exp_avg"]
        return out

    def set_moments(self, state: dict[str, Any], moments: dict[str, Tensor]) -> None:
        second = moments["second"].clamp_min(0)
        if "exp_avg_sq_row" in state:
            state["exp_avg_sq_row"] = second.mean(dim=-1).to(state["exp_avg_sq_row"].dtype)
            state["exp_avg_sq_col"] = second.mean(dim=-2).to(state["exp_avg_sq_col"].dtype)
        else:
            state["exp_avg_sq"] = second.to(state["exp_avg_sq"].dtype)
        if "first" in moments:
            state["exp_avg"] = moments["first"]

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any] | None = None) -> int:
        """Second-moment bytes; add ``numel * itemsize`` when ``beta1`` is set."""
        if _factored(shape):
            return (_numel(shape[:-1]) + _numel(shape[:-2] + shape[-1:])) * dtype.itemsize
        return _numel(shape) * dtype.itemsize
