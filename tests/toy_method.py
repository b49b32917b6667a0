"""A method defined outside gradproj, as a user (or the next issue) would write one: GaLore with Lion's update
(Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Alg. 2) on the projected gradient ``R``:

    c = beta1 * m + (1 - beta1) * R;   u = sign(c);   m = beta2 * m + (1 - beta2) * R;   W -= lr * scale * up(u)

It is the rule's class, the preset's class, its float64 twin and one registry entry, nothing else: loaded
as a pytest plugin (``-p toy_method``, ``tests/`` on the path) it registers all of them before the suites
collect, and the contract, torch-contract and twin suites pick it up from the registries
(tests/test_toy_method.py runs them so). The docs/ARCHITECTURE.md worked example is this file.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradproj import GaLoreAdamW
from gradproj.optim.reference import REFERENCE_RULES
from gradproj.optim.registry import Method, register
from gradproj.rules import register_rule
from gradproj.rules.base import ALL_ROWS, Rows, UpdateRule, learning_rate


@register_rule
class Lion(UpdateRule):
    """Lion's sign of the interpolated momentum; one moment, elementwise (so FSDP2 rows may step alone)."""

    name = "lion"

    def init_state(
        self, state: dict[str, Any], shape: tuple[int, ...], like: Tensor, full_shape: tuple[int, ...] | None = None
    ) -> None:
        state["exp_avg"] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        state["moment_step"] = 0

    def direction(
        self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], param: Tensor, rows: Rows = ALL_ROWS
    ) -> tuple[Tensor, float]:
        beta1, beta2 = group["betas"]
        momentum = state["exp_avg"]
        u = torch.sign(momentum * beta1 + grad * (1 - beta1))  # shaped like grad
        momentum.lerp_(grad, 1 - beta2)
        state["moment_step"] += 1
        return u, learning_rate(group)

    def moments(self, state: dict[str, Any]) -> dict[str, Tensor]:
        return {"first": state["exp_avg"]}

    def set_moments(self, state: dict[str, Any], moments: dict[str, Tensor]) -> None:
        state["exp_avg"] = moments["first"]

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any] | None = None) -> int:
        return math.prod(shape) * dtype.itemsize


class GaLoreLion(GaLoreAdamW):
    """GaLore's projection (every projector, side, ``on_refresh``, feature and placement) with Lion's rule."""

    RULE = "lion"


def lion_twin(state: dict[str, Any], r: Tensor, cfg: dict[str, Any], lr: float | None) -> tuple[Tensor, float]:
    """The paper's lines, literally, on plain tensors (the twin keeps the first moment as ``m``)."""
    beta1, beta2 = cfg["betas"]
    m = state.get("m", torch.zeros_like(r))
    u = torch.sign(beta1 * m + (1 - beta1) * r)
    state["m"] = beta2 * m + (1 - beta2) * r
    assert lr is not None
    return u, lr


REFERENCE_RULES[Lion.name] = lion_twin
METHOD = register(
    Method(name="galore_lion", kind="preset", preset="galore_lion", summary="GaLore with Lion's update (a toy)",
           lr=1e-3, other_lr=1e-3),
    preset=GaLoreLion,
)  # fmt: skip
