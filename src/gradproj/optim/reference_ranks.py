"""The float64 twin of ``rank="auto"`` (:mod:`gradproj.optim.ranks`), literally: every unit of rank sorted by
its share per byte and taken while it fits (not the engine's heap), and a refresh's rank and basis.

Example:
    >>> greedy([[0.5, 0.3, 0.1], [0.9, 0.05, 0.01]], per=[10, 10], base=[0, 0], budget=40, target=0.99, caps=[3, 3])
    [3, 1]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def greedy(
    spectra: list[list[float]], per: list[int], base: list[int], budget: int, target: float, caps: list[int]
) -> list[int]:
    """Rank 1 each, then every further unit ``(i, k)`` by ``spectra[i][k] / per[i]`` (ties: the earlier
    matrix), taken if matrix ``i`` holds rank ``k`` and it fits, up to ``min(caps[i], demand)``."""
    ranks, left = [1] * len(spectra), budget - sum(b + p for b, p in zip(base, per, strict=True))
    units = []
    for i, shares in enumerate(spectra):
        total, want = 0.0, len(shares)
        for k, share in enumerate(shares):
            total += share
            if total >= target * (1 - 1e-12):
                want = k + 1
                break
        units += [(-shares[k] / per[i], i, k) for k in range(1, min(want, caps[i]))]
    for _, i, k in sorted(units):
        if ranks[i] == k and per[i] <= left:
            ranks[i], left = k + 1, left - per[i]
    return ranks


def auto_basis(s: dict[str, Any], side: str, on_refresh: str) -> tuple[int, tuple[Tensor | None, Tensor | None]]:
    """This refresh's rank and basis (the first ``rank`` directions of the one at the cap); the moments
    of ``keep`` truncated or zero-padded to it."""
    rank, (left, right) = s.pop("new_rank"), s.pop("cap_basis")
    if on_refresh == "keep" and "rank" in s:
        for key in ("m", "v"):
            old = s[key]
            new = torch.zeros((rank, old.shape[1]) if side == "left" else (old.shape[0], rank), dtype=old.dtype)
            keep = min(rank, s["rank"])
            if side == "left":
                new[:keep] = old[:keep]
            else:
                new[:, :keep] = old[:, :keep]
            s[key] = new
    s["rank"] = rank
    return rank, (None if left is None else left[:, :rank], None if right is None else right[:rank])
