"""The twins' own bases, written out from their definitions (never the engine's functions, so that a bug
in :mod:`gradproj.projection.bases` or the projectors cannot hide in the twin suite): the seed stream
(splitmix64), which side ``proj_type`` projects, the orthonormal DCT-II by its formula and its ``rank``
columns best aligned with the gradient, seeded random orthonormal bases (a Gaussian drawn on the CPU, QR,
the signs of ``R``'s diagonal), Alice's switching (the leading directions kept, the rest drawn from a basis
of the complement) and the 8-bit round trip through bitsandbytes' block-wise dynamic quantization itself
(256-element blocks).

The randomized SVD is the one basis the twins share with the engine: LAPACK may return any sign for each
singular vector of the small ``Q^T G``, and the engine's QR-based route (faster) and the textbook SVD pick
different ones; an exact SVD's basis is the twins' own (``torch.linalg.svd``).

Example:
    >>> import torch
    >>> d = dct(8, torch.float64)
    >>> bool(torch.allclose(d.T @ d, torch.eye(8, dtype=torch.float64)))
    True
    >>> mix(0, 1) == mix(0, 1) != mix(1, 0)
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

_UINT64 = (1 << 64) - 1
#: the share of a switching refresh's directions kept as they were (Alice: 40 of 256)
LEADING = 40 / 256
#: bitsandbytes' block of 8-bit moments: one absmax per 256 elements
BLOCK = 256


def mix(*parts: int) -> int:
    """A 63-bit seed from integers: each part xored into a splitmix64 state, which is advanced and finalized."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state ^= part & _UINT64
        state = (state + 0x9E3779B97F4A7C15) & _UINT64
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _UINT64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _UINT64
        state ^= state >> 31
    return state & ((1 << 63) - 1)


def side_of(proj_type: str, shape: tuple[int, ...]) -> str:
    """galore-torch's ``proj_type``: ``std`` projects the smaller dimension (right for tall or square matrices,
    left for wide ones), ``reverse_std`` the larger; ``left``, ``right`` and ``full`` say it themselves."""
    tall = shape[0] >= shape[1]
    if proj_type == "std":
        return "right" if tall else "left"
    if proj_type == "reverse_std":
        return "left" if tall else "right"
    return proj_type


def dct(n: int, dtype: torch.dtype) -> Tensor:
    """The orthonormal DCT-II as columns: ``C[i, k] = sqrt(2 / n) cos(pi (i + 1/2) k / n)``, column 0 times
    ``1 / sqrt(2)``."""
    i = torch.arange(n, dtype=torch.float64)[:, None]
    k = torch.arange(n, dtype=torch.float64)[None, :]
    c = math.sqrt(2.0 / n) * torch.cos(math.pi * (i + 0.5) * k / n)  # n x n
    c[:, 0] /= math.sqrt(2.0)
    return c.to(dtype)


def dct_columns(g: Tensor, rank: int, side: str) -> tuple[Tensor | None, Tensor | None]:
    """The indices of the ``rank`` DCT columns with the largest ``||c_k^T G||`` (left) or ``||G c_k||`` (right),
    largest first."""
    m, n = g.shape
    left = (
        torch.argsort((dct(m, g.dtype).T @ g).norm(dim=1), descending=True)[:rank] if side in ("left", "full") else None
    )
    right = (
        torch.argsort((g @ dct(n, g.dtype)).norm(dim=0), descending=True)[:rank] if side in ("right", "full") else None
    )
    return left, right


def orthonormal(dim: int, rank: int, seed: int, dtype: torch.dtype) -> Tensor:
    """``dim x rank`` orthonormal columns: a standard Gaussian from a CPU generator seeded with ``seed``, its QR's
    ``Q`` with each column's sign that of ``R``'s diagonal entry (positive where it is 0)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    gaussian = torch.randn((dim, rank), generator=generator, dtype=dtype)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    return q * torch.where(signs == 0, torch.ones_like(signs), signs)


def random_pair(seed: int, shape: tuple[int, int], rank: int, side: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """Random orthonormal bases of a matrix of ``shape``: left from ``mix(seed, 1)``, right from ``mix(seed, 2)``."""
    m, n = shape
    left = orthonormal(m, rank, mix(seed, 1), dtype) if side in ("left", "full") else None
    right = orthonormal(n, rank, mix(seed, 2), dtype).T if side in ("right", "full") else None
    return left, right


def leading(cfg: dict[str, Any], rank: int) -> int:
    """How many leading directions a switching refresh keeps: ``leading_basis`` (at most the rank), else 40/256
    of the rank, at least one."""
    given = cfg.get("leading_basis")
    return max(1, round(rank * LEADING)) if given is None else min(int(given), rank)


def _drawn(count: int, size: int, seed: int) -> Tensor:
    """``count`` distinct positions of ``size``: the first of a seeded CPU permutation."""
    return torch.randperm(size, generator=torch.Generator(device="cpu").manual_seed(seed))[:count]


def switched(top: Tensor, keep: int, seed: int) -> Tensor:
    """``top``'s (``d x r``) first ``keep`` columns, then ``r - keep`` drawn from the trailing columns of a
    complete QR of ``top`` (an orthonormal basis of the complement), joined by ``top``'s own discarded columns
    when the complement has too few."""
    r = top.shape[1]
    if keep >= r:
        return top
    complement = torch.linalg.qr(top, mode="complete").Q[:, r:]
    if complement.shape[1] < r - keep:
        complement = torch.cat([complement, top[:, keep:]], dim=1)
    return torch.cat([top[:, :keep], complement[:, _drawn(r - keep, complement.shape[1], seed)]], dim=1)


def switched_columns(chosen: Tensor, dim: int, keep: int, seed: int) -> Tensor:
    """:func:`switched` for DCT columns: ``chosen``'s first ``keep``, then the rest drawn from the columns not
    chosen (in order), joined by the discarded chosen ones when those are too few."""
    r = chosen.numel()
    if keep >= r:
        return chosen
    others = torch.tensor([k for k in range(dim) if k not in set(chosen.tolist())], dtype=torch.long)
    if others.numel() < r - keep:
        others = torch.cat([others, chosen[keep:]])
    return torch.cat([chosen[:keep], others[_drawn(r - keep, others.numel(), seed)]])


def eight_bit(x: Tensor, signed: bool) -> Tensor:
    """What 8-bit state keeps of ``x``: bitsandbytes' block-wise quantization with its dynamic code map, and back."""
    import bitsandbytes.functional as bnb  # the twins' 8-bit cases run only where the extra is installed

    code = bnb.create_dynamic_map(signed=signed)
    codes, state = bnb.quantize_blockwise(x.detach().float().contiguous(), code=code, blocksize=BLOCK)
    return bnb.dequantize_blockwise(codes, absmax=state.absmax, code=code, blocksize=BLOCK).view(x.shape).to(x.dtype)
