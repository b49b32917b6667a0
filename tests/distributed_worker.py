"""Run by ``torchrun --nproc-per-node 2`` from tests/test_distributed.py: DDP cases on CPU/gloo.

Each case trains a float64 model for a few steps on a global batch split across the ranks and
rank 0 saves the final weights, the largest basis difference between ranks and the bytes sent.
The test compares them with a single-process run on the whole global batch (``reference``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

import torch
from torch import nn

import gradproj
from gradproj.distributed import init_from_env, wrap_ddp

STEPS, GLOBAL_BATCH, GAP = 6, 8, 3
CASES: dict[str, dict[str, Any]] = {
    "plain": {"preset": "galore"},
    "low_rank": {"preset": "galore", "low_rank": True},
    "low_rank_rsvd": {"preset": "galore", "projector": "rsvd", "low_rank": True},
    "random": {"preset": "galore", "projector": "random"},
    "fira_low_rank": {"preset": "fira", "low_rank": True},  # Fira needs G: falls back to full exchange
    "layerwise": {"preset": "galore", "layerwise": True},
    "layerwise_low_rank_accum": {"preset": "galore", "layerwise": True, "low_rank": True, "accum": 2},
    "accum": {"preset": "galore", "accum": 2},
    # Alice's compensation needs G (full exchange); its switching draws are seeded, so ranks agree
    "alice_low_rank": {"preset": "alice", "low_rank": True},
    "alice_layerwise_accum": {"preset": "alice", "layerwise": True, "accum": 2},
    "racs": {"preset": "racs", "low_rank": True},  # R = G: the "low-rank" exchange is the full gradient
    # update_proj_gap="auto": every rank measures the same share of the same reduced gradient
    "auto": {"preset": "galore", "auto": True},
    "auto_layerwise_accum": {"preset": "fira", "auto": True, "layerwise": True, "accum": 2},
    # rank="auto": every rank takes the same SVD of the same reduced gradient, so the same ranks
    "auto_rank": {"preset": "galore", "auto_rank": True},
    "auto_rank_auto_gap": {"preset": "fira", "auto": True, "auto_rank": True},
    # Stable-SPAM's policy: every rank clips and rescales the same reduced gradient, so decides alike
    "spam": {"preset": "galore", "spam": True},
    "spam_layerwise_accum": {"preset": "fira", "spam": True, "layerwise": True, "accum": 2},
    # GradNormLoRP reads G's rows (full exchange); every rank rebuilds the same weight from the same state
    "gradnorm_low_rank": {"preset": "gradnorm", "low_rank": True},
    "gradnorm_layerwise_accum": {"preset": "gradnorm", "layerwise": True, "accum": 2},
    # Muon orthogonalizes the same reduced momentum on every rank; the subspace one exchanges R between refreshes
    "muon": {"preset": "muon", "low_rank": True},
    "subspace_muon_layerwise_low_rank_accum": {
        "preset": "subspace_muon",
        "layerwise": True,
        "low_rank": True,
        "accum": 2,
    },
    "scale": {"preset": "scale"},
}
#: Stable-SPAM with a reset inside the short run
SPAM = {"spike_policy": "stable_spam", "spam_reset_gap": 3}
#: a budget between rank 1 everywhere (1,440 bytes) and the cap of 8 everywhere (10,624 bytes)
AUTO_RANK = {"rank": "auto", "state_budget": 4000, "max_rank": 8}
#: refresh on the signal at almost every step of the short run (min_gap 1, a strict threshold)
AUTO = {"update_proj_gap": "auto", "min_gap": 1, "max_gap": 4, "check_every": 1, "energy_threshold": 0.99}
PRESETS = {
    "galore": gradproj.GaLoreAdamW,
    "fira": gradproj.FiraAdamW,
    "alice": gradproj.Alice,
    "racs": gradproj.RACS,
    "gradnorm": gradproj.GradNormLoRP,
    "muon": gradproj.Muon,
    "subspace_muon": gradproj.SubspaceMuon,
    "scale": gradproj.SCALE,
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 6)).double()


def make_optimizer(model: nn.Module, case: dict[str, Any]) -> gradproj.ProjectedOptimizer:
    schedule = AUTO if case.get("auto") else {"update_proj_gap": GAP}
    ranks = AUTO_RANK if case.get("auto_rank") else {"rank": 4}
    groups = gradproj.param_groups(model, target_modules=["0", "2"], **ranks, **schedule)
    cls = PRESETS[case["preset"]]
    projector = {"projector": case["projector"]} if "projector" in case else {}
    policy = SPAM if case.get("spam") else {}
    return cls(groups, lr=1e-2, **projector, **policy)  # type: ignore[operator]


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 12, generator=g, dtype=torch.float64)
    return x, torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64)


def reference(case_name: str) -> dict[str, torch.Tensor]:
    """The single-process run on the whole global batch."""
    case = CASES[case_name]
    model = make_model()
    opt = make_optimizer(model, case)
    for step in range(STEPS):
        x, y = global_batch(step)
        (model(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}


def run_case(name: str, rank: int, world: int) -> dict[str, Any]:
    case = CASES[name]
    model = make_model()
    opt = make_optimizer(model, case)
    ddp, comm = wrap_ddp(model, opt, low_rank=case.get("low_rank", False), layerwise=case.get("layerwise", False))
    accum = case.get("accum", 1)
    for step in range(STEPS):
        x, y = global_batch(step)
        local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        micro = list(zip(x[local].chunk(accum), y[local].chunk(accum), strict=True))
        for i, (xs, ys) in enumerate(micro):
            sync = i == len(micro) - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                ((ddp(xs) - ys).square().mean() / accum).backward()
        opt.step()  # a no-op when layer-wise
        opt.zero_grad()
    bases = [
        state[key].reshape(-1) for state in opt.state.values() for key in ("basis_left", "basis_right") if key in state
    ]
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "basis_diff": _spread(torch.cat(bases) if bases else torch.zeros(1, dtype=torch.float64), world),
        "weight_diff": _spread(weights, world),
        "bases": len(bases),
        "comm": comm.stats.per_step,
    }


def _spread(mine: torch.Tensor, world: int) -> float:
    """Largest difference between this tensor on any rank and on rank 0."""
    gathered = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(gathered, mine)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args(argv)
    rank, world = init_from_env()
    results = {name: run_case(name, rank, world) for name in args.cases.split(",")}
    if rank == 0:
        torch.save(results, args.out)
    torch.distributed.barrier()  # leave together: gloo aborts a rank whose peer has already gone
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: gloo's threads sometimes abort there after a clean run
