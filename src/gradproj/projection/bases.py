"""Pure functions that compute a basis from a gradient: exact SVD, randomized SVD, DCT
column selection, and seeded random orthonormal bases.

Every function returns ``(left, right)`` in the orientation of :mod:`gradproj.projection.sides`,
computed in at least float32 (bf16/fp16 gradients are promoted) and returned in that working
dtype; the caller casts to the parameter's dtype.

Example:
    >>> import torch
    >>> g = torch.randn(32, 16)
    >>> left, right = svd_basis(g, 4, "left")
    >>> torch.allclose(left.t() @ left, torch.eye(4), atol=1e-5), right is None
    (True, True)
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import torch
from torch import Tensor

Bases = tuple[Tensor | None, Tensor | None]
_MASK63 = (1 << 63) - 1


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def derive_seed(*parts: int) -> int:
    """Mix integers into a 63-bit seed (splitmix64), stable across processes and platforms."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (part & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        h = (h + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & _MASK63


def _split(u: Tensor, vh: Tensor, rank: int, side: str) -> Bases:
    left = u[:, :rank].contiguous() if side in ("left", "full") else None
    right = vh[:rank, :].contiguous() if side in ("right", "full") else None
    return left, right


def _svd_via_gram(work: Tensor) -> tuple[Tensor, Tensor]:
    """Fallback SVD from the eigendecomposition of the smaller Gram matrix, in float64."""
    a = work.double()
    tall = a.shape[0] >= a.shape[1]
    gram = a.t() @ a if tall else a @ a.t()
    evals, evecs = torch.linalg.eigh(gram)
    order = torch.argsort(evals, descending=True)
    s = evals[order].clamp_min(0).sqrt()
    vecs = evecs[:, order]
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    if tall:  # vecs are right singular vectors
        return (a @ vecs) * inv, vecs.t()
    return vecs, (vecs.t() @ a) * inv.unsqueeze(1)


def svd_basis(matrix: Tensor, rank: int, side: str) -> Bases:
    """Top-``rank`` singular vectors by an exact thin SVD.

    If LAPACK fails to converge (or returns non-finite values) a :class:`RuntimeWarning`
    is issued and the basis is taken from the eigenvectors of the Gram matrix in float64.
    """
    work = matrix.to(working_dtype(matrix.dtype))
    try:
        u, _, vh = torch.linalg.svd(work, full_matrices=False)
        if not (torch.isfinite(u).all() and torch.isfinite(vh).all()):
            raise torch.linalg.LinAlgError("SVD returned non-finite values")
    except (torch.linalg.LinAlgError, RuntimeError) as err:
        warnings.warn(
            f"SVD of a {tuple(matrix.shape)} gradient failed ({err}); "
            "using the Gram-matrix eigendecomposition in float64 instead",
            RuntimeWarning,
            stacklevel=2,
        )
        u, vh = _svd_via_gram(work)
        u, vh = u.to(work.dtype), vh.to(work.dtype)
    return _split(u, vh, rank, side)


def _gaussian(shape: tuple[int, int], seed: int, dtype: torch.dtype) -> Tensor:
    # Generated on the CPU so that every device and every rank draws the same numbers.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype)


def rsvd_basis(matrix: Tensor, rank: int, side: str, *, seed: int, oversample: int = 10, power_iters: int = 2) -> Bases:
    """Randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1), seeded.

    A Gaussian test matrix of ``rank + oversample`` columns samples the range of ``G``;
    ``power_iters`` rounds of re-orthonormalized subspace iteration sharpen it; the SVD
    of the small ``l x n`` matrix ``Q^T G`` gives the basis.
    """
    work = matrix.to(working_dtype(matrix.dtype))
    m, n = work.shape
    width = min(rank + oversample, m, n)
    omega = _gaussian((n, width), seed, work.dtype).to(work.device)
    q = torch.linalg.qr(work @ omega).Q  # (m, l)
    for _ in range(power_iters):
        z = torch.linalg.qr(work.t() @ q).Q  # (n, l)
        q = torch.linalg.qr(work @ z).Q  # (m, l)
    u_small, vh = _svd_of_wide(q.t() @ work)  # (l, l), (l, n)
    return _split(q @ u_small, vh, rank, side)


def _svd_of_wide(b: Tensor) -> tuple[Tensor, Tensor]:
    """Thin SVD factors ``(U, Vh)`` of a short, wide ``l x n`` matrix via ``B^T = Q R``.

    LAPACK's SVD of a 522 x 5504 matrix takes ~5x longer on CPU than a QR of its transpose
    followed by the SVD of the small ``l x l`` factor, which gives the same factors.
    """
    q2, r2 = torch.linalg.qr(b.t())  # (n, l), (l, l)
    u, _, vh_small = torch.linalg.svd(r2.t())  # B = R^T Q^T = U S (Q Vh^T)^T
    return u, vh_small @ q2.t()


@lru_cache(maxsize=32)
def _dct_cpu(n: int, dtype: torch.dtype) -> Tensor:
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    d = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.t().contiguous().to(dtype)  # columns are the orthonormal DCT-II vectors


_DCT_DEVICE_CACHE: dict[tuple[int, torch.dtype, str], Tensor] = {}


