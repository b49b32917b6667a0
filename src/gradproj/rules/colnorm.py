"""SCALE's update (Glentis et al. 2025, "A Minimalist Optimizer Design for LLM Pretraining", arXiv
2506.16659): SGD on the column-normalized gradient, with first-order momentum only where the group asks.

For a gradient ``G`` (``a x b``, torch's ``(out, in)`` layout) and ``momentum`` ``beta``::

    M = lerp(M, G, 1 - beta) if beta > 0 else G
    u = M / max(rms(M, norm_dim), 1e-8)          (rms over ``norm_dim``, kept as a row or column of scales)
    step size = lr

``norm_dim=1`` scales each output unit's weights (a row of torch's weight; a column of the paper's
``W^T``) to unit RMS, as the released code does for every linear layer; ``norm_dim=0`` scales each
column over the rows, as it does for the token embedding. The SCALE preset keeps momentum (0.9) on the
output head alone and none elsewhere: state ``momentum_buffer`` where ``momentum > 0``, else nothing.

Under FSDP2 a process holds some rows: ``norm_dim=1`` is row-local; ``norm_dim=0`` sums each column's
squares over every rank's rows (one all-reduce of ``b + 1`` numbers).

Example:
    >>> import torch
    >>> rule, state = ColumnNorm(), {}
    >>> rule.init_state(state, (2, 3), torch.zeros(1))
    >>> u, s = rule.direction(torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), state,
    ...                       {"lr": 0.1, "momentum": 0.0, "norm_dim": 1}, None)
    >>> [round(float(x), 4) for x in u.square().mean(dim=1)], s      # every row at unit RMS
    ([1.0, 1.0], 0.1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..options import check, option
from .adam import _numel
from .base import ALL_ROWS, Rows, UpdateRule, learning_rate

FLOOR = 1e-8  #: the released code's floor on each RMS


@dataclass(frozen=True)
class ColumnNormOptions:
    """The colnorm rule's own key (``momentum`` is the muon rule's key: the SCALE preset sets 0, its head 0.9)."""

    norm_dim: int = option(
        1, help="dimension each RMS is taken over: 1, each output unit's weights; 0, each input's", choices=(0, 1)
    )

    def __post_init__(self) -> None:
        check(self)


def column_rms(g: Tensor, dim: int, rows: Rows) -> Tensor:
    """The RMS of ``g`` over ``dim`` (kept), where ``g`` may be this process's rows of the whole matrix."""
    if dim == 1:
        return g.square().mean(dim=1, keepdim=True)  # (a, 1): every row is whole here
    sums = rows.total(torch.cat([g.square().sum(dim=0), g.new_full((1,), g.shape[0])]))  # (b + 1,)
    return (sums[:-1] / sums[-1]).unsqueeze(0)  # (1, b)


class ColumnNorm(UpdateRule):
    """Column-normalized SGD, with momentum where the group sets it; see the module docstring."""

    name = "colnorm"
    options_type = ColumnNormOptions

    def init_state(
        self, state: dict[str, Any], shape: tuple[int, ...], like: Tensor, full_shape: tuple[int, ...] | None = None
    ) -> None:
        state["moment_step"] = 0  # the buffer comes with the first gradient, only where the group keeps momentum

    def direction(
        self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], param: Tensor, rows: Rows = ALL_ROWS
    ) -> tuple[Tensor, float]:
        state["moment_step"] += 1
        g = grad if grad.dim() == 2 else grad.reshape(grad.shape[0], -1)
        if group["momentum"] > 0:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g)
            g = state["momentum_buffer"].lerp_(g, 1 - group["momentum"])
        u = g / column_rms(g, int(group["norm_dim"]), rows).sqrt().clamp_min(FLOOR)
        return u.reshape(grad.shape), learning_rate(group)

    def moments(self, state: dict[str, Any]) -> dict[str, Tensor]:
        return {"first": state["momentum_buffer"]} if "momentum_buffer" in state else {}

    def set_moments(self, state: dict[str, Any], moments: dict[str, Tensor]) -> None:
        if "first" in moments:
            state["momentum_buffer"] = moments["first"]

    def reset(self, state: dict[str, Any]) -> None:
        if "momentum_buffer" in state:
            state["momentum_buffer"].zero_()
        state["moment_step"] = 0

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any] | None = None) -> int:
        if group is None:
            raise ValueError("the colnorm rule's state depends on the group's momentum; pass the group")
        return _numel(shape) * dtype.itemsize if group["momentum"] > 0 else 0
