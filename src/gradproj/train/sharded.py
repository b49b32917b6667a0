"""FSDP2 in the trainer: the model sharded the way torchtitan does it, one ``fully_shard`` per
transformer block and one at the root, on a 1-D mesh of every rank.

Each rank then holds about ``1/world`` of every weight's rows, of its gradient (FSDP2 reduce-scatters
it) and, through :class:`gradproj.optim.placement.RowSharded`, of the optimizer state. A block's
weights are all-gathered for its forward and again for its backward (freed in between), so the
unsharded weights of one block are alive at a time. With bf16 weights the gradients are reduced in
float32 (``MixedPrecisionPolicy(reduce_dtype=float32)``): a sum over ranks in bf16 would lose the
bits stochastic rounding keeps.

Example (one process: a group of one, as ``--fsdp`` without torchrun joins)::

    from gradproj.distributed import join_single_process_group
    from gradproj.train.models import build_causal_lm
    join_single_process_group()
    model = shard_model(build_causal_lm("llama-tiny", vocab_size=256, seq_len=32), torch.device("cpu"))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..architectures import transformer_blocks, untied_input_embeddings


def device_mesh(device: torch.device, replicate: int = 1) -> Any:
    """All ranks as one shard dimension, or HSDP's ``(replicate, shard)`` grid of ``replicate`` rows."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if replicate == 1:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    if world % replicate:
        raise ValueError(
            f"--fsdp-replicate {replicate} does not divide the {world} ranks; use a divisor of {world} "
            "(e.g. the number of nodes)"
        )
    return init_device_mesh(device.type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))


def shard_model(model: nn.Module, device: torch.device, replicate: int = 1) -> nn.Module:
    """``fully_shard`` every transformer block and the input embeddings (each gathered only while it
    runs), then the root (final norm and head, needed first in backward), on one mesh of all ranks, as
    torchtitan does; the model's parameters become ``DTensor`` row shards in place. ``replicate > 1``:
    HSDP (:func:`device_mesh`)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = device_mesh(device, replicate)
    dtype = next(model.parameters()).dtype
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32 if dtype != torch.float32 else None)
    embed = untied_input_embeddings(model)
    for unit in [*([embed] if embed is not None else []), *transformer_blocks(model)]:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
