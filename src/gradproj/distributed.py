"""Data parallelism on PyTorch's own engine: DDP under ``torchrun``, with low-rank gradient
communication and layer-wise updates as options.

Every rank holds the same bases: a basis is computed from the *averaged* full gradient (refresh
steps always communicate it in full), with deterministic algorithms (``rsvd`` and ``random`` draw
from seeds that depend only on the parameter's name and the step), so no basis ever drifts
between ranks (tested).

Low-rank communication (``low_rank=True``): between refreshes a GaLore parameter's gradient is
only ever used through ``R = P^T G`` (r x n), and averaging commutes with projection, so ranks
all-reduce R instead of G (m x n). Refresh steps, groups without ``rank``, and Fira/APOLLO
(their residual uses G itself) exchange the full gradient. Each rank then holds ``P R_avg`` in
``.grad``, whose projection is ``R_avg`` again (P has orthonormal columns), so clipping and the
optimizer step see exactly the averaged gradient's captured part.

Layer-wise updates under DDP: the communication hook steps each parameter as soon as its bucket
is reduced. DDP keeps its gradient buckets allocated for the whole run, so under DDP layer-wise
updates overlap the optimizer with backward but do not save gradient memory; FSDP2 (which frees
reduced gradients) is the memory path. Accumulate micro-batches with ``model.no_sync()``.

Example (a script run with ``torchrun --nproc-per-node 2 script.py``)::

    import torch, gradproj
    from gradproj.distributed import init_from_env, wrap_ddp

    init_from_env()
    model = torch.nn.Linear(64, 64)
    opt = gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=8), lr=1e-2)
    ddp, comm = wrap_ddp(model, opt, low_rank=True)   # train through ddp; comm.stats counts bytes
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .layerwise import LayerwiseStepper
from .optim.engine import ProjectedOptimizer


def default_backend() -> str:
    """gloo on CPU; with CUDA, nccl for CUDA tensors and gloo for the CPU ones (the loop's small agreements)."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (:func:`default_backend`); returns
    ``(rank, world_size)``; ``(0, 1)`` when not launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return (0, 1) if not dist.is_initialized() else (dist.get_rank(), dist.get_world_size())
    if not dist.is_initialized():
        dist.init_process_group(backend or default_backend())
    return dist.get_rank(), dist.get_world_size()


def join_single_process_group(backend: str | None = None) -> None:
    """A process group of one, without torchrun (an in-memory store): FSDP2 and
    ``torch.distributed.checkpoint`` need a group even when there is one shard."""
    dist.init_process_group(backend or default_backend(), store=dist.HashStore(), rank=0, world_size=1)


@dataclass
class CommStats:
    """Bytes this rank sent to all-reduce, against what plain DDP sends (its full gradients)."""

    sent: int = 0
    full: int = 0
    per_step: list[tuple[int, int]] = field(default_factory=list)  # (sent, full) of finished steps

    def end_step(self) -> None:
        self.per_step.append((self.sent, self.full))
        self.sent = self.full = 0


class GradientComm:
    """The DDP communication hook: averages each bucket, in low rank where the maths allows, and
    optionally steps its parameters at once (layer-wise)."""

    def __init__(
        self, optimizer: ProjectedOptimizer | None, *, low_rank: bool, stepper: LayerwiseStepper | None
    ) -> None:
        if low_rank and not isinstance(optimizer, ProjectedOptimizer):
            raise TypeError("low-rank communication needs a gradproj optimizer (it knows each parameter's basis)")
        self.optimizer, self.low_rank, self.stepper = optimizer, low_rank, stepper
        self.stats = CommStats()

    def __call__(self, _state: Any, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        params, grads = bucket.parameters(), bucket.gradients()
        world = dist.get_world_size()
        with torch.no_grad():
            if self.low_rank:
                self._reduce_low_rank(params, grads, world)
            else:
                buffer = bucket.buffer()
                dist.all_reduce(buffer)
                buffer.div_(world)
                self.stats.sent += buffer.numel() * buffer.element_size()
            self.stats.full += sum(g.numel() * g.element_size() for g in grads)
        if self.stepper is not None:
            for p, g in zip(params, grads, strict=True):
                self.stepper.step_gradient(p, g)
        if bucket.is_last():
            self.stats.end_step()
        future: torch.futures.Future[Tensor] = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    def _reduce_low_rank(self, params: list[Tensor], grads: list[Tensor], world: int) -> None:
        assert self.optimizer is not None
        opt = self.optimizer
        projected = [opt.owns(p) and not opt.needs_full_gradient(p) for p in params]
        pieces = [opt.project_gradient(p, g) if low else g for p, g, low in zip(params, grads, projected, strict=True)]
        flat = torch.cat([piece.reshape(-1) for piece in pieces])
        dist.all_reduce(flat)
        flat.div_(world)
        self.stats.sent += flat.numel() * flat.element_size()
        offset = 0
        for p, g, piece, low in zip(params, grads, pieces, projected, strict=True):
            reduced = flat[offset : offset + piece.numel()].view_as(piece)
            offset += piece.numel()
            g.copy_(opt.lift_gradient(p, reduced) if low else reduced)


def wrap_ddp(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    low_rank: bool = False,
    layerwise: bool = False,
    max_grad_norm: float | None = None,
    **ddp_options: Any,
) -> tuple[DistributedDataParallel, GradientComm]:
    """``DistributedDataParallel(model)`` with gradproj's communication hook.

    ``low_rank`` all-reduces ``P^T G`` between refreshes; ``layerwise`` steps each parameter as
    soon as its bucket is reduced (then ``optimizer.step()`` is a no-op; ``max_grad_norm`` clips
    as :mod:`gradproj.layerwise` describes). Returns the wrapped model and the hook, whose
    ``stats`` count the bytes sent per step.
    """
    ddp = DistributedDataParallel(model, **ddp_options)
    stepper = None
    if layerwise:
        if not isinstance(optimizer, ProjectedOptimizer):
            raise TypeError("layer-wise updates need a gradproj optimizer")
        stepper = LayerwiseStepper(optimizer, max_grad_norm=max_grad_norm, hooks=False)
    comm = GradientComm(
        optimizer if isinstance(optimizer, ProjectedOptimizer) else None, low_rank=low_rank, stepper=stepper
    )
    # DDP inspects the hook's annotations, which postponed evaluation turns into strings: hand it a bare function
    ddp.register_comm_hook(None, lambda state, bucket: comm(state, bucket))
    return ddp, comm
