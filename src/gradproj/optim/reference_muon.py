"""Paper-literal twins of the muon and colnorm rules (registered in
:data:`gradproj.optim.reference.REFERENCE_RULES`), on plain tensors, for the float64 twin suites.

Muon as torch.optim.Muon's documentation writes it: ``B = mu B + (1 - mu) G`` (its code's ``lerp``),
``U = (1 - mu) G + mu B`` with Nesterov, ``O = NS5(U)`` (``X / max(||X||, eps)``, then five times
``X = a X + (b A + c A^2) X``, ``A = X X^T``, on the wide orientation), step ``lr * ratio(shape)``. SCALE
as its paper writes it: ``M = beta M + (1 - beta) G`` on the momentum's layers (``G`` elsewhere), each
column over ``norm_dim`` divided by its RMS. The twins keep the first moment as ``m``, the twin
optimizer's key, so that its ``on_refresh`` policies rotate and reset it.

Example:
    >>> import torch
    >>> cfg = {"momentum": 0.0, "norm_dim": 1}
    >>> u, s = colnorm_twin({}, torch.tensor([[3.0, 4.0]], dtype=torch.float64), cfg, 0.1)
    >>> [round(x, 4) for x in u.flatten().tolist()], s     # the row over its RMS, sqrt(12.5)
    ([0.8485, 1.1314], 0.1)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .reference_bases import eight_bit

A, B, C = 3.4445, -4.7750, 2.0315  #: Muon's quintic coefficients
EPS = 1e-7


def ns5(x: Tensor, steps: int) -> Tensor:
    """Newton-Schulz towards the polar factor, on the wide orientation."""
    tall = x.shape[0] > x.shape[1]
    y = x.T if tall else x
    y = y / max(float(torch.linalg.norm(y)), EPS)
    for _ in range(steps):
        gram = y @ y.T
        y = A * y + (B * gram + C * gram @ gram) @ y
    return y.T if tall else y


def muon_twin(state: dict[str, Any], r: Tensor, cfg: dict[str, Any], lr: float | None) -> tuple[Tensor, float]:
    """One Muon step on ``r``; ``state["m"]`` is the momentum buffer."""
    mu = cfg["momentum"]
    m = mu * state.get("m", torch.zeros_like(r)) + (1 - mu) * r
    state["m"] = eight_bit(m, True) if cfg["projected_rule"] == "muon8bit" and m.numel() >= 4096 else m
    u = (1 - mu) * r + mu * state["m"] if cfg["nesterov"] else state["m"]
    rows, cols = r.shape
    ratio = (
        0.2 * math.sqrt(max(rows, cols)) if cfg["adjust_lr_fn"] == "match_rms_adamw" else math.sqrt(max(1, rows / cols))
    )
    assert lr is not None
    return ns5(u, cfg["ns_steps"]), lr * ratio


def colnorm_twin(state: dict[str, Any], r: Tensor, cfg: dict[str, Any], lr: float | None) -> tuple[Tensor, float]:
    """One SCALE step on ``r``: momentum where the layer keeps it, then each column over its RMS."""
    beta = cfg["momentum"]
    if beta > 0:
        state["m"] = beta * state.get("m", torch.zeros_like(r)) + (1 - beta) * r
        r = state["m"]
    rms = (r * r).mean(dim=cfg["norm_dim"], keepdim=True).sqrt()
    assert lr is not None
    return r / rms.clamp_min(1e-8), lr
