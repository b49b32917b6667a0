"""RACS (Gong et al. 2025, "Towards Efficient Optimizer Design for LLM via Structured Fisher
Approximation with a Low-Rank Extension", Alg. 1): row- and column-scaled SGD.

The Fisher of a matrix gradient ``G`` (``a x b``) is approximated by ``Diag(s) (x) Diag(q)``, a
scalar per column and per row, the Frobenius-optimal such fit of ``E[G^2]``: the fixed point of
``q = G^2 s / ||s||^2`` and ``s = (G^2)^T q / ||q||^2``. One sweep from ``s = 1`` gives
``q = rowmean(G^2)`` and ``s = (G^2)^T q / ||q||^2``; ``s`` and ``q`` are then exponential moving
averages (``beta = betas[0]``; ``q`` starts at 0 and the dimensionless ``s`` at 1, the sweep's start)
and the direction is the scaled gradient with Fira's norm-growth limiter::

    G~ = Diag(q + eps)^{-1/2} G Diag(s + eps)^{-1/2},   u = limit(G~),   step size = lr

(the update ``scale`` is the paper's ``alpha``). The scaling is invariant to the gradient's scale, as
Adam's is. ``pytorch_optimizer.RACS`` uses the column mean of ``G^2`` for ``s`` instead of the
coupled sweep; the two coincide when every row of ``G`` has mean square 1 (tested), and differ by the
gradient's overall scale otherwise (docs/ALGORITHMS.md).

State: ``row_sq`` (``a``), ``col_sq`` (``b``) and the limiter's scalar: ``a + b + 1`` numbers per matrix.
Vectors are treated as ``n x 1`` matrices. Under FSDP2 a process holds some rows: ``row_sq`` is split like
them, ``col_sq`` is whole on every process, and the column sweep and the limiter's norm are summed across
processes (one all-reduce of ``b + 1`` numbers and one of a scalar per step).

Example:
    >>> import torch
    >>> rule, state = RACS(), {}
    >>> rule.init_state(state, (3, 4), torch.zeros(1))
    >>> group = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 0.0, "growth_limit": 1.01}
    >>> u, s = rule.direction(torch.ones(3, 4), state, group, None)
    >>> round(float(u[0, 0]), 4), s    # 1 / sqrt(0.1 * 1): q's average starts at 0, s's at 1
    (3.1623, 0.1)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import ALL_ROWS, Rows, UpdateRule, learning_rate
from .limiter import limit_growth, limiter_bytes


def _matrix(x: Tensor) -> Tensor:
    """``x`` as a matrix: vectors become ``n x 1``, higher ranks ``x.shape[0] x rest``."""
    return x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(-1, 1)


def row_column_fit(squares: Tensor, split: Rows = ALL_ROWS) -> tuple[Tensor, Tensor]:
    """One fixed-point sweep of the rank-one fit ``q s^T ~ squares`` from ``s = 1``: ``(q, s)``.
    ``squares`` may be this process's rows of the whole (``split`` sums over all rows)."""
    rows = squares.mean(dim=1)  # (a_i,): this process's rows
    # one reduction for both sums over rows: the column sweep (b) and ||q||^2
    sums = split.total(torch.cat([squares.t() @ rows, rows.square().sum().reshape(1)]))  # (b + 1,)
    cols, energy = sums[:-1], sums[-1]
    return rows, cols / torch.where(energy > 0, energy, torch.ones_like(energy))  # (a_i,), (b,)


class RACS(UpdateRule):
    """Row and column scaling with the norm-growth limiter."""

    name = "racs"
    replicated_state = ("col_sq",)  # one number per column: every process's rows share it
    rotation_unshardable_because = "the racs rule refits its row and column scalings from all rows at a rotation"

    def init_state(
        self, state: dict[str, Any], shape: tuple[int, ...], like: Tensor, full_shape: tuple[int, ...] | None = None
    ) -> None:
        a, b = _matrix(torch.empty(shape, device="meta")).shape
        state["row_sq"] = torch.zeros(a, dtype=like.dtype, device=like.device)
        state["col_sq"] = torch.ones(b, dtype=like.dtype, device=like.device)  # the fixed point's start, s = 1
        state["moment_step"] = 0

    def direction(
        self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], param: Tensor, rows: Rows = ALL_ROWS
    ) -> tuple[Tensor, float]:
        state["moment_step"] += 1
        g = _matrix(grad)  # a x b
        beta, eps = group["betas"][0], group["eps"]
        row_fit, col_fit = row_column_fit(g.square(), rows)
        state["row_sq"].lerp_(row_fit.to(state["row_sq"].dtype), 1 - beta)
        state["col_sq"].lerp_(col_fit.to(state["col_sq"].dtype), 1 - beta)
        scaled = g / ((state["row_sq"] + eps).sqrt().unsqueeze(1) * (state["col_sq"] + eps).sqrt().unsqueeze(0))
        limited = limit_growth(scaled, state, group.get("growth_limit", 1.01), rows.norm, key="update_norm")
        return limited.reshape(grad.shape), learning_rate(group)

    def moments(self, state: dict[str, Any]) -> dict[str, Tensor]:
        return {"second": torch.outer(state["row_sq"], state["col_sq"])}

    def set_moments(self, state: dict[str, Any], moments: dict[str, Tensor]) -> None:
        rows, cols = row_column_fit(moments["second"].clamp_min(0))
        state["row_sq"] = rows.to(state["row_sq"].dtype)
        state["col_sq"] = cols.to(state["col_sq"].dtype)

    def reset(self, state: dict[str, Any]) -> None:
        state["row_sq"].zero_()
        state["col_sq"].fill_(1)
        state["moment_step"] = 0
        state.pop("update_norm", None)

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any] | None = None) -> int:
        a, b = _matrix(torch.empty(shape, device="meta")).shape
        return (a + b) * dtype.itemsize + limiter_bytes(dtype)
