"""Paper-literal reference twins, written for clarity and run in float64 by the tests.

Each twin follows the published algorithm line by line on plain tensors, with explicit
dictionaries for state and no in-place tricks: GaLore (Zhao et al. 2024, Alg. 2), Fira
(Chen et al. 2024, Alg. 1), APOLLO (Zhu et al. 2024, Alg. 1), Adafactor (Shazeer & Stern 2018,
Alg. 4 with update clipping), Adam with 8-bit states (a quantize/dequantize round trip after
every moment update), Alice's tracking, switching and compensation and RACS (Gong et al. 2025,
Alg. 1-3), COSMOS (Liu et al. 2025, Alg. 1: :mod:`gradproj.optim.reference_cosmos`), GradNormLoRP
(Huang et al. 2025: GaLore on the direction of ``w = g v / ||v||``, both kept as parameters), and the three
``on_refresh`` policies. The bases are the twins' own (:mod:`gradproj.optim.reference_bases`: the SVD by
``torch.linalg.svd``, the DCT by its formula, random bases and switching's draws from the seed, 8-bit states
through bitsandbytes itself), all but the randomized SVD, whose singular vectors' signs LAPACK leaves open.

Example:
    >>> import torch
    >>> w = [torch.randn(6, 4, dtype=torch.float64)]
    >>> twin = ReferenceOptimizer(w, rule="adam", residual="none", lr=0.1, rank=2, update_proj_gap=3)
    >>> twin.step([torch.randn(6, 4, dtype=torch.float64)])
    >>> w[0].shape
    torch.Size([6, 4])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..projection.bases import rsvd_basis
from .reference_bases import (
    dct,
    dct_columns,
    eight_bit,
    leading,
    mix,
    random_pair,
    side_of,
    switched,
    switched_columns,
)
from .reference_cosmos import cosmos_direction
from .reference_muon import colnorm_twin, muon_twin
from .reference_ranks import auto_basis, greedy
from .reference_spikes import stable_spam
from .reference_weight_norm import normalized_step

#: a rule's literal twin: ``(state, R, cfg, lr) -> (u, step_size)``, keeping its moments under ``"m"`` (first)
#: and ``"v"`` (second), the keys the twin rotates, resets and reports; a rule added outside gradproj adds its own
ReferenceRule = Callable[[dict[str, Any], Tensor, dict[str, Any], "float | None"], tuple[Tensor, float]]
REFERENCE_RULES: dict[str, ReferenceRule] = {"muon": muon_twin, "muon8bit": muon_twin, "colnorm": colnorm_twin}


def _basis(g: Tensor, rank: int, side: str, projector: str, seed: int, t: int, cfg: dict[str, Any]):  # type: ignore[no-untyped-def]
    if projector == "svd":  # the thin SVD itself, not the engine's svd_basis
        u, _, vh = torch.linalg.svd(g.to(torch.float64 if g.dtype == torch.float64 else torch.float32), False)
        return (u[:, :rank] if side in ("left", "full") else None), (vh[:rank] if side in ("right", "full") else None)
    if projector == "rsvd":
        return rsvd_basis(  # the engine's (see reference_bases: LAPACK's signs)
            g, rank, side, seed=mix(seed, t), oversample=cfg["oversample"], power_iters=cfg["power_iters"]
        )
    if projector == "random":
        return random_pair(mix(seed, t), tuple(g.shape), rank, side, g.dtype)  # type: ignore[arg-type]
    il, ir = dct_columns(g, rank, side)
    if cfg.get("switching"):
        switch = mix(mix(seed, t), 3)
        il = None if il is None else switched_columns(il, g.shape[0], leading(cfg, rank), switch)
        ir = None if ir is None else switched_columns(ir, g.shape[1], leading(cfg, rank), mix(switch, 2))
    left = dct(g.shape[0], g.dtype)[:, il] if il is not None else None
    right = dct(g.shape[1], g.dtype)[:, ir].T if ir is not None else None
    return left, right


def _eigenbasis(g: Tensor, rank: int, side: str, s: dict[str, Any], beta: float) -> Tensor:
    """Alice's refresh: the leading eigenvectors of the tracked covariance (``d x rank``)."""
    cov = g @ g.T if side == "left" else g.T @ g
    old = s.get("basis")
    prev = None if old is None else (old[0] if side == "left" else old[1].T)
    if prev is None:
        vals, vecs = torch.linalg.eigh(cov)
        return vecs[:, torch.argsort(vals, descending=True)[:rank]]
    if beta > 0:
        cov = beta * prev @ s["Q"] @ prev.T + (1 - beta) * cov
    q = torch.linalg.qr(cov @ prev).Q  # one step of subspace iteration from the last basis
    vals, vecs = torch.linalg.eigh(q.T @ cov @ q)
    return q @ vecs[:, torch.argsort(vals, descending=True)]


