"""Adam with block-wise 8-bit moments (:mod:`gradproj.rules.quant`).

Each update dequantizes both moments to float32, applies exactly :func:`update_moments`, and
quantizes them back: the first moment with the signed map, the second with the unsigned one.
Moments of fewer than ``min_8bit_size`` elements (norms, biases, tiny projections) stay in
float32, as in bitsandbytes' optimizers, where quantization saves nothing and costs accuracy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import quant
from .adam import Adam, _numel, galore_direction, torch_denom, update_moments
from .base import ALL_ROWS, Rows

MIN_8BIT_SIZE = 4096
#: the quantized moments' state keys (stored as ``<key>_codes`` and ``<key>_absmax``) and whether their map is signed
QUANTIZED = {"exp_avg": True, "exp_avg_sq": False}


class Adam8bit(Adam):
    """:class:`Adam` whose moments are stored as ``uint8`` codes plus per-block absmax."""

    name = "adam8bit"
    quantized = QUANTIZED
    fast_kernel = False  # its moments are codes: the fast path's elementwise Adam does not read them

    def __init__(self, min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        self.min_8bit_size = min_8bit_size

    def _quantized(self, shape: tuple[int, ...]) -> bool:
        return _numel(shape) >= self.min_8bit_size

    def init_state(
        self, state: dict[str, Any], shape: tuple[int, ...], like: Tensor, full_shape: tuple[int, ...] | None = None
    ) -> None:
        # the whole moment's size decides, so that every process's rows of it are stored alike (FSDP2)
        if not self._quantized(full_shape or shape):
            zeros = torch.zeros(shape, dtype=torch.float32, device=like.device)
            state["exp_avg"], state["exp_avg_sq"], state["moment_step"] = zeros, zeros.clone(), 0
            return
        quant._functional()  # fail at construction, not mid-training, if bitsandbytes is missing
        self.set_moments(
            state, {"first": torch.zeros(shape, device=like.device), "second": torch.zeros(shape, device=like.device)}
        )
        state["moment_step"] = 0

    def _advance_dense(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Dequantize, advance in float32, quantize back; return the float32 moments."""
        moments = self.moments(state)
        exp_avg, exp_avg_sq = moments["first"], moments["second"]
        state["moment_step"] += 1
        update_moments(exp_avg, exp_avg_sq, grad.float(), group)
        self.set_moments(state, {"first": exp_avg, "second": exp_avg_sq})
        return exp_avg, exp_avg_sq

    def direction(
        self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], param: Tensor, rows: Rows = ALL_ROWS
    ) -> tuple[Tensor, float]:
        exp_avg, exp_avg_sq = self._advance_dense(grad, state, group)
        return galore_direction(exp_avg, exp_avg_sq, state["moment_step"], group)

    def apply_full(
        self, param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any], rows: Rows = ALL_ROWS
    ) -> None:
        exp_avg, exp_avg_sq = self._advance_dense(grad, state, group)
        denom, step_size = torch_denom(exp_avg_sq, state["moment_step"], group)
        param.add_((exp_avg / denom).to(param.dtype), alpha=-step_size)

    def moments(self, state: dict[str, Any]) -> dict[str, Tensor]:
        if "exp_avg" in state:
            return {"first": state["exp_avg"].clone(), "second": state["exp_avg_sq"].clone()}
        return {
            "first": quant.dequantize(state["exp_avg_codes"], state["exp_avg_absmax"], signed=QUANTIZED["exp_avg"]),
            "second": quant.dequantize(
                state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], signed=QUANTIZED["exp_avg_sq"]
            ),
        }

    def set_moments(self, state: dict[str, Any], moments: dict[str, Tensor]) -> None:
        first, second = moments["first"].float(), moments["second"].float().clamp_min(0)
        if "exp_avg" in state:  # stored unquantized since init_state (a small moment)
            state["exp_avg"], state["exp_avg_sq"] = first, second
            return
        state["exp_avg_codes"], state["exp_avg_absmax"] = quant.quantize(first, signed=QUANTIZED["exp_avg"])
        state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = quant.quantize(second, signed=QUANTIZED["exp_avg_sq"])

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any] | None = None) -> int:
        numel = _numel(shape)
        if not self._quantized(shape):
            return 2 * numel * 4
        return 2 * (numel + 4 * quant.absmax_numel(numel))
