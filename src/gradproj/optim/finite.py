"""The non-finite-gradient check behind ``nonfinite="skip"``/``"raise"``: one vectorized pass over every
gradient and one transfer to the host (one all-reduce when FSDP2 shards any of them), so that a step with a
NaN or an infinity anywhere is dropped before any weight or state changes.

Example:
    >>> import torch
    >>> a, b = torch.zeros(2, 2, requires_grad=True), torch.zeros(3, requires_grad=True)
    >>> a.grad, b.grad = torch.ones(2, 2), torch.tensor([0.0, float("nan"), 1.0])
    >>> first_nonfinite([a, b]), first_nonfinite([a])
    (1, None)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .placement import is_sharded, local, shard_group


def first_nonfinite(params: Sequence[Tensor]) -> int | None:
    """The index in ``params`` (each with a ``grad``) of the first whose gradient holds a NaN or an
    infinity on any rank, or None when every one is finite."""
    if not params:
        return None
    grads = [local(p.grad) for p in params if p.grad is not None]
    if len(grads) != len(params):
        raise ValueError("first_nonfinite checks parameters that have a grad; drop those whose grad is None")
    device = grads[0].device  # one transfer for all flags, not one sync per parameter
    flags = torch.ones(len(grads), dtype=torch.bool, device=device)
    filled = [i for i, g in enumerate(grads) if g.numel()]  # an FSDP2 rank may hold no rows: finite, no extremes
    if filled:
        # min and max in one vectorized pass (about 20x faster than isfinite().all() on a CPU): both are
        # finite iff every element is, since NaN propagates and an infinity is an extreme
        extremes = torch.stack([torch.stack(torch.aminmax(grads[i])).to(device) for i in filled])  # (k, 2)
        flags[filled] = torch.isfinite(extremes).all(dim=1)
    if all_finite(flags, [p for p in params if is_sharded(p)]):
        return None
    return int((~flags).nonzero()[0, 0])


def check_dense(named: Iterable[tuple[Tensor, str]]) -> None:
    """Before anything reads a gradient: every ``(parameter, name)``'s gradient is dense (no rule here steps a
    sparse one), or a RuntimeError names the first that is not."""
    for p, name in named:
        if p.grad is not None and p.grad.layout != torch.strided:
            raise RuntimeError(
                f"{name} has a sparse gradient ({p.grad.layout}), which is not supported: use a dense embedding "
                "(sparse=False) or torch.optim.SparseAdam for it"
            )


def all_finite(flags: Tensor, sharded: list[Any]) -> bool:
    """Whether every rank's gradients are finite (one all-reduce when any parameter is sharded)."""
    ok = flags.all().to(torch.int32).reshape(1).cpu()
    if sharded:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=shard_group(sharded[0]))
    return bool(ok[0])