def dct_matrix(n: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """The orthonormal DCT-II basis as an ``n x n`` matrix whose columns are the basis vectors.

    One copy per (size, dtype, device) is shared by every layer of that size.
    """
    key = (n, dtype, str(device))
    cached = _DCT_DEVICE_CACHE.get(key)
    if cached is None:
        cached = _dct_cpu(n, dtype).to(device)
        _DCT_DEVICE_CACHE[key] = cached
    return cached


def dct_indices(matrix: Tensor, rank: int, side: str) -> tuple[Tensor | None, Tensor | None]:
    """Indices of the ``rank`` DCT vectors best aligned with the gradient, per projected side.

    Alignment of basis vector ``c_k`` is ``||c_k^T G||`` (left) or ``||G c_k||`` (right);
    indices are returned sorted by decreasing alignment.
    """
    work = matrix.to(working_dtype(matrix.dtype))
    m, n = work.shape
    left = right = None
    if side in ("left", "full"):
        scores = (dct_matrix(m, work.dtype, work.device).t() @ work).norm(dim=1)
        left = torch.topk(scores, rank).indices
    if side in ("right", "full"):
        scores = (work @ dct_matrix(n, work.dtype, work.device)).norm(dim=0)
        right = torch.topk(scores, rank).indices
    return left, right


def dct_bases(
    index_left: Tensor | None,
    index_right: Tensor | None,
    shape: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> Bases:
    """Materialize the selected DCT columns as ``(left, right)``."""
    m, n = shape
    left = dct_matrix(m, dtype, device)[:, index_left] if index_left is not None else None
    right = dct_matrix(n, dtype, device)[:, index_right].t() if index_right is not None else None
    return left, right


def random_orthonormal(
    dim: int, rank: int, seed: int, dtype: torch.dtype, device: torch.device | str | None = None
) -> Tensor:
    """``dim x rank`` orthonormal columns from a seeded Gaussian (QR with a sign convention).

    The Gaussian is always drawn on the CPU (every device and rank draws the same numbers); the QR
    runs on ``device``, so a GPU refresh costs a transfer and a GPU QR, not a CPU factorization.
    """
    work = working_dtype(dtype)
    q, r = torch.linalg.qr(_gaussian((dim, rank), seed, work).to(device))
    diagonal = torch.diagonal(r)
    return q * torch.sign(diagonal).where(diagonal != 0, torch.ones((), dtype=work, device=q.device))


def random_bases(
    seed: int, shape: tuple[int, int], rank: int, side: str, dtype: torch.dtype, device: torch.device | None = None
) -> Bases:
    """Seeded random orthonormal bases; left and right use independent seeds."""
    m, n = shape
    left = random_orthonormal(m, rank, derive_seed(seed, 1), dtype, device) if side in ("left", "full") else None
    right = random_orthonormal(n, rank, derive_seed(seed, 2), dtype, device).t() if side in ("right", "full") else None
    return left, right


def covariance(matrix: Tensor, side: str) -> Tensor:
    """``G G^T`` (left: ``m x m``) or ``G^T G`` (right: ``n x n``), in the working dtype."""
    work = matrix.to(working_dtype(matrix.dtype))
    return work @ work.t() if side == "left" else work.t() @ work


def top_eigenvectors(cov: Tensor, rank: int, previous: Tensor | None = None) -> Tensor:
    """The ``rank`` leading eigenvectors of a symmetric ``d x d`` matrix, columns by decreasing eigenvalue.

    Without ``previous`` this is the exact eigendecomposition; with it (``d x rank``, the last basis),
    one step of subspace iteration warm-started there, then the Rayleigh-Ritz rotation (Alice's refresh:
    ``Q = qr(C U)``, ``eigh(Q^T C Q)``), which costs ``O(d^2 r)`` instead of ``O(d^3)``.
    """
    if previous is None:
        values, vectors = torch.linalg.eigh(cov)
        return vectors[:, torch.argsort(values, descending=True)[:rank]]
    q = torch.linalg.qr(cov @ previous.to(cov.dtype)).Q  # d x r
    values, vectors = torch.linalg.eigh(q.t() @ cov @ q)  # r x r
    return q @ vectors[:, torch.argsort(values, descending=True)]


def _draw(count: int, size: int, seed: int) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(size, generator=gen)[:count]


def switch_basis(top: Tensor, leading: int, seed: int) -> Tensor:
    """Alice's switching: keep the ``leading`` first columns of ``top`` (``d x r``, ordered) and fill the
    other ``r - leading`` with columns drawn at random (seeded) from a basis of the orthogonal
    complement of ``span(top)``; if that complement is too small, the discarded columns of ``top`` join
    the pool. The result is orthonormal.
    """
    r = top.shape[1]
    if leading >= r:
        return top
    pool = torch.linalg.qr(top, mode="complete").Q[:, r:]  # d x (d - r)
    if pool.shape[1] < r - leading:
        pool = torch.cat([pool, top[:, leading:]], dim=1)
    pick = _draw(r - leading, pool.shape[1], seed).to(top.device)
    return torch.cat([top[:, :leading], pool[:, pick]], dim=1)


def switch_indices(indices: Tensor, dim: int, leading: int, seed: int) -> Tensor:
    """:func:`switch_basis` for bases that are columns of a fixed matrix (DCT): keep the ``leading``
    first ``indices`` and draw the rest from the indices not selected (or the discarded ones, if too few)."""
    r = indices.numel()
    if leading >= r:
        return indices
    chosen = torch.zeros(dim, dtype=torch.bool)
    chosen[indices.cpu()] = True
    pool = torch.nonzero(~chosen).flatten()
    if pool.numel() < r - leading:
        pool = torch.cat([pool, indices[leading:].cpu()])
    pick = pool[_draw(r - leading, pool.numel(), seed)]
    return torch.cat([indices[:leading], pick.to(indices.device)])
