"""Muon (Jordan et al. 2024; Liu et al. 2025, "Muon is Scalable for LLM Training"): orthogonalized momentum.

For the ``t``-th gradient ``G`` (``a x b``; with the identity projector the whole matrix, with GaLore's basis
its projection ``R``), ``torch.optim.Muon``'s update, step for step::

    B = lerp(B, G, 1 - momentum)                  (the momentum buffer)
    U = lerp(G, B, momentum) if nesterov else B
    O = NS5(U)                                    (:func:`gradproj.rules.orthogonal.newton_schulz`)
    step size = lr * ratio(a, b)

with ``ratio`` = ``0.2 sqrt(max(a, b))`` for ``adjust_lr_fn="match_rms_adamw"`` (Moonshot's: the update's
RMS is about AdamW's 0.2, so AdamW's rates and decay carry over; our default) or ``sqrt(max(1, a / b))``
for ``"original"`` (Keller Jordan's). The engine applies decoupled decay ``W *= 1 - lr wd`` before the
step, as torch does. The iterations run in the step's dtype (float32; float64 in the twin tests), or in
``ns_dtype``: ``"bfloat16"`` is torch's choice, twice as fast as float32 on GPUs and on CPUs with bf16
matrix units, and what the registry's ``muon`` methods (the trainer's and the bench's) use. The 8-bit variant
(``muon8bit``) stores the buffer as block-wise 8-bit codes (:mod:`gradproj.rules.quant`): a quarter of
the float32 buffer, an eighth of AdamW's state.

State: ``momentum_buffer`` (shaped like ``G``, torch's key), the update count and ``G``'s row count: ``a b``
numbers per matrix. Under FSDP2 each rank keeps its rows of the buffer; the momentum to orthogonalize is
gathered on one rank, which runs the iterations on the whole matrix and sends each rank its rows back
(:mod:`gradproj.optim.whole_matrix`): the same bits as one process.

Example:
    >>> import torch
    >>> rule, state = Muon(), {}
    >>> rule.init_state(state, (4, 6), torch.zeros(1))
    >>> group = {"lr": 0.1, "momentum": 0.95, "nesterov": True, "ns_steps": 5, "adjust_lr_fn": "original",
    ...          "ns_dtype": None}
    >>> u, s = rule.direction(torch.randn(4, 6), state, group, None)
    >>> tuple(u.shape), s                            # a wide matrix: ratio sqrt(max(1, 4/6)) = 1
    ((4, 6), 0.1)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..options import check, fraction, integer_at_least, option
from . import quant
from .adam import _numel
from .adam8bit import MIN_8BIT_SIZE
from .base import ALL_ROWS, Rows, UpdateRule, learning_rate
from .orthogonal import newton_schulz

#: how the step size follows the matrix's shape (torch.optim.Muon's ``adjust_lr_fn`` values)
ADJUST_LR = ("match_rms_adamw", "original")
NS_DTYPES = ("bfloat16", "float16", "float32", "float64")


@dataclass(frozen=True)
class MuonOptions:
    """The muon rule's group keys (``nesterov`` is shared with COSMOS: the Muon presets set it True).

    >>> MuonOptions(adjust_lr_fn="spectral")
    Traceback (most recent call last):
    ...
    ValueError: adjust_lr_fn='spectral' is not valid; expected one of match_rms_adamw, original
    """

    momentum: float = option(0.95, help="decay of the momentum buffer (torch.optim.Muon's momentum), in [0, 1)")
    ns_steps: int = option(5, help="Newton-Schulz iterations per step", minimum=1)
    adjust_lr_fn: str = option(
        "match_rms_adamw",
        help="step size per shape: match_rms_adamw, lr 0.2 sqrt(max(m, n)) (Moonshot's); original, "
        "lr sqrt(max(1, m/n)) (Keller Jordan's)",
        choices=ADJUST_LR,
    )
    ns_dtype: str | None = option(
        None,
        help="dtype of the Newton-Schulz iterations (torch.optim.Muon's and our muon methods': bfloat16); default the "
        "step's own",
        choices=NS_DTYPES,
    )

    def __post_init__(self) -> None:
        fraction("momentum", self.momentum)
        integer_at_least("ns_steps", self.ns_steps, 1)
        check(self)


def lr_ratio(adjust_lr_fn: str, shape: tuple[int, ...]) -> float:
    """torch.optim.Muon's factor on ``lr`` for a matrix of ``shape`` (its ``_adjust_lr``).

    >>> lr_ratio("match_rms_adamw", (256, 1024)), lr_ratio("original", (1024, 256))
    (6.4, 2.0)
    """
    a, b = int(shape[0]), int(shape[1])
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(a, b))
    return math.sqrt(max(1, a / b))


def nesterov(grad: Tensor, buffer: Tensor, group: dict[str, Any]) -> Tensor:
    """The matrix Muon orthogonalizes, from the advanced ``buffer``: ``lerp(G, B, momentum)``, or ``B`` itself."""
    return grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer


def orthogonalize(group: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    """The group's Newton-Schulz iterations, as a function of a whole matrix."""
    dtype = getattr(torch, group["ns_dtype"]) if group["ns_dtype"] is not None else None
    return lambda whole: newton_schulz(whole, int(group["ns_steps"]), dtype=dtype)


