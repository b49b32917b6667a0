"""Newton-Schulz orthogonalization: the approximate polar factor ``U V^T`` of a matrix ``X = U S V^T``,
Muon's (Jordan et al. 2024) five quintic iterations, shared by the muon rule and COSMOS's Muon step.

The arithmetic is ``torch.optim.Muon``'s, operation for operation, so that the muon rule equals it bit for
bit where they run in the same dtype: the input is cast to the iteration's dtype (torch: bfloat16), turned
wide (``a <= b``, so that the Gram matrix is the small one), divided by its Frobenius norm (so the singular
values are at most 1), then ``steps`` times ``Y = a Y + (b A + c A A) Y`` with ``A = Y Y^T``, both products
as ``torch.addmm``. The coefficients push every singular value into about ``[0.7, 1.2]``, not to 1 exactly:
the iteration trades exactness for steepness at 0 (Muon's choice).

Example:
    >>> import torch
    >>> y = newton_schulz(torch.randn(8, 3, dtype=torch.float64))
    >>> tuple(y.shape), bool(((torch.linalg.svdvals(y) > 0.6) & (torch.linalg.svdvals(y) < 1.2)).all())
    ((8, 3), True)
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Muon's quintic coefficients ``(a, b, c)`` (torch.optim.Muon's defaults, Keller Jordan's post)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7  #: the norm's floor (torch.optim.Muon's ``eps``)


def newton_schulz(
    x: Tensor,
    steps: int = NS_STEPS,
    *,
    dtype: torch.dtype | None = None,
    eps: float = NS_EPS,
    add_eps: bool = False,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
) -> Tensor:
    """The approximate polar factor of the matrix ``x`` (``a x b``), in ``dtype`` (None: ``x``'s).

    The norm is floored at ``eps`` (torch.optim.Muon's ``clamp``), or ``eps`` is added to it (``add_eps``:
    COSMOS's authors' normalization). ``x`` itself is never written.
    """
    a, b, c = coefficients
    y = x.to(dtype) if dtype is not None else x
    tall = x.shape[0] > x.shape[1]
    if tall:
        y = y.T  # b x a: the Gram matrix below is the smaller one
    norm = y.norm()
    y = y / (norm + eps if add_eps else norm.clamp(min=eps))  # singular values <= 1; a fresh tensor
    for _ in range(steps):
        gram = y @ y.T  # a x a
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A A
        y = torch.addmm(y, poly, y, beta=a)  # a Y + (b A + c A A) Y
    return y.T if tall else y
