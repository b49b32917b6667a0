"""Where a projected matrix lives: the placement strategies of the one projected step
(:func:`gradproj.optim.step.projected_step`).

The step itself is the same everywhere: refresh the basis from the full gradient when due, project,
run the rule on this process's share of ``R``, combine with the residual, decay, apply. A placement
says how each of those reads and writes a matrix that may be split across processes:

:class:`Local`
    the whole matrix is here (one process, DDP): every method is the identity or a plain norm.
:class:`RowSharded`
    FSDP2's ``fully_shard``: each rank holds rows ``m_i`` of ``W`` and of its reduced gradient ``G``
    (``Shard(0)``). Collectives only, no copy of the step:

    - ``right`` (``R = G Q^T``, m x r): row-local, ``R_i = G_i Q^T``; the moments are this rank's rows;
    - ``left``/``full`` (``R = P^T G``, r x n, or ``P^T G Q^T``): ``R = sum_i P_i^T G_i`` is all-reduced;
      each rank keeps the moments of its rows of ``R`` (``ceil(r / world)`` each, possibly none) and the
      rows of ``u`` are all-gathered to form ``P_i u``;
    - a refresh computes the basis from the whole gradient exactly as one process would: on one rank,
      which gathers it (:meth:`RowSharded.gather_to`) and broadcasts the basis (:mod:`gradproj.optim.spread`),
      or on every rank from an all-gather (:meth:`RowSharded.full_gradient`); each rank keeps its rows of
      ``P`` and a column block of ``Q`` (gathered when stepping);
    - Fira's and APOLLO's norms (tensor-wise ratios, the growth limiter) are all-reduced over the rows;
      per-channel ratios are local (right side: rows are local; left: ``u`` and ``R`` are whole);
    - other sums over rows (RACS's column sweep, Alice's tracked ``R^T R`` and a left basis' per-column
      energy) go through :meth:`RowSharded.total`, an all-reduce; statistics with one number per column are
      whole on every rank (``Replicate()``; their owners list them as ``replicated_state``);
    - ``on_refresh="rotate"``: ``P'^T P`` is all-reduced; moments split by rows of ``R`` are gathered
      for the rotation (once per refresh).

    Under HSDP (a 2-D ``(replicate, shard)`` mesh) rows are split over the shard dimension and every
    replica holds the same rows, gradients (FSDP2 all-reduces them across replicas) and state, which is
    ``Replicate()`` on the replicate dimension.

    Every state tensor of a sharded parameter is a ``DTensor`` with the full-matrix shape on the
    parameter's mesh (rows of the weight or of ``R``: ``Shard(0)``; ``Q``: ``Shard(1)``; the dct
    indices and per-column statistics, which every rank shares: ``Replicate()``), so
    ``torch.distributed.checkpoint`` sees one logical tensor per key. Low-rank moments are sharded
    by rows, which keeps each shard contiguous in the flattened moment: 8-bit moments quantize the
    same 256-element blocks as one process whenever a shard starts on a block boundary.

Adding a placement (tensor parallel, say) is one class here with these methods; the contract suite
runs the local one and the FSDP2 suite the row-sharded one against a single process.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..projection.bases import Bases
from ..projection.projectors import Layout, Projector
from ..projection.rotate import change_of_basis
from ..projection.sides import low_rank_shape, project_down
from ..rules.base import AllRows
from ..rules.quant import absmax_numel
from .whole_matrix import on_one_rank

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = None  # type: ignore[assignment,misc]


def is_sharded(p: Tensor) -> bool:
    """Whether ``p`` is an FSDP2 (DTensor) parameter."""
    return DTensor is not None and isinstance(p, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: in-place updates reach the parameter), else ``t``."""
    return t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined, no-any-return]


def local_bytes(t: Tensor) -> int:
    """Bytes of ``t`` this process holds (its local shard for a DTensor)."""
    return local(t).numel() * t.element_size()