def _switched(basis: tuple, rank: int, seed: int, t: int, cfg: dict[str, Any]) -> tuple:  # type: ignore[type-arg]
    """Keep the leading directions, draw the rest from the complement (the engine's seeded draw)."""
    switch, keep = mix(mix(seed, t), 3), leading(cfg, rank)
    left, right = basis
    return (
        None if left is None else switched(left, keep, switch),
        None if right is None else switched(right.T, keep, mix(switch, 2)).T,
    )


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
            "oversample": 10, "power_iters": 2, "seeds": [0] * len(params), "refresh_phases": [0] * len(params),
            "min_gap": 10, "max_gap": 200, "energy_threshold": 0.9, "check_every": 10,
            "state_budget": None, "max_rank": 256, "energy_target": 0.9,
            "switching": False, "leading_basis": None, "track_beta": 0.0, "compensation_scale": 0.4,
            "compensation_beta": 0.9, "bias_correction": True, "projected_rule": None,
            "af_eps": (1e-30, 1e-3), "clip_threshold": 1.0, "decay_rate": -0.8, "beta1": None,
            "scale_parameter": True, "relative_step": True, "warmup_init": False, "spike_policy": "none",
            "spam_gamma1": 0.7, "spam_gamma2": 0.9, "spam_theta": 0.999, "spam_reset_gap": 1000,
            "muon_scale": 0.2, "nesterov": False, "weight_norm": False, "momentum": 0.95, "ns_steps": 5,
            "adjust_lr_fn": "match_rms_adamw", "ns_dtype": None, "norm_dim": 1, **cfg,
        }  # fmt: skip
        self.state: list[dict[str, Any]] = [{"t": 0, "k": 0} for _ in params]

    # ---------------------------------------------------------------- rules
    def _quantized(self, x: Tensor) -> bool:
        return self.rule == "adam8bit" and x.numel() >= 4096

    def _stored(self, x: Tensor, signed: bool) -> Tensor:
        """What 8-bit state keeps of ``x``: a quantize/dequantize round trip."""
        if not self._quantized(x):
            return x
        return eight_bit(x, signed)

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
        if not self.cfg["bias_correction"]:  # Alice: m / sqrt(v), no correction
            return m / (v.sqrt() + eps), self.lr  # type: ignore[return-value]
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
        lr = 1e-2 if self.lr is None else self.lr  # relative: transformers' step scaled by lr / 1e-2
        rho = lr / 1e-2 * min(1e-6 * k if c["warmup_init"] else 1e-2, 1 / math.sqrt(k)) if c["relative_step"] else lr
        if c["scale_parameter"]:
            rho = rho * max(c["af_eps"][1], float(w.pow(2).mean().sqrt()))  # type: ignore[operator]
        return u, rho  # type: ignore[return-value]

    def _racs(self, s: dict[str, Any], g: Tensor) -> tuple[Tensor, float]:
        beta, eps = self.cfg["betas"][0], self.cfg["eps"]
        q_new = (g * g).mean(1)  # the fixed point from s = 1: rows, then columns
        s_new = (g * g).T @ q_new / (q_new @ q_new)
        s["q"] = beta * s.get("q", torch.zeros_like(q_new)) + (1 - beta) * q_new
        s["s"] = beta * s.get("s", torch.ones_like(s_new)) + (1 - beta) * s_new  # s starts at 1
        scaled = g / torch.sqrt((s["q"] + eps)[:, None] * (s["s"] + eps)[None, :])
        return self._limit(s, scaled, "prev_u"), self.lr  # type: ignore[return-value]

    def _direction(self, s: dict[str, Any], r: Tensor, w: Tensor, full_rank: bool) -> tuple[Tensor, float]:
        s["k"] += 1
        rule = self.rule if full_rank else (self.cfg["projected_rule"] or self.rule)
        if rule in REFERENCE_RULES:
            return REFERENCE_RULES[rule](s, r, self.cfg, self.lr)
        if rule == "racs":
            return self._racs(s, r)
        if rule == "cosmos":
            return cosmos_direction(s, r, self.cfg), self.lr  # type: ignore[return-value]
        return self._adafactor(s, r, w) if rule == "adafactor" else self._adam(s, r, full_rank)

    # ------------------------------------------------------------ refresh
    def _on_refresh(self, s: dict[str, Any], old: tuple, new: tuple) -> None:  # type: ignore[type-arg]
        policy = self.cfg["on_refresh"]
        if policy == "reset":
            self._reset(s)
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
            if "q" in s:  # RACS: rotate the rank-one second moment, then fit it again
                v = _mm(sq(cl), torch.outer(s["q"], s["s"]), sq(cr))
                s["q"] = v.mean(1)
                s["s"] = v.T @ s["q"] / (s["q"] @ s["q"])
            if "Q" in s:  # Alice's tracked covariance, in the new basis' coordinates
                c = cl if cl is not None else cr.T  # type: ignore[union-attr]
                s["Q"] = c @ s["Q"] @ c.T

    def _reset(self, s: dict[str, Any]) -> None:
        """Zero the rule's moments and restart its bias correction."""
        for key in ("m", "v", "row", "col", "vf", "q", "s", "prev_u", "M", "V"):
            s.pop(key, None)
        s["k"] = 0

    def _police(self, g: Tensor, s: dict[str, Any]) -> Tensor:
        """Stable-SPAM's policy (:mod:`gradproj.optim.reference_spikes`) on ``g``; a due reset zeroes the moments."""
        c = self.cfg
        g, reset = stable_spam(g, s, gamma1=c["spam_gamma1"], gamma2=c["spam_gamma2"], theta=c["spam_theta"],
                               gap=c["spam_reset_gap"], eps=c["eps"])  # fmt: skip
        if reset:
            self._reset(s)
        return g

    # ------------------------------------------------------------ inspect
    def moments(self, i: int) -> dict[str, Tensor]:
        """Dense ``first`` / ``second`` moments of parameter ``i`` (the names rules use)."""
        s, out = self.state[i], {}
        if "M" in s:  # COSMOS: the full first moment and the subspace's second
            return {"first": s["M"], "second": s["V"]}
        if "m" in s:
            out["first"] = s["m"]
        if "v" in s:
            out["second"] = s["v"]
        elif "row" in s:
            out["second"] = torch.outer(s["row"], s["col"]) / s["row"].mean()
        elif "q" in s:
            out["second"] = torch.outer(s["q"], s["s"])
        elif "vf" in s:
            out["second"] = s["vf"]
        return out

    def bases(self, i: int) -> tuple[Tensor | None, Tensor | None]:
        """``(left, right)`` of parameter ``i`` (``(None, None)`` for full-rank twins)."""
        return self.state[i].get("basis", (None, None))  # type: ignore[no-any-return]

    # ---------------------------------------------------------------- step
    def step(self, grads: list[Tensor]) -> None:
        """Apply one step; ``grads[i]`` is the gradient of ``params[i]``; params change in place."""
        phases = self.cfg["refresh_phases"]
        if self.cfg["spike_policy"] == "stable_spam":
            grads = [self._police(g, s) for g, s in zip(grads, self.state, strict=True)]
        if self.cfg.get("rank") == "auto":
            self._allocate(grads)
        for w, g, s, seed, phase in zip(self.params, grads, self.state, self.cfg["seeds"], phases, strict=True):
            if "rank" not in self.cfg:
                u, alpha = self._direction(s, g, w, full_rank=True)
                delta = u
            elif self.cfg["weight_norm"]:  # GradNormLoRP: the projected step moves the direction
                assert self.lr is not None, "weight_norm=True runs Adam rules, which have a learning rate"
                projected = functools.partial(self._projected, s=s, seed=seed, phase=phase)
                w.copy_(normalized_step(w, g, s, self.cfg, self.lr, projected))
                s["t"] += 1
                continue
            else:
                delta, alpha = self._projected(w, g, s, seed, phase)
            rule = self.rule if "rank" not in self.cfg else (self.cfg["projected_rule"] or self.rule)
            relative = rule == "adafactor" and self.cfg["relative_step"]  # transformers decays at its step size
            lr_decay = alpha if relative else self.lr
            w.copy_(w * (1 - lr_decay * self.cfg["weight_decay"]) - alpha * delta)
            s["t"] += 1

    # ------------------------------------------------------ rank="auto"
    def _allocate(self, grads: list[Tensor]) -> None:
        """rank="auto": on a step where some matrices refresh, each takes the basis at its cap and the
        shares of its directions; every unit of rank beyond 1 is sorted by share per byte and taken in
        that order while it fits, up to each matrix's demand (first over every matrix, with the others' last
        spectra; then over the refreshing ones, within what the others hold now, up to those targets)."""
        c, n = self.cfg, len(self.params)
        due = [s["t"] == 0 or self._refresh_due(s, ph) for s, ph in zip(self.state, c["refresh_phases"], strict=True)]
        if not any(due):
            return
        per, base = [], []
        for i, g in enumerate(grads):
            side = side_of(c["proj_type"], tuple(g.shape))
            (m, k), cap = g.shape, min(c["max_rank"], *g.shape)
            basis_dim, other_dim = (m, k) if side == "left" else (k, m)
            item = g.element_size()
            per.append(item * (basis_dim + 2 * other_dim))  # a basis vector and a row of each moment
            fira = item if self.residual == "fira" else 0  # the growth limiter's scalar
            base.append(item * (cap + (2 if c["update_proj_gap"] == "auto" else 0)) + fira)  # spectrum, signal
            if due[i]:
                basis = _basis(g, cap, side, c["projector"], c["seeds"][i], self.state[i]["t"], c)
                r = _mm(None if basis[0] is None else basis[0].T, g, None if basis[1] is None else basis[1].T)
                kept = (r * r).sum(1) if side == "left" else (r * r).sum(0)
                self.state[i]["cap_basis"], self.state[i]["spectrum"] = basis, kept / (g * g).sum()
        spectra = [state["spectrum"].tolist() for state in self.state]
        targets = greedy(spectra, per, base, c["state_budget"], c["energy_target"], [len(x) for x in spectra])
        others = sum(base[i] + per[i] * self.state[i]["rank"] for i in range(n) if not due[i])
        mine = [i for i in range(n) if due[i]]
        ranks = greedy([spectra[i] for i in mine], [per[i] for i in mine], [base[i] for i in mine],
                        c["state_budget"] - others, c["energy_target"], [targets[i] for i in mine])  # fmt: skip
        for i, rank in zip(mine, ranks, strict=True):
            self.state[i]["new_rank"] = rank

    def _projected(self, w: Tensor, g: Tensor, s: dict[str, Any], seed: int, phase: int) -> tuple[Tensor, float]:
        c = self.cfg
        side = side_of(c["proj_type"], tuple(g.shape))
        rank = min(c["rank"], *g.shape) if c["rank"] != "auto" else s.get("rank", 0)
        if c["projector"] == "identity":  # RACS: R is G
            rank, side, s["basis"] = min(g.shape), "none", (None, None)
        elif s["t"] == 0 or self._refresh_due(s, phase):
            s["last"] = s["t"]
            new: tuple[Tensor | None, ...]
            if c["rank"] == "auto":
                rank, new = auto_basis(s, side, self.cfg["on_refresh"])
            elif c["projector"] == "eigh":
                top = _eigenbasis(g, rank, side, s, c["track_beta"])
                new = (top, None) if side == "left" else (None, top.T)
            else:
                new = _basis(g, rank, side, c["projector"], seed, s["t"], c)
            if c["switching"] and c["projector"] != "dct":  # dct switches its indices in _basis
                new = _switched(new, rank, seed, s["t"], c)
            new = tuple(None if b is None else b.to(g.dtype) for b in new)
            if "basis" in s:
                self._on_refresh(s, s["basis"], new)
            s["basis"] = new
        left, right = s["basis"]
        r = _mm(None if left is None else left.T, g, None if right is None else right.T)
        if c["update_proj_gap"] == "auto":
            self._signal(s, float((r * r).sum() / (g * g).sum()))
        if c["projector"] == "eigh" and c["track_beta"] > 0:  # Alice's tracking
            outer = r @ r.T if side == "left" else r.T @ r
            s["Q"] = c["track_beta"] * s.get("Q", torch.zeros_like(outer)) + (1 - c["track_beta"]) * outer
        u, alpha = self._direction(s, r, w, full_rank=False)
        if self.residual == "apollo":
            compressed = {"left": g.shape[0] / rank, "right": g.shape[1] / rank, "full": g.numel() / rank**2,
                          "none": 1.0}[side]  # fmt: skip
            phi = self._ratio(u, r, side) / math.sqrt(compressed)
            return math.sqrt(c["scale"]) * self._limit(s, phi * g), alpha
        delta = c["scale"] * _mm(left, u, right)
        if self.residual == "alice":  # Alice's compensation (Alg. 3)
            axis = 0 if side == "left" else 1
            energy = (g * g).sum(axis) - (r * r).sum(axis)
            s["p"] = torch.clamp(c["compensation_beta"] * s.get("p", torch.zeros_like(energy))
                                 + (1 - c["compensation_beta"]) * energy, min=1e-8)  # fmt: skip
            d = g.shape[0] if side == "left" else g.shape[1]
            root = s["p"].sqrt()[None, :] if side == "left" else s["p"].sqrt()[:, None]
            comp = math.sqrt(d - rank) * (g - _mm(left, r, right)) / root
            return delta + c["scale"] * c["compensation_scale"] * self._limit(s, comp), alpha
        if self.residual == "fira":
            delta = delta + self._limit(s, self._ratio(u, r, side) * (g - _mm(left, r, right)))
        return delta, alpha

    def _refresh_due(self, s: dict[str, Any], phase: int) -> bool:
        """A fixed gap: every ``update_proj_gap`` steps from the phase. ``"auto"``: ``max_gap`` steps after
        the last refresh, or from ``min_gap`` on once the last check fell below the threshold."""
        c = self.cfg
        if c["update_proj_gap"] != "auto":
            return bool((s["t"] - phase) % c["update_proj_gap"] == 0)
        since = s["t"] - s["last"]
        return since >= c["max_gap"] or (since >= c["min_gap"] and s["stale"])

    def _signal(self, s: dict[str, Any], energy: float) -> None:
        """The share ``||R||^2 / ||G||^2``: the reference on the step after a refresh; on a check step
        (``t + 1`` a multiple of ``check_every``, ``min_gap`` reached on the next step) compared with the
        threshold."""
        c, t = self.cfg, s["t"]
        if t == s["last"]:
            s["stale"] = False
        elif t == s["last"] + 1:
            s["reference"] = energy
        elif (t + 1) % c["check_every"] == 0 and t + 1 - s["last"] >= c["min_gap"]:
            s["stale"] = energy / s["reference"] < c["energy_threshold"]

    def _ratio(self, u: Tensor, r: Tensor, side: str) -> Tensor:
        if self.cfg["scale_type"] == "tensor" or side in ("full", "none"):
            return u.norm() / (r.norm() + 1e-8)
        if side == "left":
            return u.norm(dim=0) / (r.norm(dim=0) + 1e-8)
        return (u.norm(dim=1) / (r.norm(dim=1) + 1e-8))[:, None]

    def _limit(self, s: dict[str, Any], x: Tensor, key: str = "prev") -> Tensor:
        gamma, n = self.cfg["growth_limit"], x.norm()
        if key in s and n / (s[key] + 1e-8) > gamma:
            x = x * gamma * (s[key] + 1e-8) / n
        s[key] = x.norm()
        return x
