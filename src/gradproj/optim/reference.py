"""Paper-literal reference twins, written for clarity and run in float64 by the tests.

Each twin follows the published algorithm line by line on plain tensors, with explicit
dictionaries for state and no in-place tricks: GaLore (Zhao et al. 2024, Alg. 2), Fira
(Chen et al. 2024, Alg. 1), APOLLO (Zhu et al. 2024, Alg. 1), Adafactor (Shazeer & Stern 2018,
Alg. 4 with update clipping), Adam with 8-bit states (a quantize/dequantize round trip after
every moment update), and the three ``on_refresh`` policies. The SVD basis is the twin's own
``torch.linalg.svd``; the rsvd, dct and random bases come from the same pure functions as the engine
(:mod:`gradproj.projection.bases`), which have their own identity tests.

Example:
    >>> import torch
    >>> w = [torch.randn(6, 4, dtype=torch.float64)]
    >>> twin = ReferenceOptimizer(w, rule="adam", residual="none", lr=0.1, rank=2, update_proj_gap=3)
    >>> twin.step([torch.randn(6, 4, dtype=torch.float64)])
    >>> w[0].shape
    torch.Size([6, 4])
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..projection.bases import dct_indices, dct_matrix, derive_seed, random_bases, rsvd_basis
from ..projection.sides import resolve_side
from ..rules import quant


def _basis(g: Tensor, rank: int, side: str, projector: str, seed: int, t: int, cfg: dict[str, Any]):  # type: ignore[no-untyped-def]
    if projector == "svd":  # the thin SVD itself, not the engine's svd_basis
        u, _, vh = torch.linalg.svd(g.to(torch.float64 if g.dtype == torch.float64 else torch.float32), False)
        return (u[:, :rank] if side in ("left", "full") else None), (vh[:rank] if side in ("right", "full") else None)
    if projector == "rsvd":
        return rsvd_basis(
            g, rank, side, seed=derive_seed(seed, t), oversample=cfg["oversample"], power_iters=cfg["power_iters"]
        )
    if projector == "random":
        return random_bases(derive_seed(seed, t), tuple(g.shape), rank, side, g.dtype)  # type: ignore[arg-type]
    il, ir = dct_indices(g, rank, side)
    left = dct_matrix(g.shape[0], g.dtype)[:, il] if il is not None else None
    right = dct_matrix(g.shape[1], g.dtype)[:, ir].T if ir is not None else None
    return left, right


def _mm(a: Tensor | None, b: Tensor, c: Tensor | None) -> Tensor:
    out = b if a is None else a @ b
    return out if c is None else out @ c


class ReferenceOptimizer:
    """One optimizer over a list of tensors, every tensor in one group (projected if ``rank``)."""

    def __init__(self, params: list[Tensor], *, rule: str, residual: str, lr: float | None, **cfg: Any) -> None:
        self.params, self.rule, self.residual, self.lr = params, rule, residual, lr
        self.cfg = {
            "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0, "scale": 0.25, "proj_type": "std",
            "projector": "svd", "on_refresh": "keep", "scale_type": "channel", "growth_limit": 1.01,
            "oversample": 10, "power_iters": 2, "seeds": [0] * len(params),
            "af_eps": (1e-30, 1e-3), "clip_threshold": 1.0, "decay_rate": -0.8, "beta1": None,
            "scale_parameter": True, "relative_step": True, "warmup_init": False, **cfg,
        }  # fmt: skip
        self.state: list[dict[str, Any]] = [{"t": 0, "k": 0} for _ in params]

    # ---------------------------------------------------------------- rules
    def _quantized(self, x: Tensor) -> bool:
        return self.rule == "adam8bit" and x.numel() >= 4096

    def _stored(self, x: Tensor, signed: bool) -> Tensor:
        """What 8-bit state keeps of ``x``: a quantize/dequantize round trip."""
        if not self._quantized(x):
            return x
        return quant.dequantize(*quant.quantize(x, signed=signed), signed=signed).to(x.dtype)

    def _adam(self, s: dict[str, Any], r: Tensor, full_rank: bool) -> tuple[Tensor, float]:
        b1, b2 = self.cfg["betas"]
        eps = self.cfg["eps"]
        m = b1 * s.get("m", torch.zeros_like(r)) + (1 - b1) * r
        v = b2 * s.get("v", torch.zeros_like(r)) + (1 - b2) * r * r
        s["m"], s["v"] = self._stored(m, True), self._stored(v, False)
        k = s["k"]
        if full_rank:  # torch.optim.AdamW: eps after bias correction
            m_hat, v_hat = m / (1 - b1**k), v / (1 - b2**k)
            return m_hat / (v_hat.sqrt() + eps), self.lr  # type: ignore[return-value]
        return m / (v.sqrt() + eps), self.lr * math.sqrt(1 - b2**k) / (1 - b1**k)  # type: ignore[operator]

    def _adafactor(self, s: dict[str, Any], r: Tensor, w: Tensor) -> tuple[Tensor, float]:
        c = self.cfg
        k = s["k"]
        beta2 = 1 - k ** c["decay_rate"]
        sq = r * r + c["af_eps"][0]
        if r.dim() >= 2:
            s["row"] = beta2 * s.get("row", torch.zeros(r.shape[0], dtype=r.dtype)) + (1 - beta2) * sq.mean(1)
            s["col"] = beta2 * s.get("col", torch.zeros(r.shape[1], dtype=r.dtype)) + (1 - beta2) * sq.mean(0)
            v = torch.outer(s["row"], s["col"]) / s["row"].mean()
        else:
            s["vf"] = beta2 * s.get("vf", torch.zeros_like(r)) + (1 - beta2) * sq
            v = s["vf"]
        u = r / v.sqrt()
        u = u / max(1.0, float(u.pow(2).mean().sqrt()) / c["clip_threshold"])
        if c["beta1"] is not None:
            s["m"] = c["beta1"] * s.get("m", torch.zeros_like(u)) + (1 - c["beta1"]) * u
            u = s["m"]
        rho = min(1e-6 * k if c["warmup_init"] else 1e-2, 1 / math.sqrt(k)) if c["relative_step"] else self.lr
        if c["scale_parameter"]:
            rho = rho * max(c["af_eps"][1], float(w.pow(2).mean().sqrt()))  # type: ignore[operator]
        return u, rho  # type: ignore[return-value]

    def _direction(self, s: dict[str, Any], r: Tensor, w: Tensor, full_rank: bool) -> tuple[Tensor, float]:
        s["k"] += 1
        return self._adafactor(s, r, w) if self.rule == "adafactor" else self._adam(s, r, full_rank)

    # ------------------------------------------------------------ refresh
    def _on_refresh(self, s: dict[str, Any], old: tuple, new: tuple) -> None:  # type: ignore[type-arg]
        policy = self.cfg["on_refresh"]
        if policy == "reset":
            for key in ("m", "v", "row", "col", "vf"):
                s.pop(key, None)
            s["k"] = 0
        elif policy == "rotate":
            cl = new[0].T @ old[0] if new[0] is not None else None
            cr = old[1] @ new[1].T if new[1] is not None else None
            sq = lambda x: None if x is None else x * x  # noqa: E731
            if "m" in s:
                s["m"] = self._stored(_mm(cl, s["m"], cr), True)
            if "v" in s:
                s["v"] = self._stored(_mm(sq(cl), s["v"], sq(cr)), False)
            if "row" in s:
                v = _mm(sq(cl), torch.outer(s["row"], s["col"]) / s["row"].mean(), sq(cr))
                s["row"], s["col"] = v.mean(1), v.mean(0)

    # ------------------------------------------------------------ inspect
    def moments(self, i: int) -> dict[str, Tensor]:
        """Dense ``first`` / ``second`` moments of parameter ``i`` (the names rules use)."""
        s, out = self.state[i], {}
        if "m" in s:
            out["first"] = s["m"]
        if "v" in s:
            out["second"] = s["v"]
        elif "row" in s:
            out["second"] = torch.outer(s["row"], s["col"]) / s["row"].mean()
        elif "vf" in s:
            out["second"] = s["vf"]
        return out

    def bases(self, i: int) -> tuple[Tensor | None, Tensor | None]:
        """``(left, right)`` of parameter ``i`` (``(None, None)`` for full-rank twins)."""
        return self.state[i].get("basis", (None, None))  # type: ignore[no-any-return]

    # ---------------------------------------------------------------- step
    def step(self, grads: list[Tensor]) -> None:
        """Apply one step; ``grads[i]`` is the gradient of ``params[i]``; params change in place."""
        for w, g, s, seed in zip(self.params, grads, self.state, self.cfg["seeds"], strict=True):
            lr_decay = self.lr
            if "rank" not in self.cfg:
                u, alpha = self._direction(s, g, w, full_rank=True)
                delta = u
            else:
                delta, alpha = self._projected(w, g, s, seed)
            lr_decay = self.lr if self.lr is not None else alpha
            w.copy_(w * (1 - lr_decay * self.cfg["weight_decay"]) - alpha * delta)
            s["t"] += 1

    def _projected(self, w: Tensor, g: Tensor, s: dict[str, Any], seed: int) -> tuple[Tensor, float]:
        c = self.cfg
        rank = min(c["rank"], *g.shape)
        side = resolve_side(c["proj_type"], tuple(g.shape))
        if s["t"] % c["update_proj_gap"] == 0:
            new = _basis(g, rank, side, c["projector"], seed, s["t"], c)
            new = tuple(None if b is None else b.to(g.dtype) for b in new)
            if "basis" in s:
                self._on_refresh(s, s["basis"], new)
            s["basis"] = new
        left, right = s["basis"]
        r = _mm(None if left is None else left.T, g, None if right is None else right.T)
        u, alpha = self._direction(s, r, w, full_rank=False)
        if self.residual == "apollo":
            compressed = {"left": g.shape[0] / rank, "right": g.shape[1] / rank, "full": g.numel() / rank**2}[side]
            phi = self._ratio(u, r, side) / math.sqrt(compressed)
            return math.sqrt(c["scale"]) * self._limit(s, phi * g), alpha
        delta = c["scale"] * _mm(left, u, right)
        if self.residual == "fira":
            delta = delta + self._limit(s, self._ratio(u, r, side) * (g - _mm(left, r, right)))
        return delta, alpha

    def _ratio(self, u: Tensor, r: Tensor, side: str) -> Tensor:
        if self.cfg["scale_type"] == "tensor" or side == "full":
            return u.norm() / (r.norm() + 1e-8)
        if side == "left":
            return u.norm(dim=0) / (r.norm(dim=0) + 1e-8)
        return (u.norm(dim=1) / (r.norm(dim=1) + 1e-8))[:, None]

    def _limit(self, s: dict[str, Any], x: Tensor) -> Tensor:
        gamma, n = self.cfg["growth_limit"], x.norm()
        if "prev" in s and n / (s["prev"] + 1e-8) > gamma:
            x = x * gamma * (s["prev"] + 1e-8) / n
        s["prev"] = x.norm()
        return x
