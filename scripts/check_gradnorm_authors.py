"""Step-by-step check of gradproj's GradNormLoRP against the authors' code (Jhhuangkay/Gradient-Weight-normalized-
Low-rank-Projection-for-Efficient-LLM-Training, folder ``GradNormLoRP/``).

The authors' package is not on PyPI (``pip install GradNormLoRP`` finds nothing), so the test suite cannot
import it; this script takes the folder's path, runs their two weight-normalised optimizers and ours on the
same matrices and gradients in float64 and prints what each does to the weight:

    python scripts/check_gradnorm_authors.py /path/to/GradNormLoRP --steps 20

* ``WeightNormGaLoreAdamW`` (``wadamw.py``, their ``--optimizer weight_norm_galore_adamw``) keeps a detached
  copy of the weight's direction and magnitude and steps those; the lines that would write them back into
  the weight are commented out, so the weight does not move (the script prints the largest change: 0).
* ``LowRankWeightNormAdamW`` (their ``--optimizer lowrank``) writes the weight. It sets ``g = ||v||`` at the
  start of every step, so ``dL/dv = G g / ||v|| = G`` and its ``v`` is galore-torch's GaLore on ``G`` step
  for step (printed: the largest difference from ``galore_torch.GaLoreAdamW``'s weight), and each step's
  magnitude update lasts one step (the weight's row norms are ``||v||`` minus that step's update, printed).
  Its magnitude gradient ``rowsum(G v / ||v||)`` is the paper's and ours (printed at the first step).
* gradproj's :class:`~gradproj.GradNormLoRP` keeps ``g`` and ``||v||`` as two parameters (weight
  normalisation as the paper and Salimans & Kingma write it; tested equal to PyTorch's own ``weight_norm``
  parametrisation trained with GaLore), removes the radial part of ``G`` from ``dL/dv`` and steps ``g`` at
  ``lr * scale``; docs/ALGORITHMS.md lists each difference.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
from pathlib import Path
from types import ModuleType

import torch

import gradproj

SHAPES = ((48, 32), (24, 40))
RANK, GAP, LR, SCALE = 8, 5, 1e-2, 0.25


def load_authors(folder: Path) -> ModuleType:
    """Their folder as a package, without its ``__init__`` (which imports bitsandbytes for the 8-bit classes)."""
    package = ModuleType("authors_gradnorm")
    package.__path__ = [str(folder)]
    sys.modules["authors_gradnorm"] = package
    return package


def gradients(steps: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        [torch.randn(m, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, n, generator=gen, dtype=torch.float64)
         + 0.1 * torch.randn(m, n, generator=gen, dtype=torch.float64) for m, n in SHAPES]
        for _ in range(steps)
    ]  # fmt: skip


def weights() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]


def quiet() -> contextlib.redirect_stdout[io.StringIO]:
    """Their optimizers print at every step."""
    return contextlib.redirect_stdout(io.StringIO())


def run(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], stream: list[list[torch.Tensor]]) -> None:
    for grads in stream:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        with quiet():
            optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the authors' GradNormLoRP/ folder")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    load_authors(args.folder)
    wadamw = importlib.import_module("authors_gradnorm.wadamw")
    lowrank = importlib.import_module("authors_gradnorm.LowRankWeightNormAdamW")
    import galore_torch

    stream = gradients(args.steps)
    galore = {"rank": RANK, "update_proj_gap": GAP, "scale": SCALE, "proj_type": "std"}

    # 1. WeightNormGaLoreAdamW: the weight given to it
    params = weights()
    start = [p.detach().clone() for p in params]
    run(wadamw.WeightNormGaLoreAdamW(params, lr=LR, **galore), params, stream)
    moved = max(float((p.detach() - s).abs().max()) for p, s in zip(params, start, strict=True))
    print(f"WeightNormGaLoreAdamW: largest change of the weight after {args.steps} steps: {moved:.3g}")

    # 2. LowRankWeightNormAdamW beside galore-torch's GaLoreAdamW on the same gradients
    theirs, plain = weights(), weights()
    authors = lowrank.LowRankWeightNormAdamW([{"params": theirs, **galore}], lr=LR, no_deprecation_warning=True)
    reference = galore_torch.GaLoreAdamW([{"params": plain, **galore}], lr=LR, no_deprecation_warning=True)
    first = stream[0]
    for t, grads in enumerate(stream):
        for p, q, g in zip(theirs, plain, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        with quiet():
            authors.step()
            reference.step()
        v_gap = max(float((authors.state[p]["v"] - q.detach()).abs().max()) for p, q in zip(theirs, plain, strict=True))
        # the weight's row norms are this step's g; the next step sets g = ||v|| again, dropping the difference
        dropped = max(float((p.detach().norm(dim=1) - authors.state[p]["v"].norm(dim=1)).abs().max()) for p in theirs)
        if t in (0, args.steps - 1):
            print(f"LowRankWeightNormAdamW step {t + 1}: |v - galore_torch.GaLoreAdamW's weight| max {v_gap:.3g}; "
                  f"the magnitude's step moves the row norms by up to {dropped:.3g}, undone next step")  # fmt: skip

    # 3. the magnitude gradient at the first step, and ours beside theirs after every step
    w = weights()[0].detach()
    unit = w / w.norm(dim=1, keepdim=True)
    theirs_grad_g = (first[0] * unit).sum(1)  # LowRankWeightNormAdamW: sum(grad * v / ||v||) with v = W0
    ours = weights()
    opt = gradproj.GradNormLoRP([{"params": ours, **galore}], lr=LR)
    from gradproj.optim.weight_norm import init_state, split

    state: dict[str, torch.Tensor] = {}
    init_state(state, w, "w0")
    _, grad_v, grad_g = split(w, first[0], state)
    print(f"first step: magnitude gradient, ours - theirs, max {float((grad_g - theirs_grad_g).abs().max()):.3g}; "
          f"direction gradient, ours - theirs (G), max {float((grad_v - first[0]).abs().max()):.3g} "
          "(ours removes the radial part)")  # fmt: skip
    run(opt, ours, stream)
    for i, (a, b, c) in enumerate(zip(ours, theirs, plain, strict=True)):
        a, b, c = a.detach(), b.detach(), c.detach()
        moved_ours = float((a - weights()[i].detach()).abs().max())
        print(f"matrix {i} {tuple(a.shape)} after {args.steps} steps: ours moved {moved_ours:.3g}; "
              f"ours - LowRankWeightNormAdamW max {float((a - b).abs().max()):.3g}; "
              f"ours - galore-torch max {float((a - c).abs().max()):.3g}")  # fmt: skip


if __name__ == "__main__":
    main()
