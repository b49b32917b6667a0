"""The paper-literal twin of Stable-SPAM's gradient policy (Huang et al. 2025, Alg. 1), on plain tensors
with an explicit state dictionary, for :class:`gradproj.optim.reference.ReferenceOptimizer` and the tests.

Example:
    >>> import torch
    >>> s = {}
    >>> g, reset = stable_spam(torch.tensor([3.0, 4.0]), s, gamma1=0.7, gamma2=0.9, theta=0.999, gap=0, eps=0.0)
    >>> [round(x, 4) for x in g.tolist()], reset
    ([0.6, 0.8], False)
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor


def stable_spam(
    g: Tensor, s: dict[str, Any], *, gamma1: float, gamma2: float, theta: float, gap: int, eps: float
) -> tuple[Tensor, bool]:
    """One gradient through AdaClip and AdaGN; returns it and whether Adam's moments reset on this step."""
    t = s["spam_t"] = s.get("spam_t", 0) + 1
    g_max = float(g.abs().max())
    s["m_max"] = theta * s.get("m_max", 0.0) + (1 - theta) * g_max
    m_max_hat = s["m_max"] / (1 - theta**t)
    mask = g.abs() > m_max_hat
    g = g.clone()
    g[mask] = g[mask] / g_max * m_max_hat  # the spikes onto the threshold, their signs kept
    g_norm = float(g.norm())
    if g_norm > 0:
        s["m_norm"] = gamma1 * s.get("m_norm", 0.0) + (1 - gamma1) * g_norm
        s["v_norm"] = gamma2 * s.get("v_norm", 0.0) + (1 - gamma2) * g_norm**2
        m_hat, v_hat = s["m_norm"] / (1 - gamma1**t), s["v_norm"] / (1 - gamma2**t)
        g = g / g_norm * (m_hat / (math.sqrt(v_hat) + eps))
    return g, gap > 0 and t % gap == 0