class Local(AllRows):
    """The whole matrix is on this process: sums over rows are whole already (``total``, ``norm``: the
    rules' :class:`~gradproj.rules.base.AllRows`)."""

    def moment_shape(self, layout: Layout) -> tuple[int, int]:
        """Shape of the low-rank moments this process keeps."""
        return low_rank_shape(layout.shape, layout.rank, layout.side)

    def whole_shape(self, weight: Tensor) -> tuple[int, ...]:
        """The shape of the whole parameter, of which ``weight`` is this process's part."""
        return tuple(weight.shape)

    def full_gradient(self, grad: Tensor) -> Tensor:
        """The whole gradient, for a refresh."""
        return grad

    def after_refresh(self, state: dict[str, Any], layout: Layout, bases: Bases) -> Bases:
        """Keep this process's share of a fresh basis (stored in ``state`` by the projector) and return
        it as :meth:`materialize` does. Here: all of it."""
        return bases

    def materialize(self, state: dict[str, Any], layout: Layout, projector: Projector) -> Bases:
        """``(left, right)`` as the step uses them: the rows of ``P`` this process holds, all of ``Q``."""
        return projector.materialize(state, layout)

    def down(self, grad: Tensor, bases: Bases) -> Tensor:
        """``R = down(G)``: this process's rows of it (right side) or all of it (left, full)."""
        return project_down(grad, *bases)

    def share(self, low: Tensor, side: str) -> Tensor:
        """The part of ``R`` this process keeps moments for."""
        return low

    def gather(self, u: Tensor, side: str, shape: tuple[int, int]) -> Tensor:
        """The inverse of :meth:`share`: ``u`` as :meth:`down` shaped ``R``."""
        return u

    def change_of_basis(self, old: Bases, new: Bases) -> tuple[Tensor | None, Tensor | None]:
        return change_of_basis(old, new)

    @contextlib.contextmanager
    def moments_for_rotation(self, rule: Any, state: dict[str, Any], layout: Layout) -> Iterator[dict[str, Tensor]]:
        """Dense moments (whole ``R``-shaped) for the rotation to replace; stored back on exit."""
        moments = rule.moments(state)
        yield moments
        rule.set_moments(state, moments)

    @contextlib.contextmanager
    def local_state(
        self, state: dict[str, Any], shape: tuple[int, ...], replicated: tuple[str, ...] = ()
    ) -> Iterator[dict[str, Any]]:
        """The per-parameter state with plain tensors, for the rule, projector and residual policy (which
        update it in place or replace tensors); ``shape`` is the whole moments' shape (``R``'s, or the
        parameter's for full-rank groups); tensors under ``replicated`` keys are whole on every process."""
        yield state

    def whole_view(self, state: dict[str, Any], last_basis: bool) -> dict[str, Any]:
        """The state as a refresh reads it, plain tensors (a new dict): every statistic a refresh may
        read whole, and the whole last basis if ``last_basis`` (under FSDP2 that gathers it)."""
        return dict(state)

    @contextlib.contextmanager
    def whole_bases(self, state: dict[str, Any], last_basis: bool = True) -> Iterator[dict[str, Any]]:
        """:meth:`whole_view` for a refresh to write into: what the projector stores in it is written
        back (and :meth:`after_refresh` keeps this process's share)."""
        yield state


LOCAL = Local()


def _row_local(side: str) -> bool:
    """Whether ``R``'s rows are the weight's rows (right bases; the identity's ``R = G``), so they stay local."""
    return side in ("right", "none")


def row_chunk(size: int, rank: int, world: int) -> slice:
    """FSDP2's split of ``size`` rows: ``ceil(size / world)`` each, the last ones shorter or empty."""
    block = math.ceil(size / world)
    return slice(min(size, rank * block), min(size, (rank + 1) * block))


