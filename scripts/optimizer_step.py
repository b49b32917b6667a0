"""The optimizer step alone, side by side: every optimizer steps the same model shape with the same
fixed gradients, one step each in turn (so a drifting host slows them alike), over one whole
``update_proj_gap`` after two untimed steps (the first bases; a compile); appends one record per
optimizer with its median, mean and slowest step, and their ratios to torch's fused AdamW.

    python scripts/optimizer_step.py docs/records/optimizer_step_llama20m_cpu.jsonl

``bench speed`` times the trainer's whole step (forward, backward, clipping, step); this isolates the
part the optimizers differ in, where a refresh step's cost is not hidden in the noise of a forward
pass; our optimizers are built as the trainer builds them (``nonfinite="checked"``: the trainer's
clipped gradient norm catches a non-finite step, so the step does not read every gradient again).
The mean over the gap is the amortized step (every matrix refreshes once in it, aligned or
staggered); the slowest step is the aligned refresh step, or the worst staggered one.

``matmul-floor`` is not an optimizer: it is the least any GaLore step can cost, measured. Every projected
matrix gets its projection and its lift (``R = P^T G``, ``W -= lr P R``: the two ``2 r m n`` matmuls
every implementation pays), and the rest torch's fused AdamW step; no moments, no refresh.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from gradproj.optim.build import OptimizerSpec, build_optimizer
from gradproj.train.models import build_causal_lm

#: name in the record -> (registry method, OptimizerSpec overrides)
LINEUP: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("adamw", {}),  # torch's fused kernel: the baseline
    "adamw+loop": ("adamw+loop", {}),
    "galore_adamw": ("galore_adamw", {}),
    "galore_adamw+staggered": ("galore_adamw", {"refresh_offset": "staggered"}),
    "galore_adamw+loop": ("galore_adamw+loop", {}),
    "galore_adamw+compile": ("galore_adamw+compile", {}),
    # update_proj_gap="auto" that never refreshes (a threshold no share falls below, max_gap past the run):
    # its cost over galore_adamw at a gap past the run (--gap 100000) is the adaptive refresh's signal alone
    "galore_adamw+signal": ("galore_adamw", {"update_proj_gap": "auto", "energy_threshold": 1e-6, "max_gap": 10**6}),
    "galore-torch": ("galore-torch", {}),
    "fira_adamw": ("fira_adamw", {}),
    "fira_adamw+loop": ("fira_adamw+loop", {}),
    "fira": ("fira", {}),
    "apollo_adamw": ("apollo_adamw", {}),
    "apollo_adamw+loop": ("apollo_adamw+loop", {}),
    "apollo-torch": ("apollo-torch", {}),
    "galore_adamw8bit": ("galore_adamw8bit", {}),
    "adamw8bit-bnb": ("adamw8bit-bnb", {}),
}


class MatmulFloor:
    """GaLore's projection and lift for every matrix ``optimizer`` projects, fused AdamW for the rest."""

    def __init__(self, optimizer: torch.optim.Optimizer, rank: int) -> None:
        projected = [g for g in optimizer.param_groups if "rank" in g]
        self.matrices = [p for g in projected for p in g["params"]]
        self.bases = []
        for weight in self.matrices:  # the smaller side, as GaLore projects it
            rows, cols = weight.shape
            self.bases.append(torch.linalg.qr(torch.randn(min(rows, cols), rank))[0])  # (min(m, n), r)
        rest = [p for g in optimizer.param_groups if "rank" not in g for p in g["params"]]
        self.rest = torch.optim.AdamW(rest, lr=1e-3, fused=True)

    @torch.no_grad()
    def step(self) -> None:
        for weight, basis in zip(self.matrices, self.bases, strict=True):
            grad = weight.grad
            assert grad is not None
            if weight.shape[0] <= weight.shape[1]:
                low = basis.T @ grad  # (r, n)
                weight.addmm_(basis, low, alpha=-1e-3)
            else:
                low = grad @ basis  # (m, r)
                weight.addmm_(low, basis.T, alpha=-1e-3)
        self.rest.step()


def build(name: str, args: argparse.Namespace) -> tuple[Any, torch.nn.Module]:
    if name == "matmul-floor":
        optimizer, model = build("galore_adamw", args)
        return MatmulFloor(optimizer, args.rank), model
    method, overrides = LINEUP[name]
    torch.manual_seed(0)
    model = build_causal_lm(args.model, vocab_size=args.vocab, seq_len=256)
    options = {"update_proj_gap": args.gap, **overrides}  # a line-up entry may fix its own schedule
    spec = OptimizerSpec(name=method, lr=1e-3, other_lr=1e-3, rank=args.rank, weight_decay=0.0, **options)
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3  # fixed: every step sees the same gradients
    return build_optimizer(model, spec, nonfinite="checked"), model  # as the trainer builds it (it checks the norm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="JSONL file to append the records to")
    parser.add_argument("--model", default="llama-20m")
    parser.add_argument("--rank", type=int, default=96)
    parser.add_argument("--gap", type=int, default=100)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: one whole gap)")
    parser.add_argument("--threads", type=int, default=2)
    choices = [*LINEUP, "matmul-floor"]
    parser.add_argument("--names", default=",".join(choices), help=f"comma-separated, of {', '.join(choices)}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.names.split(",")
    unknown = [name for name in names if name not in choices]
    if unknown:
        parser.error(f"--names: {', '.join(unknown)} unknown; choose from {', '.join(choices)}")
    built = {name: build(name, args) for name in names}
    for optimizer, _ in built.values():
        optimizer.step()  # the first step: state allocation and every first basis
        optimizer.step()  # the first fast-path step (compile=True compiles here)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.steps or args.gap):  # one whole gap: every matrix refreshes once in it, on either schedule
        for name, (optimizer, _) in built.items():
            start = time.perf_counter()
            optimizer.step()
            seconds[name].append(time.perf_counter() - start)
    base = seconds.get("adamw") or seconds[names[0]]
    with args.out.open("a") as sink:
        for name, times in seconds.items():
            median, mean = statistics.median(times), statistics.fmean(times)
            record = {
                "benchmark": "optimizer_step",
                "method": name,
                "step_seconds_median": median,
                "step_seconds_mean": mean,
                "step_seconds_max": max(times),
                "vs_adamw": median / statistics.median(base),
                "vs_adamw_mean": mean / statistics.fmean(base),
                "max_vs_median": max(times) / median,
                "steps": len(times),
                "config": {k: v for k, v in vars(args).items() if k != "out"},
                "host": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
            }
            sink.write(json.dumps(record) + "\n")
            slowest = max(times) / median
            print(
                f"{name:24s} median {1000 * median:7.1f} ms  mean {1000 * mean:7.1f} ms  slowest/median {slowest:5.2f}"
            )


if __name__ == "__main__":
    main()
