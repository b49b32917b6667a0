"""Low-precision weights: the optimizer computes in float32 and decides how the result is rounded.

With bf16 weights (``gradproj pretrain --dtype bf16``) every parameter's step runs on float32
copies of the weight and its gradient, one parameter at a time; moments are created from the
float32 copy, so they are float32 too (8-bit rules keep their codes). Bases stay in the weights'
dtype (as galore-torch stores them) and are widened when used. Only the write-back differs, by the
optimizer's ``bf16_update``:

- ``nearest``: round the float32 result to the nearest bf16 (the GaLore paper's pure bf16). An
  update below half a bf16 ulp of the weight (about 0.4% of it) is lost every step.
- ``stochastic``: round up with probability equal to the fraction of the ulp (unbiased: the
  expected stored weight is the float32 result). Random bits come from a generator seeded per
  parameter and step (``rounding_seed`` in the parameter's state, mixed with its step count), so a
  resumed run, a layer-wise run and every DDP replica draw the same bits. No extra memory.
- ``kahan``: a bf16 compensation buffer per weight (``weight_compensation`` in the state, counted
  by :func:`gradproj.optim.groups.state_bytes`) keeps what the last rounding lost; the next step
  starts from ``weight + compensation`` in float32. The pair holds about 16 significant bits.

float32 and float64 weights are stepped in place, with no copy: ``bf16_update`` applies to bf16
only.

Example:
    >>> x = torch.full((10_000,), 1.0 + 2**-10)        # between two bf16 neighbours: 1 and 1 + 2**-7
    >>> g = torch.Generator().manual_seed(0)
    >>> rounded = stochastic_round(x.clone(), g)
    >>> sorted(set(rounded.float().tolist())), abs(float(rounded.float().mean()) - (1 + 2**-10)) < 2e-4
    ([1.0, 1.0078125], True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..projection.bases import derive_seed

#: the write-back of a bf16 weight's step (see the module docstring)
BF16_UPDATES = ("nearest", "stochastic", "kahan")
#: the weights' dtypes a run may choose (``--dtype``), by name
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: ``--bf16-update``'s default: the best of nearest/stochastic/kahan measured against float32 (docs/BENCHMARKS.md)
DEFAULT_BF16_UPDATE = "stochastic"
#: weight dtypes the optimizer widens to float32 for its arithmetic
LOW_PRECISION = (torch.bfloat16, torch.float16)
#: the state key of the kahan write-back's buffer
COMPENSATION = "weight_compensation"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the step computes in for a weight of ``dtype``: float32 for bf16/fp16, else itself."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def compensated(p: Tensor, group: dict[str, Any]) -> bool:
    """Whether ``p`` keeps a kahan compensation buffer under ``group``'s ``bf16_update``."""
    return p.dtype == torch.bfloat16 and group.get("bf16_update", "nearest") == "kahan"


def widen(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype`` (the same tensor when it already is)."""
    return None if t is None else t.to(dtype)


def stochastic_round(x: Tensor, generator: torch.Generator) -> Tensor:
    """``x`` (float32, overwritten) rounded to bf16 stochastically: a uniform 16-bit integer is added to
    the bits below bf16's mantissa, then they are cut, so ``x`` rounds away from zero with probability
    equal to its distance from the lower neighbour in ulps. Exact for values bf16 represents."""
    bits = x.view(torch.int32)  # sign and magnitude: adding to the low bits grows the magnitude
    noise = torch.empty_like(bits).random_(0, 1 << 16, generator=generator)  # same shape as x
    bits.add_(noise).bitwise_and_(-65536)  # 0xFFFF0000: keep sign, exponent and bf16's 7 mantissa bits
    return x.to(torch.bfloat16)


def _generator(state: dict[str, Any], device: torch.device) -> torch.Generator:
    seed = derive_seed(int(state["rounding_seed"]), int(state.get("step", 0)))
    return torch.Generator(device=device).manual_seed(seed)


def _keep(state: dict[str, Any], key: str, value: Tensor) -> None:
    state[key] = value


@contextlib.contextmanager
def working_weight(
    weight: Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    seed: int,
    *,
    local: Callable[[Any], Any] = lambda t: t,
    keep: Callable[[dict[str, Any], str, Tensor], None] = _keep,
) -> Iterator[Tensor]:
    """The tensor a step updates in place for ``weight`` (this process's part of it): ``weight``
    itself unless it is low precision, else a float32 copy written back on exit by the group's
    ``bf16_update``. ``state`` is the parameter's (its ``step`` counts the steps taken so far);
    ``seed`` seeds stochastic rounding the first time; ``local`` gives a stored tensor's local part
    and ``keep`` stores a new one (both the placement's, under FSDP2)."""
    if weight.dtype not in LOW_PRECISION:
        yield weight
        return
    mode = group.get("bf16_update", "nearest")
    work = weight.float()  # m x n, float32
    compensation = local(state[COMPENSATION]) if mode == "kahan" and COMPENSATION in state else None
    if compensation is not None:
        work.add_(compensation)
    step_before = int(state.get("step", 0))
    yield work
    if mode == "stochastic" and weight.dtype == torch.bfloat16:
        state.setdefault("rounding_seed", seed)
        rounded = stochastic_round(work, _generator({**state, "step": step_before}, work.device))
        weight.copy_(rounded)
    elif mode == "kahan" and weight.dtype == torch.bfloat16:
        weight.copy_(work)  # nearest
        lost = work.sub_(weight).to(torch.bfloat16)  # m x n: what the rounding lost
        if compensation is None:
            keep(state, COMPENSATION, lost)
        else:
            compensation.copy_(lost)
    else:
        weight.copy_(work)
