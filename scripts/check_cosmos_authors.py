"""Step-by-step check of gradproj's COSMOS against the authors' code (lliu606/COSMOS, ``COSMOS_optim.py``).

The authors' optimizer is not on PyPI, so the test suite cannot import it; this script takes the file's
path, runs both optimizers on the same matrices and gradients in float64 and prints, per step, the
largest parameter difference relative to the largest parameter change. docs/ALGORITHMS.md records the
result and the mapping of options (the authors' matrices step at ``lr_ratio * lr``, their basis is on
the columns, their tracking decay is ``beta2``, their default ``nestrov=True`` is our ``nesterov=True``;
their ``nestrov=False`` branch steps along ``G / (1 - beta1^t)`` and never reads its momentum, which we
do not copy):

    python scripts/check_cosmos_authors.py /path/to/COSMOS_optim.py --steps 20

Two runs: ``--ns float`` (default) swaps the authors' Newton-Schulz for the same iteration without its
bfloat16 cast (every other line is theirs), so the remaining difference is rounding; ``--ns bf16`` keeps
their bfloat16 iteration (uncompiled) and shows how much that one speed choice moves the step.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

import gradproj

SHAPES = ((48, 32), (24, 40))  # tall and wide: the authors' basis is n x r for both
# eps 1e-7: the authors' Frobenius normalizations add the group's eps, ours a fixed 1e-7 (TINY); with
# eps = 1e-7 both add the same, so what is left is rounding (at eps = 1e-8 the steps part by ~1e-8)
RANK, LR, RATIO, GAMMA, BETAS, EPS = 8, 1e-2, 0.1, 0.2, (0.9, 0.95), 1e-7


def load_authors(path: Path, ns: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("authors_cosmos", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    compiled = module.zeropower_via_newtonschulz5
    original = getattr(compiled, "_torchdynamo_orig_callable", compiled)  # their function without torch.compile
    module.zeropower_via_newtonschulz5 = original if ns == "bf16" else float_newton_schulz
    return module


def float_newton_schulz(g: torch.Tensor, steps: int = 10, eps: float = 1e-7) -> torch.Tensor:
    """The authors' ``zeropower_via_newtonschulz5`` line by line, in ``g``'s dtype instead of bfloat16."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    x = g.clone()
    x /= x.norm() + eps
    if g.size(0) > g.size(1):
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        cube = gram @ x
        x = a * x + b * cube + c * gram @ cube
    if g.size(0) > g.size(1):
        x = x.T
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("authors_file", type=Path, help="the authors' COSMOS_optim.py")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ns", choices=("float", "bf16"), default="float")
    args = parser.parse_args()
    authors = load_authors(args.authors_file, args.ns)
    gen = torch.Generator().manual_seed(0)
    theirs = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    start = [p.detach().clone() for p in theirs]
    reference = authors.COSMOS(
        theirs, lr=LR, betas=BETAS, eps=EPS, lr_ratio=RATIO, rank=RANK, gamma=GAMMA, nestrov=True
    )
    group = {
        "params": ours,
        "rank": RANK,
        "proj_type": "right",
        "track_beta": BETAS[1],
        "muon_scale": GAMMA,
        "nesterov": True,
    }
    optimizer = gradproj.COSMOS([group], lr=RATIO * LR, betas=BETAS, eps=EPS)
    worst = 0.0
    for step in range(1, args.steps + 1):
        for a, b in zip(theirs, ours, strict=True):
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64)  # m x n
            a.grad, b.grad = g.clone(), g.clone()
        reference.step()
        optimizer.step()
        diff = max(float((a - b).abs().max()) for a, b in zip(theirs, ours, strict=True))
        moved = max(float((a - s).abs().max()) for a, s in zip(theirs, start, strict=True))
        worst = max(worst, diff / moved)
        print(f"step {step:3d}: max |ours - theirs| = {diff:.3e}, relative to the largest change {diff / moved:.3e}")
    print(f"worst relative difference over {args.steps} steps (--ns {args.ns}): {worst:.3e}")
    sys.exit(0 if args.ns == "bf16" or worst < 1e-10 else 1)


if __name__ == "__main__":
    main()
