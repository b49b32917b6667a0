"""COSMOS's float64 twin (Liu et al. 2025, Alg. 1), line by line on fresh tensors, for the tests.

Written from the paper with the conventions :mod:`gradproj.rules.cosmos` documents (``eps`` outside the
bias-corrected root, as the authors' code has it; ``NORM`` to unit RMS); the basis is written for both
sides explicitly rather than by transposing, and the Newton-Schulz iterations keep the paper's
``X <- a X + b (X X^T) X + c (X X^T)^2 X`` form.

Example:
    >>> import torch
    >>> s, cfg = {"k": 1}, {"betas": (0.9, 0.95), "eps": 1e-8, "rank": 2, "proj_type": "std",
    ...                      "track_beta": 0.95, "muon_scale": 0.2, "nesterov": False}
    >>> u = cosmos_direction(s, torch.randn(5, 3, dtype=torch.float64), cfg)
    >>> round(float((u * u).mean()), 6), tuple(s["U"].shape)    # unit RMS; a tall matrix's basis is right
    (1.0, (3, 2))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .reference_bases import side_of


def ns5(x: Tensor) -> Tensor:
    """Five quintic Newton-Schulz iterations from ``x / ||x||`` (on the wide orientation)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = x.shape[0] > x.shape[1]
    y = x.T if tall else x
    y = y / (y.norm() + 1e-7)
    for _ in range(5):
        gram = y @ y.T
        y = a * y + b * gram @ y + c * gram @ gram @ y
    return y.T if tall else y


def _norm(x: Tensor) -> Tensor:
    return x * x.numel() ** 0.5 / (x.norm() + 1e-7)


def cosmos_direction(s: dict[str, Any], g: Tensor, cfg: dict[str, Any]) -> Tensor:
    """``NORM(A + gamma B)`` for gradient ``g`` (``m x n``); ``s["k"]`` is this step's count (from 1)."""
    b1, b2 = cfg["betas"]
    tb, t = cfg["track_beta"], s["k"]
    left = side_of(cfg["proj_type"], tuple(g.shape)) == "left"
    rank = min(cfg["rank"], *g.shape)
    cov = g @ g.T if left else g.T @ g  # the covariance of the compressed dimension
    s["M"] = b1 * s.get("M", torch.zeros_like(g)) + (1 - b1) * g
    if "U" not in s:
        vals, vecs = torch.linalg.eigh(cov)
        s["U"] = vecs[:, torch.argsort(vals, descending=True)[:rank]]
        s["S"] = (1 - tb) * s["U"].T @ cov @ s["U"]
    else:
        old = s["U"]
        s["U"] = torch.linalg.qr(tb * old @ s["S"] + (1 - tb) * cov @ old).Q
        tracked = tb * old @ s["S"] @ old.T + (1 - tb) * cov  # U_t^T (beta U S U^T + (1 - beta) C) U_t
        s["S"] = s["U"].T @ tracked @ s["U"]
    u = s["U"]
    low = u.T @ g if left else g @ u
    s["V"] = b2 * s.get("V", torch.zeros_like(low)) + (1 - b2) * low * low
    if cfg["nesterov"]:  # the authors' code: (G + b1 sum_k b1^k G_k) / (1 + b1 (1 - b1^t) / (1 - b1)), sum undamped
        total = s["M"] / (1 - b1)  # sum_k b1^k G_(t-k)
        m_hat = (g + b1 * total) / (1 + b1 * (1 - b1**t) / (1 - b1))
    else:
        m_hat = s["M"] / (1 - b1**t)
    m_low = u.T @ m_hat if left else m_hat @ u
    precond = m_low / (torch.sqrt(s["V"] / (1 - b2**t)) + cfg["eps"])
    a = u @ precond if left else precond @ u.T
    rest = m_hat - (u @ m_low if left else m_low @ u.T)
    return _norm(a + cfg["muon_scale"] * _norm(ns5(rest)))
