"""What the training loop needs to run unchanged under ``torchrun --nproc-per-node N``: the rank,
DDP wrapping (with gradproj's communication hook) or FSDP2 sharding (:mod:`gradproj.train.sharded`),
the data shard, the global batch, and the few collectives that keep every rank's decisions identical
(loss for the logs, non-finite steps, signals).

With one process every method is a no-op, so the loop reads the same either way. ``--fsdp`` without
torchrun joins a process group of one (FSDP2 needs one): one shard, the sharded checkpoint format.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import GradientComm, init_from_env, join_single_process_group, wrap_ddp
from ..layerwise import LayerwiseStepper
from .config import TrainConfig


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (downloads, tokenizer training, cache writes), then the others,
    who find the cache filled; without torchrun it just runs the block."""
    rank, world = init_from_env()
    if world > 1 and rank != 0:
        dist.barrier()
    yield
    if world > 1 and rank == 0:
        dist.barrier()


def micro_batches(global_batch: int, batch_size: int, world: int) -> tuple[int, int]:
    """``(batch_size, grad_accum)`` per rank that make up ``global_batch`` on ``world`` ranks: the
    fewest micro-batches of at most ``batch_size`` items (the memory the run was sized for).

    >>> micro_batches(8, 4, 2), micro_batches(8, 4, 1), micro_batches(8, 4, 4)
    ((4, 1), (4, 2), (2, 1))
    """
    if global_batch % world:
        raise ValueError(
            f"the global batch of {global_batch} does not split over {world} ranks; use a number of ranks that "
            f"divides it (or start a run with another --global-batch)"
        )
    per_rank = global_batch // world
    accum = next(a for a in range(1, per_rank + 1) if per_rank % a == 0 and per_rank // a <= batch_size)
    return per_rank // accum, accum


class Parallel:
    """This process's place in the run: ``rank`` of ``world`` (0 of 1 without torchrun); ``fsdp``
    shards the model with FSDP2 instead of replicating it with DDP."""

    def __init__(self, *, fsdp: bool = False, replicate: int = 1) -> None:
        self._owns_group = not (dist.is_available() and dist.is_initialized())
        self.rank, self.world = init_from_env()
        if fsdp and self.world == 1 and not dist.is_initialized():
            print("gradproj: --fsdp without torchrun: one process, one shard (torchrun --nproc-per-node N shards it)")
            join_single_process_group()
        self.fsdp, self.replicate = fsdp, replicate
        self.comm: GradientComm | None = None
        self.ddp: nn.Module | None = None

    @property
    def collective(self) -> bool:
        """Whether every rank must run every forward and backward (their collectives line up)."""
        return self.world > 1 or self.fsdp

    def batches(self, config: TrainConfig) -> TrainConfig:
        """``config`` with its global batch recorded (``batch_size x grad_accum x world`` at a run's start)
        and the per-rank micro-batches that make it up on this many ranks (a resumed run on another
        world size keeps the maths: the same items per step, only split differently)."""
        if config.global_batch is None:
            return replace(config, global_batch=config.batch_size * config.grad_accum * self.world)
        size, accum = micro_batches(config.global_batch, config.batch_size, self.world)
        if (size, accum) != (config.batch_size, config.grad_accum) and self.main:
            print(
                f"gradproj: global batch {config.global_batch} on {self.world} rank(s): --batch-size {size} "
                f"--grad-accum {accum} (was {config.batch_size} x {config.grad_accum})",
                flush=True,
            )
        return replace(config, batch_size=size, grad_accum=accum)

    def prepare(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model on this rank: sharded with FSDP2 under ``--fsdp``, else as it is."""
        if not self.fsdp:
            return model
        from .sharded import shard_model

        return shard_model(model, device, self.replicate)

    @property
    def main(self) -> bool:
        """Whether this rank writes logs, checkpoints and the summary."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """``cuda`` means this rank's GPU (``LOCAL_RANK``) under torchrun."""
        if self.world > 1 and device == "cuda":
            return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        return device

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, low_rank: bool, layerwise: bool, clip: float
    ) -> tuple[nn.Module, LayerwiseStepper | None]:
        """The module to train through (DDP when world > 1) and the DDP layer-wise stepper, if any."""
        if self.fsdp:  # FSDP2 reduce-scatters the gradients itself (its hooks were set by prepare)
            return model, None
        if self.world == 1:
            if low_rank:
                raise ValueError("--low-rank-comm needs several processes (launch with torchrun --nproc-per-node N)")
            return model, None
        self.ddp, self.comm = wrap_ddp(
            model, optimizer, low_rank=low_rank, layerwise=layerwise, max_grad_norm=clip if clip > 0 else None
        )
        return self.ddp, self.comm.stepper

    def shard(self, position: int, size: int) -> int:
        """Where this rank's micro-batch starts in a global batch of ``size * world`` items."""
        return position + self.rank * size

    def sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP communicates on the last micro-batch of a step only."""
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()  # type: ignore[operator]

    def mean(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.SUM) / self.world

    def every(self, flag: bool) -> bool:
        return flag if self.world == 1 else self._reduce(float(flag), dist.ReduceOp.MIN) > 0

    def largest(self, value: int) -> int:
        return int(self._reduce(float(value), dist.ReduceOp.MAX))

    def _reduce(self, value: float, op: Any) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor, op=op)
        return float(tensor[0])

    def same_on_every_rank(self, value: Any) -> Any:
        """Rank 0's ``value`` (e.g. a run folder named after the clock), everywhere."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def comm_bytes(self) -> dict[str, float]:
        """Bytes this rank sent in the last step and what plain DDP would have sent."""
        if self.comm is None or not self.comm.stats.per_step:
            return {}
        sent, full = self.comm.stats.per_step[-1]
        return {"comm_bytes": float(sent), "comm_bytes_plain_ddp": float(full)}

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Leave the process group when the run ends (torchrun starts a fresh one each launch)."""
        try:
            yield
        finally:
            if self._owns_group and dist.is_initialized():  # torchrun's group, or --fsdp's group of one
                if self.world > 1:
                    dist.barrier()  # leave together: gloo aborts a rank whose peer has already gone
                dist.destroy_process_group()
