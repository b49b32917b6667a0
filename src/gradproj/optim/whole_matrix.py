"""A function of a whole matrix under FSDP2's row split (Muon's orthogonalization): the rows are gathered on
one rank, the function runs there on the whole matrix, exactly as one process would run it, and each rank
receives its rows of the result (``dist.gather``, then ``dist.scatter``: each rank sends and receives its
rows once; only the owner holds the whole matrix, and only while it computes).

Owners are dealt round-robin over the shard group's ranks in stepping order (the same order on every rank,
so every rank agrees on each matrix's owner): no rank holds more than its share of the matrices. The matrices
are orthogonalized one after another, each on its owner while the others wait: the step's time is a single
process's, its memory a shard's plus one matrix on the owner.

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
    pieces = None
    if parts is not None:
        whole = torch.cat(parts)[:rows]  # FSDP2's chunks are ceil(rows / world) each, the last ones short
        result = fn(whole).to(x.dtype)  # rows x ...
        pieces = list(torch.cat([result, result.new_zeros((block * world - rows, *result.shape[1:]))]).split(block))
    out = torch.empty_like(mine)
    dist.scatter(out, pieces, src=src, group=group)
    return out[: x.shape[0]]
