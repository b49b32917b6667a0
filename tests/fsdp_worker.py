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
from gradproj.optim import placement, whole_matrix
from gradproj.optim.build import OptimizerSpec, build_optimizer
from gradproj.optim.placement import RowSharded
from gradproj.optim.registry import METHODS
from gradproj.optim.validate import combination_error, sharding_blocker
from gradproj.projection import PROJECTORS
from gradproj.projection.projectors import REGISTRY
from gradproj.rules import Adam, make_rule
from gradproj.rules import muon as muon_rule

STEPS, GLOBAL_BATCH, GAP = 7, 8, 3
FULL = {"proj_type": "full", "projector": "rsvd"}
#: case -> method (a registry name), its options, the model, the rank. "state" cases also bound each
#: rank's share of the state; "quantized" ones check that 8-bit moments did quantize. Derived from the
#: owners: every projector, and every FSDP-capable projected method with rotate and with proj_type="full"
#: where those fit it (Alice's compensation needs a one-sided basis).
CASES: dict[str, dict[str, Any]] = {
    projector: {
        "options": {"projector": projector, **({"on_refresh": "reset"} if projector == "random" else {})},
        "state": True,
    }
    for projector in PROJECTORS
    if sharding_blocker({**gradproj.GaLoreAdamW.projection_defaults(), "rank": 1, "projector": projector}, Adam())
    is None
}


def _fits(method: str, options: dict[str, Any]) -> bool:
    """Whether the method's group with these options is valid and row-shardable (their owners decide)."""
    preset = gradproj.PRESETS[METHODS[method].preset]  # type: ignore[index]
    group = {"rank": 1, **preset.projection_defaults(), **METHODS[method].group_options, **options}
    rule = make_rule(group["rule"] or preset.RULE)
    return combination_error(group) is None and sharding_blocker(group, rule) is None


for _method in METHODS.values():
    if _method.kind == "preset" and _method.projected and _method.variant_of is None and _method.supports_fsdp:
        for _suffix, _options in (("rotate", {"on_refresh": "rotate"}), ("full", FULL)):
            if _fits(_method.name, _options):
                CASES[f"{_method.name}_{_suffix}"] = {"method": _method.name, "options": _options}
# 8-bit moments that quantize (>= 4096 elements) and whose row shards start on 256-element blocks, so each
# rank quantizes the same blocks as one process
CASES["galore8bit_big"] = {
    "method": "galore_adamw8bit",
    "options": {"on_refresh": "rotate"},
    "model": "big",
    "quantized": True,
}
# update_proj_gap="auto": the two squared norms are summed over the ranks, so every rank decides alike
CASES["galore_auto"] = {
    "method": "galore_adamw",
    "options": {"update_proj_gap": "auto", "min_gap": 1, "max_gap": 4, "check_every": 1, "energy_threshold": 0.99},
}
CASES["fira_auto_full"] = {"method": "fira_adamw", "options": {**CASES["galore_auto"]["options"], **FULL}}
# Stable-SPAM: the largest entry and the norm are taken over every rank's rows, so every rank decides alike
CASES["galore_spam"] = {"method": "galore_adamw", "options": {"spike_policy": "stable_spam", "spam_reset_gap": 3}}
CASES["galore8bit_big_spam"] = {
    **CASES["galore8bit_big"],
    "options": {"on_refresh": "rotate", **CASES["galore_spam"]["options"]},
}
# SCALE's embedding scaling (over rows: the column sums are all-reduced) and its head's momentum
# Muon on the whole matrices (identity): orthogonalized on one rank each, spread over the ranks after the first step
CASES["muon"] = {"method": "muon", "options": {"ns_dtype": None}}
CASES["scale_columns_momentum"] = {"method": "scale", "options": {"norm_dim": 0, "momentum": 0.9}}
IN_FEATURES = {"small": 12, "big": 32}


def make_model(kind: str = "small") -> nn.Module:
    """small: a tall weight (33 x 12: right side, rows split 17/16), a wide one (7 x 33: left side, rows
    4/3) and an unprojected head. big: 1024 x 32 (right: moments 1024 x 4, rows 512/512) and 32 x 1024 (left:
    R is 4 x 1024, rows 2/2), whose moments quantize; the rank stays below the batch's, so no singular
    value is degenerate (a tie would make the basis depend on rounding)."""
    torch.manual_seed(0)
    if kind == "big":
        return nn.Sequential(nn.Linear(32, 1024), nn.Tanh(), nn.Linear(1024, 32), nn.Tanh(), nn.Linear(32, 6)).double()
    return nn.Sequential(nn.Linear(12, 33), nn.Tanh(), nn.Linear(33, 7), nn.Tanh(), nn.Linear(7, 6)).double()


