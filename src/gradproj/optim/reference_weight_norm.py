"""The paper-literal twin of GradNormLoRP (Huang et al. 2025): weight normalisation ``w = g v / ||v||``
row by row (Salimans & Kingma 2016) with ``v`` and ``g`` kept as the parameters, GaLore's step on ``v``
and AdamW on ``g``, for :class:`gradproj.optim.reference.ReferenceOptimizer` and the tests. The engine
keeps neither ``v`` nor ``g``'s direction (it rebuilds ``v`` from the weight): this twin keeps both.

Example:
    >>> import torch
    >>> w, s = torch.tensor([[3.0, 4.0]]), {"t": 0}
    >>> cfg = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "scale": 1.0}
    >>> new = normalized_step(w, torch.tensor([[1.0, 0.0]]), s, cfg, 0.1, lambda v, g: (g, 0.0))
    >>> round(float(s["mag"][0]), 4)   # v stays; the magnitude's first Adam step is lr (its gradient is 0.6)
    4.9
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

#: the projected step of the direction: ``(v, dL/dv) -> (delta, alpha)`` with ``v_new = v - alpha delta``
Projected = Callable[[Tensor, Tensor], tuple[Tensor, float]]


def normalized_step(
    w: Tensor, g: Tensor, s: dict[str, Any], cfg: dict[str, Any], lr: float, projected: Projected
) -> Tensor:
    """One step of the weight ``w`` with gradient ``g``; returns the new weight. ``s`` holds ``dir`` (``v``,
    from ``W0``), ``mag`` (``g``, from ``||W0||``) and the magnitude's moments; ``s["t"]`` counts the steps."""
    if "dir" not in s:
        s["dir"], s["mag"] = w.clone(), w.norm(dim=1)
    v, mag = s["dir"], s["mag"]
    norm = v.norm(dim=1)
    grad_mag = (g * v).sum(1) / norm  # Salimans & Kingma (2016), eq. 3
    grad_dir = (mag / norm)[:, None] * g - (mag * grad_mag / norm**2)[:, None] * v
    delta, alpha = projected(v, grad_dir)
    s["dir"] = v - alpha * delta
    b1, b2 = cfg["betas"]
    k = s["t"] + 1
    s["mag_m"] = b1 * s.get("mag_m", 0.0 * mag) + (1 - b1) * grad_mag
    s["mag_v"] = b2 * s.get("mag_v", 0.0 * mag) + (1 - b2) * grad_mag**2
    m_hat, v_hat = s["mag_m"] / (1 - b1**k), s["mag_v"] / (1 - b2**k)
    step = lr * cfg["scale"] * m_hat / (v_hat.sqrt() + cfg["eps"])  # AdamW at lr * scale
    s["mag"] = mag * (1 - lr * cfg["weight_decay"]) - step  # its decay at lr: the decay GaLore gives W
    return s["mag"][:, None] * s["dir"] / s["dir"].norm(dim=1)[:, None]
