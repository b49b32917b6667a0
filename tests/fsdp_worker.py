"""Run by ``torchrun --nproc-per-node 2`` from tests/test_distributed.py: FSDP2 (``fully_shard``)
cases on CPU/gloo. Rank 0 saves the gathered final weights and every rank's optimizer-state bytes;
the test compares them with one process on the same global batch (``reference``)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import gradproj

STEPS, GLOBAL_BATCH, GAP = 7, 8, 3
CASES: dict[str, dict[str, Any]] = {
    "svd": {"projector": "svd"},
    "rsvd": {"projector": "rsvd"},
    "dct": {"projector": "dct"},
    "random_reset": {"projector": "random", "on_refresh": "reset"},
}


def make_model() -> nn.Module:
    """A tall weight (33 x 12: right side, rows split 17/16), a wide one (7 x 33: left side,
    rows 4/3) and an unprojected head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 33), nn.Tanh(), nn.Linear(33, 7), nn.Tanh(), nn.Linear(7, 6)).double()


def make_optimizer(model: nn.Module, case: dict[str, Any], cls: Any = gradproj.GaLoreAdamW) -> Any:
    groups = gradproj.param_groups(model, target_modules=["0", "2"], rank=4, update_proj_gap=GAP)
    return cls(groups, lr=1e-2, **case)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + step)
    x = torch.randn(GLOBAL_BATCH, 12, generator=g, dtype=torch.float64)
    return x, torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )


def reference(name: str) -> tuple[dict[str, torch.Tensor], int]:
    model = make_model()
    opt = make_optimizer(model, CASES[name])
    for step in range(STEPS):
        x, y = global_batch(step)
        (model(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}, state_bytes(opt)


def shard(model: nn.Module) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def run_case(name: str, rank: int, world: int) -> dict[str, Any]:
    model = shard(make_model())
    opt = make_optimizer(model, CASES[name])
    for step in range(STEPS):
        x, y = global_batch(step)
        local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        (model(x[local]) - y[local]).square().mean().backward()
        opt.step()
        opt.zero_grad()
    mine = torch.tensor([state_bytes(opt)])
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    weights = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    return {"weights": weights, "state_bytes": [int(t) for t in everyone]}


def unsupported_residual_error() -> str:
    model = shard(make_model())
    opt = make_optimizer(model, {}, gradproj.FiraAdamW)
    x, y = global_batch(0)
    (model(x) - y).square().mean().backward()
    try:
        opt.step()
    except ValueError as error:
        return str(error)
    return ""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, Any] = {name: run_case(name, rank, world) for name in CASES}
    results["fira_error"] = unsupported_residual_error()
    if rank == 0:
        torch.save(results, args.out)
    dist.barrier()  # leave together: gloo aborts a rank whose peer has already gone
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: gloo's threads sometimes abort there after a clean run
