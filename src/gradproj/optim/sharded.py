"""Stepping FSDP2-sharded parameters (``fully_shard``: DTensors sharded on dim 0, ``Shard(0)``).

Each rank holds rows ``m_i`` of every weight and its reduced gradient, and keeps optimizer state
for its share only, so per-rank state is about 1/world of the single-process state:

- groups without ``rank`` step their local rows (elementwise rules need nothing else);
- ``right`` projections (``std`` on tall or square weights, ``R = G Q^T``, m x r) are row-local:
  ``R_i = G_i Q^T``, moments ``m_i x r``, update ``u_i Q``; each rank stores a column block of the
  ``r x n`` basis ``Q`` and all-gathers it when stepping (as FSDP all-gathers weights);
- ``left`` projections (``std`` on wide weights, ``R = P^T G``, r x n) sum over rows:
  ``R = sum_i P_i^T G_i`` is all-reduced (r x n), each rank keeps the moments of its column block
  (``r x n/world``), and the column blocks of ``u`` are all-gathered to form ``P_i u``. Each rank
  stores only its rows ``P_i`` of the basis;
- a refresh all-gathers the full gradient (every ``update_proj_gap`` steps) and computes the basis
  exactly as one process would, so every rank holds the same basis, equal to the single-process one.

Not yet sharded (a clear error): Fira/APOLLO residuals (their growth limiter needs a global norm),
``proj_type="full"`` and ``on_refresh="rotate"``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..projection.bases import derive_seed
from ..projection.projectors import get_projector
from ..projection.sides import low_rank_shape

if TYPE_CHECKING:
    from .engine import ProjectedOptimizer

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = None  # type: ignore[assignment,misc]


def is_sharded(p: Tensor) -> bool:
    """Whether ``p`` is an FSDP2 (DTensor) parameter."""
    return DTensor is not None and isinstance(p, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: in-place updates reach the parameter), else ``t``."""
    return t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined, no-any-return]


def _rows(p: Any) -> slice:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return slice(offset[0], offset[0] + shape[0])


def _columns(n: int, rank: int, world: int) -> slice:
    block = math.ceil(n / world)
    return slice(min(n, rank * block), min(n, (rank + 1) * block))


def _check(group: dict[str, Any], name: str, side: str) -> None:
    if group["residual"] != "none" or side == "full" or group["on_refresh"] == "rotate":
        raise ValueError(
            f"{name}: FSDP2-sharded parameters support GaLore updates (residual='none') with sides left/right "
            f"and on_refresh keep/reset; got residual={group['residual']!r}, side={side!r}, "
            f"on_refresh={group['on_refresh']!r}. Use DDP for Fira/APOLLO, or leave this module unsharded"
        )


def step_sharded_projected(opt: ProjectedOptimizer, p: Any, group: dict[str, Any]) -> None:
    """One GaLore step of a row-sharded weight; see the module docstring."""
    layout = opt.layout(p, group)
    _check(group, opt._param_names[p], layout.side)
    process_group = p.device_mesh.get_group()
    rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    rows, columns = _rows(p), _columns(layout.shape[1], rank, world)
    weight, grad = local(p), local(p.grad)
    state = opt.state[p]
    projector = get_projector(group["projector"])
    if not state:
        state.update(step=0, last_refresh=-1, proj_seed=derive_seed(group["seed"], opt._param_keys[p]))
        r_rows, r_cols = low_rank_shape(layout.shape, layout.rank, layout.side)
        shape = (rows.stop - rows.start, r_cols) if layout.side == "right" else (r_rows, columns.stop - columns.start)
        opt.rule.init_state(state, shape, weight)
    if state["step"] % group["update_proj_gap"] == 0 or state["last_refresh"] < 0:
        _refresh(opt, p, group, state, layout, rows, columns)
    left, right = projector.materialize(state, layout)
    if left is not None and "basis_left" not in state:
        left = left[rows]  # dct / random rebuild the whole basis; this rank uses its rows
    if "basis_right" in state:  # stored as column blocks, gathered like FSDP gathers weights
        right = _gather_columns(state["basis_right"], layout.shape[1], world, process_group)
    if layout.side == "right":
        assert right is not None
        low = grad @ right.t()  # m_i x r, row-local
        u, step_size = opt.rule.direction(low, state, group, weight)
        update = (u.to(grad.dtype) @ right) * group["scale"]
    else:
        assert left is not None
        full_low = left.t() @ grad  # r x n: this rank's rows' share of P^T G
        dist.all_reduce(full_low, group=process_group)
        u, step_size = opt.rule.direction(full_low[:, columns].contiguous(), state, group, weight)
        update = (left @ _gather_columns(u.to(grad.dtype), layout.shape[1], world, process_group)) * group["scale"]
    opt._decay(weight, group, step_size)
    weight.add_(update, alpha=-step_size)
    state["step"] += 1


def _refresh(
    opt: ProjectedOptimizer,
    p: Any,
    group: dict[str, Any],
    state: dict[str, Any],
    layout: Any,
    rows: slice,
    columns: slice,
) -> None:
    first = state["last_refresh"] < 0
    state["last_refresh"] = state["step"]
    full_gradient = p.grad.full_tensor()  # all-gather, only at refreshes
    get_projector(group["projector"]).refresh(full_gradient, state, layout, group)
    if "basis_left" in state:
        state["basis_left"] = state["basis_left"][rows].clone()  # keep this rank's rows only
    if "basis_right" in state:
        state["basis_right"] = state["basis_right"][:, columns].clone()  # ... or its column block
    if not first and group["on_refresh"] == "reset":
        opt.rule.reset(state)


def _gather_columns(block: Tensor, n: int, world: int, process_group: Any) -> Tensor:
    """Concatenate every rank's column block of ``u`` (blocks of ``ceil(n / world)``, the last shorter)."""
    width = math.ceil(n / world)
    padded = torch.zeros(block.shape[0], width, dtype=block.dtype, device=block.device)
    padded[:, : block.shape[1]] = block
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=process_group)
    return torch.cat(parts, dim=1)[:, :n]


def all_finite(flags: Tensor, sharded: list[Any]) -> bool:
    """Whether every rank's gradients are finite (one all-reduce when any parameter is sharded)."""
    ok = flags.all().to(torch.int32).reshape(1).cpu()
    if sharded:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=sharded[0].device_mesh.get_group())
    return bool(ok[0])