def make_optimizer(model: nn.Module, case: dict[str, Any]) -> Any:
    options = {"update_proj_gap": GAP, "lr": 1e-2, "other_lr": 1e-2, "rank": 4, **case["options"]}
    spec = OptimizerSpec(name=case.get("method", "galore_adamw"), target_modules=["0", "2"], **options)
    return build_optimizer(model, spec)


def global_batch(step: int, features: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + step)
    x = torch.randn(GLOBAL_BATCH, features, generator=g, dtype=torch.float64)
    return x, torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of state this process holds (a DTensor's local shard, not its global size)."""
    tensors = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in (t.to_local() if is_dtensor(t) else t for t in tensors))


def reference(name: str) -> tuple[dict[str, torch.Tensor], int]:
    kind = CASES[name].get("model", "small")
    model = make_model(kind)
    opt = make_optimizer(model, CASES[name])
    for step in range(STEPS):
        x, y = global_batch(step, IN_FEATURES[kind])
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


#: projector refreshes computed on this process, by projector name, and all-gathers of a whole gradient
#: ("full_gradient"), counted by count_refreshes
REFRESHES: dict[str, int] = {}


def count_refreshes() -> None:
    """Count every projector's refresh computations on this process (into REFRESHES)."""
    for projector in REGISTRY.values():
        compute = projector.refresh

        def counted(*args: Any, _compute: Any = compute, _name: str = projector.name, **kwargs: Any) -> Any:
            REFRESHES[_name] = REFRESHES.get(_name, 0) + 1
            return _compute(*args, **kwargs)

        projector.refresh = counted  # type: ignore[method-assign]
    all_gather = RowSharded.full_gradient

    def counted_gather(self: RowSharded, grad: torch.Tensor) -> torch.Tensor:
        REFRESHES["full_gradient"] = REFRESHES.get("full_gradient", 0) + 1
        return all_gather(self, grad)

    RowSharded.full_gradient = counted_gather  # type: ignore[method-assign]
    iterate, one_by_one = muon_rule.newton_schulz, whole_matrix.on_one_rank

    def counted_iterations(*args: Any, **kwargs: Any) -> torch.Tensor:
        REFRESHES["orthogonalizations"] = REFRESHES.get("orthogonalizations", 0) + 1
        return iterate(*args, **kwargs)

    def counted_one_by_one(*args: Any, **kwargs: Any) -> torch.Tensor:
        REFRESHES["one_by_one"] = REFRESHES.get("one_by_one", 0) + 1
        return one_by_one(*args, **kwargs)

    muon_rule.newton_schulz = counted_iterations  # type: ignore[assignment]
    placement.on_one_rank = counted_one_by_one  # type: ignore[assignment]


def run_case(name: str, rank: int, world: int, spread: bool = True) -> dict[str, Any]:
    kind = CASES[name].get("model", "small")
    model = shard(make_model(kind))
    opt = make_optimizer(model, CASES[name])
    opt.spread = spread
    REFRESHES.clear()
    for step in range(STEPS):
        x, y = global_batch(step, IN_FEATURES[kind])
        local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        (model(x[local]) - y[local]).square().mean().backward()
        opt.step()
        opt.zero_grad()
    mine = torch.tensor([state_bytes(opt)])
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    weights = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    sharded = all(
        is_dtensor(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()
    )
    quantized = any("exp_avg_codes" in s for s in opt.state.values())
    ours = ("full_gradient", "orthogonalizations", "one_by_one")
    counts = torch.tensor([sum(n for k, n in REFRESHES.items() if k not in ours), *(REFRESHES.get(k, 0) for k in ours)])
    everyone_counts = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(everyone_counts, counts)
    return {
        "weights": weights,
        "state_bytes": [int(t) for t in everyone],
        "dtensor_state": sharded,
        "quantized": quantized,
        "refreshes": [int(t[0]) for t in everyone_counts],
        "gradient_all_gathers": [int(t[1]) for t in everyone_counts],
        "orthogonalizations": [int(t[2]) for t in everyone_counts],  # Newton-Schulz runs on each rank
        "one_by_one": [int(t[3]) for t in everyone_counts],  # matrices gathered alone (not spread)
    }


def is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def unsupported_rule_error() -> str:
    """Adafactor's factored statistics need whole rows and columns: refused with a clear error."""
    model = shard(make_model())
    groups = gradproj.param_groups(model, target_modules=["0", "2"], rank=4, update_proj_gap=GAP)
    opt = gradproj.GaLoreAdafactor(groups)
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
    count_refreshes()
    results: dict[str, Any] = {name: run_case(name, rank, world) for name in CASES}
    results["svd_unspread"] = run_case("svd", rank, world, spread=False)
    results["muon_unspread"] = run_case("muon", rank, world, spread=False)
    results["adafactor_error"] = unsupported_rule_error()
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