class RowSharded(Local):
    """FSDP2 (``fully_shard``): rows of one parameter across the ranks of its mesh; see the module docstring."""

    def __init__(self, p: Any) -> None:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        self.mesh, self.group = p.device_mesh, shard_group(p)
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        self.rows = slice(offset[0], offset[0] + shape[0])
        self.shape = tuple(int(s) for s in p.shape)
        self.prepared: Tensor | None = None  #: this step's ``whole`` result, computed ahead (spread_whole)

    def whole_shape(self, weight: Tensor) -> tuple[int, ...]:
        return self.shape

    # -- layout of the state ---------------------------------------------------------------------
    def _low_rows(self, layout: Layout) -> slice:
        """Rows of ``R`` whose moments this rank keeps."""
        rows, _ = low_rank_shape(layout.shape, layout.rank, layout.side)
        return self.rows if _row_local(layout.side) else row_chunk(rows, self.rank, self.world)

    def moment_shape(self, layout: Layout) -> tuple[int, int]:
        rows = self._low_rows(layout)
        return rows.stop - rows.start, low_rank_shape(layout.shape, layout.rank, layout.side)[1]

    def _wrap(self, t: Tensor, shape: tuple[int, ...], dim: int) -> Tensor:
        """``t`` as this rank's ``Shard(dim)`` of a DTensor of the full ``shape``."""
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            t, self.mesh, self._placed(Shard(dim)), run_check=False, shape=torch.Size(shape), stride=stride
        )

    def _placed(self, placement: Any) -> list[Any]:
        """``placement`` on the shard dimension of the mesh; HSDP's replicate dimension (a 2-D mesh) holds
        the same state on every replica: ``Replicate()``."""
        return [Replicate()] * (self.mesh.ndim - 1) + [placement]

    def full_gradient(self, grad: Tensor) -> Tensor:
        mine = self._padded(grad)
        buffers = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(buffers, mine, group=self.group)
        return self._assembled(buffers)

    def gather_to(self, grad: Tensor, owner: int) -> Callable[[], Tensor | None]:
        """Start sending this rank's rows of ``grad`` to ``owner`` (a rank of the shard group), without
        waiting; the function returned waits, and gives the owner the whole gradient (others: None)."""
        mine = self._padded(grad)
        buffers = [torch.empty_like(mine) for _ in range(self.world)] if self.rank == owner else None
        dst = dist.get_global_rank(self.group, owner)
        work = dist.gather(mine, buffers, dst=dst, group=self.group, async_op=True)

        def whole() -> Tensor | None:
            work.wait()
            if buffers is None:
                return None
            assembled = self._assembled(buffers)
            buffers.clear()  # one whole copy at a time
            return assembled

        return whole

    def broadcast_from(self, tensors: list[Tensor], owner: int) -> list[Any]:
        """Start sending ``tensors`` from ``owner`` to every rank of the shard group, in place (the
        others pass buffers of the same shapes); returns the works to wait on."""
        src = dist.get_global_rank(self.group, owner)
        return [dist.broadcast(t, src=src, group=self.group, async_op=True) for t in tensors]

    def _padded(self, grad: Tensor) -> Tensor:
        """This rank's rows of a ``self.shape`` matrix in a buffer of FSDP2's (equal) shard size."""
        rows = math.ceil(self.shape[0] / self.world)
        padded = torch.zeros(rows, *self.shape[1:], dtype=grad.dtype, device=grad.device)
        padded[: grad.shape[0]] = grad
        return padded

    def _assembled(self, buffers: list[Tensor]) -> Tensor:
        """The whole matrix from every rank's :meth:`_padded` rows."""
        chunks = [row_chunk(self.shape[0], r, self.world) for r in range(self.world)]
        return torch.cat([b[: c.stop - c.start] for b, c in zip(buffers, chunks, strict=True)])

    def after_refresh(self, state: dict[str, Any], layout: Layout, bases: Bases) -> Bases:
        if "basis_left" in state:  # m x r: this rank's rows, like the weight
            p = state["basis_left"]
            state["basis_left"] = self._wrap(p[self.rows].clone(), tuple(p.shape), 0)
        if "basis_right" in state:  # r x n: a column block, gathered when stepping (as FSDP gathers weights)
            q = state["basis_right"]
            state["basis_right"] = self._wrap(
                q[:, row_chunk(q.shape[1], self.rank, self.world)].clone(), tuple(q.shape), 1
            )
        for key in ("index_left", "index_right"):  # dct: the same r indices on every rank
            if key in state and not is_sharded(state[key]):
                state[key] = DTensor.from_local(state[key], self.mesh, self._placed(Replicate()), run_check=False)
        left, right = bases
        return (None if left is None else left[self.rows]), right

    def materialize(self, state: dict[str, Any], layout: Layout, projector: Projector) -> Bases:
        stored = "basis_left" in state or "basis_right" in state
        if not stored:  # dct / random rebuild the whole basis from indices or a seed; keep our rows of P
            plain = {k: v.to_local() if is_sharded(v) else v for k, v in state.items()}
            left, right = projector.materialize(plain, layout)
            return (None if left is None else left[self.rows]), right
        left = state["basis_left"].to_local() if "basis_left" in state else None
        right = state["basis_right"].full_tensor() if "basis_right" in state else None
        return left, right

    # -- the step's linear algebra ----------------------------------------------------------------
    def down(self, grad: Tensor, bases: Bases) -> Tensor:
        low = project_down(grad, *bases)  # right: this rank's rows of R; left/full: its share of the sum
        if bases[0] is not None:
            dist.all_reduce(low, group=self.group)
        return low

    def share(self, low: Tensor, side: str) -> Tensor:
        return low if _row_local(side) else low[row_chunk(low.shape[0], self.rank, self.world)].contiguous()

    def gather(self, u: Tensor, side: str, shape: tuple[int, int]) -> Tensor:
        if _row_local(side):
            return u
        padded = math.ceil(shape[0] / self.world)
        mine = torch.zeros(padded, shape[1], dtype=u.dtype, device=u.device)
        mine[: u.shape[0]] = u
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine, group=self.group)
        return torch.cat(parts)[: shape[0]]

    def norm(self, x: Tensor, rows: bool) -> Tensor:
        if not rows:
            return x.norm()
        return self.total(x.pow(2).sum()).sqrt()

    def total(self, x: Tensor) -> Tensor:
        x = x.clone()  # the caller's partial sum stays as it was
        dist.all_reduce(x, group=self.group)
        return x

    def whole(self, x: Tensor, rows: int, fn: Callable[[Tensor], Tensor]) -> Tensor:
        prepared, self.prepared = self.prepared, None
        return prepared if prepared is not None else on_one_rank(x, rows, fn, self.group, self.rank, self.world)

    def maximum(self, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def change_of_basis(self, old: Bases, new: Bases) -> tuple[Tensor | None, Tensor | None]:
        c_left, c_right = change_of_basis(old, new)  # P'_i^T P_i: this rank's share of the sum
        if c_left is not None:
            dist.all_reduce(c_left, group=self.group)
        return c_left, c_right

    @contextlib.contextmanager
    def moments_for_rotation(self, rule: Any, state: dict[str, Any], layout: Layout) -> Iterator[dict[str, Tensor]]:
        shape = low_rank_shape(layout.shape, layout.rank, layout.side)
        rows = shape[0]
        with self.local_state(state, shape) as plain:
            moments = rule.moments(plain)
            if _row_local(layout.side):  # rows of the weight: the rotation acts on the right, row by row
                yield moments
                rule.set_moments(plain, moments)
                return
            full = {k: self.gather(v, layout.side, (rows, v.shape[1])) for k, v in moments.items()}
            yield full
            mine = row_chunk(rows, self.rank, self.world)
            rule.set_moments(plain, {k: v[mine].contiguous() for k, v in full.items()})

    @contextlib.contextmanager
    def local_state(
        self, state: dict[str, Any], shape: tuple[int, ...], replicated: tuple[str, ...] = ()
    ) -> Iterator[dict[str, Any]]:
        """Plain local tensors; new or replaced ones are wrapped back as row shards (``Replicate()`` for
        ``replicated`` keys, or where the tensor replaced was replicated)."""
        plain = {k: v.to_local() if is_sharded(v) else v for k, v in state.items()}
        before = dict(plain)
        yield plain
        for key, value in plain.items():
            if key in before and value is before[key] and is_sharded(state[key]):
                continue  # updated in place: the DTensor's local tensor is this very tensor
            if not isinstance(value, Tensor) or value.dim() == 0 or key.startswith(("basis_", "index_")):
                state[key] = value  # counters, seeds, scalars (equal on every rank); bases: after_refresh
            elif key in replicated or _replicated(state.get(key)):
                state[key] = DTensor.from_local(value, self.mesh, self._placed(Replicate()), run_check=False)
            else:
                state[key] = self._row_shard(value, shape, absmax=key.endswith("_absmax"))

    def whole_view(self, state: dict[str, Any], last_basis: bool) -> dict[str, Any]:
        plain = {k: v for k, v in state.items() if not is_sharded(v)}
        for key, value in state.items():
            if is_sharded(value) and key.startswith("basis_") and last_basis:
                plain[key] = value.full_tensor()
            elif _replicated(value):
                plain[key] = value.to_local()
        return plain

    @contextlib.contextmanager
    def whole_bases(self, state: dict[str, Any], last_basis: bool = True) -> Iterator[dict[str, Any]]:
        plain = self.whole_view(state, last_basis)
        before = dict(plain)
        yield plain
        for key, value in plain.items():
            if value is not before.get(key):
                state[key] = value  # a fresh whole basis or indices: after_refresh shards them

    def _row_shard(self, t: Tensor, shape: tuple[int, ...], *, absmax: bool) -> Tensor:
        """A moment (this rank's rows of ``shape``) or its 8-bit absmax (one float per 256 elements of
        each rank's flattened rows, concatenated) as this rank's ``Shard(0)`` of one DTensor."""
        if absmax:
            per_row = math.prod(shape[1:])
            shares = [row_chunk(shape[0], k, self.world) for k in range(self.world)]
            shape = (sum(absmax_numel((share.stop - share.start) * per_row) for share in shares),)
        else:  # the whole tensor has the rows of ``shape``: moments, 8-bit codes, one number per row
            shape = (shape[0], *t.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            t, self.mesh, self._placed(Shard(0)), run_check=False, shape=torch.Size(shape), stride=stride
        )


def shard_group(p: Any) -> Any:
    """The process group ``p``'s rows are split over: its mesh's last dimension (FSDP2's only one; under
    HSDP, a 2-D ``(replicate, shard)`` mesh, the shard dimension: replicas hold equal rows and gradients)."""
    mesh = p.device_mesh
    return mesh.get_group(mesh.ndim - 1)


def _replicated(t: Any) -> bool:
    """Whether ``t`` is a DTensor that every rank holds whole."""
    return is_sharded(t) and all(isinstance(p, Replicate) for p in t.placements)


def placement_of(p: Tensor) -> Local:
    """The strategy for ``p``: row-sharded for an FSDP2 parameter, else local."""
    return RowSharded(p) if is_sharded(p) else LOCAL