def orthogonalized(
    grad: Tensor, buffer: Tensor, group: dict[str, Any], rows: Rows, whole_rows: int
) -> tuple[Tensor, float]:
    """Advance ``buffer`` with ``grad`` in place (this process's rows of the ``whole_rows``-row matrix); return
    this process's rows of the orthogonalized (Nesterov) momentum, and the step size."""
    buffer.lerp_(grad, 1 - group["momentum"])
    u = rows.whole(nesterov(grad, buffer, group), whole_rows, orthogonalize(group))
    return u, learning_rate(group) * lr_ratio(group["adjust_lr_fn"], (whole_rows, int(grad.shape[1])))


class Muon(UpdateRule):
    """torch.optim.Muon's step on the (projected) gradient; see the module docstring."""

    name = "muon"
    options_type = MuonOptions

    def init_state(
        self, state: dict[str, Any], shape: tuple[int, ...], like: Tensor, full_shape: tuple[int, ...] | None = None
    ) -> None:
        state["momentum_buffer"] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        state["moment_step"] = 0
        state["whole_rows"] = int((full_shape or shape)[0])  # under FSDP2 this process holds some of them

    def direction(
        self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], param: Tensor, rows: Rows = ALL_ROWS
    ) -> tuple[Tensor, float]:
        state["moment_step"] += 1
        return orthogonalized(grad, state["momentum_buffer"], group, rows, state["whole_rows"])

    def whole_input(
        self, grad: Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]] | None:
        buffer = state["momentum_buffer"].lerp(grad, 1 - group["momentum"])  # what direction's lerp_ will hold
        return nesterov(grad, buffer, group), orthogonalize(group)

    def moments(self, state: dict[str, Any]) -> dict[str, Tensor]:
        return {"first": state["momentum_buffer"]}

    def set_moments(self, state: dict[str, Any], moments: dict[str, Tensor]) -> None:
        state["momentum_buffer"] = moments["first"].to(state["momentum_buffer"].dtype)

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any] | None = None) -> int:
        return _numel(shape) * dtype.itemsize


class Muon8bit(Muon):
    """:class:`Muon` whose buffer is stored as ``uint8`` codes and a float32 absmax per 256 elements
    (buffers under 4096 elements stay Muon's); each step dequantizes, advances in float32, quantizes back."""

    name = "muon8bit"
    quantized = {"momentum_buffer": True}  # noqa: RUF012 (read-only)

    def init_state(
        self, state: dict[str, Any], shape: tuple[int, ...], like: Tensor, full_shape: tuple[int, ...] | None = None
    ) -> None:
        super().init_state(state, shape, like, full_shape)  # a small buffer stays Muon's, in the step's dtype
        if _numel(full_shape or shape) >= MIN_8BIT_SIZE:  # the whole buffer's size decides (FSDP2 rows alike)
            quant._functional()  # fail at construction, not mid-training, if bitsandbytes is missing
            self.set_moments(state, {"first": state.pop("momentum_buffer").float()})

    def direction(
        self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], param: Tensor, rows: Rows = ALL_ROWS
    ) -> tuple[Tensor, float]:
        if "momentum_buffer" in state:
            return super().direction(grad, state, group, param, rows)
        state["moment_step"] += 1
        buffer = self.moments(state)["first"]
        u, step_size = orthogonalized(grad.float(), buffer, group, rows, state["whole_rows"])
        self.set_moments(state, {"first": buffer})
        return u.to(grad.dtype), step_size

    def whole_input(
        self, grad: Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]] | None:
        if "momentum_buffer" in state:
            return super().whole_input(grad, state, group)
        buffer = self.moments(state)["first"].lerp_(grad.float(), 1 - group["momentum"])  # a dequantized copy
        return nesterov(grad.float(), buffer, group), orthogonalize(group)

    def moments(self, state: dict[str, Any]) -> dict[str, Tensor]:
        if "momentum_buffer" in state:
            return {"first": state["momentum_buffer"].clone()}
        codes, absmax = state["momentum_buffer_codes"], state["momentum_buffer_absmax"]
        return {"first": quant.dequantize(codes, absmax, signed=True)}

    def set_moments(self, state: dict[str, Any], moments: dict[str, Tensor]) -> None:
        if "momentum_buffer" in state:  # stored unquantized since init_state (a small buffer)
            super().set_moments(state, moments)
            return
        codes, absmax = quant.quantize(moments["first"], signed=True)
        state["momentum_buffer_codes"], state["momentum_buffer_absmax"] = codes, absmax

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any] | None = None) -> int:
        numel = _numel(shape)
        return numel * dtype.itemsize if numel < MIN_8BIT_SIZE else numel + 4 * quant.absmax_numel(numel)
