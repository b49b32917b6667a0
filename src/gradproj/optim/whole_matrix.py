"""A function of a whole matrix under FSDP2's row split (Muon's orthogonalization): the rows are gathered on
one rank, the function runs there on the whole matrix, exactly as one process would run it, and each rank
receives its rows of the result (``dist.gather``, then ``dist.scatter``: each rank sends and receives its
rows once; only the owner holds the whole matrix, and only while it computes).

Here one matrix at a time: owners are dealt round-robin over the shard group's ranks in stepping order (the
same order on every rank, so every rank agrees on each matrix's owner), and the others wait while it computes.
That is the path of a parameter's first step and of matrices whose ``R`` is projected first; the others are
computed ahead, several ranks at once (:mod:`gradproj.optim.spread_whole`), with :func:`scatter_rows` from here.

Example (one process: the function on the matrix itself):
    >>> import torch
    >>> from gradproj.rules.base import ALL_ROWS
    >>> ALL_ROWS.whole(torch.ones(2, 3), 2, lambda m: 2 * m).sum().item()
    12.0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

#: per shard group (by id), the rank that owns the next whole-matrix computation
_NEXT_OWNER: dict[int, int] = {}


def deal(group: Any, world: int) -> int:
    """The next owner in ``group`` (round-robin in stepping order)."""
    owner = _NEXT_OWNER.get(id(group), 0)
    _NEXT_OWNER[id(group)] = (owner + 1) % world
    return owner


def on_one_rank(x: Tensor, rows: int, fn: Callable[[Tensor], Tensor], group: Any, rank: int, world: int) -> Tensor:
    """``fn`` of the whole ``rows x ...`` matrix of which ``x`` is this rank's FSDP2 row chunk; this rank's rows
    of the result, in ``x``'s dtype."""
    block = math.ceil(rows / world)
    mine = x.new_zeros((block, *x.shape[1:]))  # equal-sized buffers for the collectives
    mine[: x.shape[0]] = x
    owner = deal(group, world)
    src = dist.get_global_rank(group, owner)
    parts = [torch.empty_like(mine) for _ in range(world)] if rank == owner else None
    dist.gather(mine, parts, dst=src, group=group)
    result = fn(torch.cat(parts)[:rows]).to(x.dtype) if parts is not None else None  # FSDP2's chunks: short last
    out, work = scatter_rows(result, rows, x, group, owner, world)
    work.wait()
    return out[: x.shape[0]]


def scatter_rows(
    result: Tensor | None, rows: int, like: Tensor, group: Any, owner: int, world: int
) -> tuple[Tensor, Any]:
    """Start sending each rank its FSDP2 row chunk of ``result`` (the whole ``rows x ...`` matrix, on ``owner``;
    None elsewhere); returns the buffer this rank receives into (padded to the chunk size) and the work."""
    block = math.ceil(rows / world)
    out = like.new_empty((block, *like.shape[1:]))
    pieces = None
    if result is not None:
        pieces = list(torch.cat([result, result.new_zeros((block * world - rows, *result.shape[1:]))]).split(block))
    src = dist.get_global_rank(group, owner)
    return out, dist.scatter(out, pieces, src=src, group=group, async_op=True)
