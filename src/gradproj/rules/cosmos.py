"""COSMOS (Liu et al. 2025, "COSMOS: A Hybrid Adaptive Optimizer for Memory-Efficient Training of
LLMs", arXiv 2502.17410, Alg. 1): SOAP in the tracked leading eigensubspace, Muon on the rest.

The rule steps the whole matrix ``G`` (``m x n``; the preset pairs it with the identity projector, as
RACS is) and keeps, besides the full first moment ``M``, a one-sided basis ``U`` (``d x r``, ``d`` the
compressed dimension: the smaller one under ``proj_type="std"``), the tracked covariance ``S``
(``r x r``, in ``U``'s coordinates) and Adam's second moment ``V`` of ``R = U^T G``::

    M = beta1 M + (1 - beta1) G
    U = qr(tb U S + (1 - tb) C U),  C = G G^T (left) or G^T G (right); first step: top-r eigenvectors of C
    S = tb K^T S K + (1 - tb) R R^T,  K = U_old^T U,  R = U^T G
    V = beta2 V + (1 - beta2) R^2                                  (not rotated with U: the paper's)
    A = U [(U^T M^ ) / (sqrt(V / (1 - beta2^t)) + eps)],   M^ = M / (1 - beta1^t)
    B = NORM(NS5(M^ - U U^T M^))
    u = NORM(A + muon_scale * B),   NORM(X) = sqrt(m n) X / ||X||_F

with ``tb = track_beta`` (the paper ties it to ``beta2``; the authors' code has a third beta) and
``NS5`` five quintic Newton-Schulz iterations towards the polar factor (Muon's). ``nesterov=True``
follows ``M^ = (beta1 M + (1 - beta1) G) / (1 - beta1^(t+1))`` instead, as the authors' code does. The step size is
``lr``: ``u`` has unit RMS, so ``lr`` is the RMS of every matrix's step. Left bases are written here;
a right basis is the same on ``G^T``.

State: ``exp_avg`` (``m x n``), ``cosmos_basis`` (``d x r``), ``tracked_cov`` (``r x r``),
``exp_avg_sq`` (shaped like ``R``: ``r x n`` or ``m x r``), in the step's dtype; about half of AdamW's
``2 m n`` for ``r << d``.

Example:
    >>> import torch
    >>> rule, state = Cosmos(), {}
    >>> rule.init_state(state, (6, 4), torch.zeros(1))
    >>> group = {"lr": 0.1, "betas": (0.9, 0.95), "eps": 1e-8, "rank": 2, "proj_type": "std",
    ...          "track_beta": 0.95, "muon_scale": 0.2, "nesterov": False}
    >>> u, s = rule.direction(torch.randn(6, 4), state, group, None)
    >>> round(float(u.square().mean().sqrt()), 6), s, tuple(state["cosmos_basis"].shape)   # unit RMS
    (1.0, 0.1, (4, 2))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..projection.bases import top_eigenvectors, working_dtype
from ..projection.sides import resolve_side
from .base import ALL_ROWS, Rows, UpdateRule, learning_rate
from .orthogonal import newton_schulz

TINY = 1e-7  #: added to Frobenius norms before dividing (the authors' ``eps`` of their normalizations)


def unit_rms(x: Tensor) -> Tensor:
    """COSMOS's ``NORM``: ``x`` scaled to root-mean-square 1 (``sqrt(numel) x / ||x||_F``)."""
    return x * (x.numel() ** 0.5 / (x.norm() + TINY))


def cosmos_rank(group: dict[str, Any], shape: tuple[int, int]) -> tuple[int, str]:
    """The subspace's rank (the group's, capped by the shape) and side (``proj_type``, one-sided)."""
    side = resolve_side(group["proj_type"], shape)
    if side not in ("left", "right"):
        raise ValueError(f"COSMOS needs a one-sided basis; proj_type={group['proj_type']!r} gives {side!r}")
    return min(int(group["rank"]), *shape), side


class Cosmos(UpdateRule):
    """COSMOS on a whole matrix; see the module docstring."""

    name = "cosmos"
    shardable = False
    unshardable_because = "its basis' QR and the Newton-Schulz iterations read the whole matrix"
    uses_rank = True

    def conflict(self, group: dict[str, Any]) -> str | None:
        """COSMOS keeps its own one-sided basis of a fixed rank and steps the whole matrix."""
        if group["projector"] != "identity":
            return (
                f"rule='cosmos' tracks its own basis and steps all of G; projector={group['projector']!r} would "
                "project G first (use projector='identity')"
            )
        if group.get("rank") == "auto":
            return "rule='cosmos' keeps a basis of a fixed rank; rank='auto' is not supported (use an integer rank)"
        if group.get("update_proj_gap") == "auto" or group["switching"]:
            what = "update_proj_gap='auto'" if group.get("update_proj_gap") == "auto" else "switching=True"
            return f"rule='cosmos' moves its basis by one QR every step; {what} does not apply (leave it unset)"
        if group["proj_type"] == "full":
            return "rule='cosmos' needs a one-sided basis; proj_type='full' projects both sides (use std/left/right)"
        if group["residual"] != "none":
            return (
                f"rule='cosmos' handles the rest of the momentum itself (Muon); residual={group['residual']!r} "
                "would add a second one (use residual='none')"
            )
        return None

    def init_state(
        self, state: dict[str, Any], shape: tuple[int, ...], like: Tensor, full_shape: tuple[int, ...] | None = None
    ) -> None:
        state["exp_avg"] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        state["moment_step"] = 0  # the basis, its covariance and V come with the first gradient (they need the rank)

    def direction(
        self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], param: Tensor, rows: Rows = ALL_ROWS
    ) -> tuple[Tensor, float]:
        beta1, beta2 = group["betas"]
        rank, side = cosmos_rank(group, (int(grad.shape[0]), int(grad.shape[1])))
        work = working_dtype(grad.dtype)
        g = (grad if side == "left" else grad.t()).to(work)  # d x o: the basis spans g's columns
        state["moment_step"] += 1
        step = state["moment_step"]
        state["exp_avg"].lerp_(grad.to(state["exp_avg"].dtype), 1 - beta1)
        basis = self._track(g, state, rank, float(group["track_beta"]))  # d x r
        low = basis.t() @ g  # r x o
        if "exp_avg_sq" not in state:  # shaped like R: r x n (left) or m x r (right)
            natural = low if side == "left" else low.t()
            state["exp_avg_sq"] = torch.zeros_like(natural, dtype=state["exp_avg"].dtype)
        second = state["exp_avg_sq"] if side == "left" else state["exp_avg_sq"].t()  # a view, r x o
        second.mul_(beta2).addcmul_(low, low, value=1 - beta2)
        m = self._momentum(g, state["exp_avg"], beta1, step, bool(group["nesterov"]), side)  # d x o, debiased
        m_low = basis.t() @ m  # r x o
        denom = (second.to(work) / (1 - beta2**step)).sqrt_().add_(group["eps"])
        subspace = basis @ (m_low / denom)  # A, d x o
        rest = unit_rms(newton_schulz(torch.addmm(m, basis, m_low, alpha=-1), eps=TINY, add_eps=True))  # B, d x o
        u = unit_rms(subspace.add_(rest, alpha=group["muon_scale"]))
        return (u if side == "left" else u.t()).to(grad.dtype), learning_rate(group)

    @staticmethod
    def _momentum(g: Tensor, exp_avg: Tensor, beta1: float, step: int, nesterov: bool, side: str) -> Tensor:
        """The bias-corrected momentum the step follows (``d x o``, like ``g``): the paper's
        ``M / (1 - beta1^t)``, or Nesterov's ``(beta1 M + (1 - beta1) G) / (1 - beta1^(t+1))``, which is the
        authors' code's ``(G + beta1 sum) / (1 + beta1 (1 - beta1^t) / (1 - beta1))`` over their undamped sum."""
        m = exp_avg.to(g.dtype)
        m = m if side == "left" else m.t()  # d x o
        if nesterov:
            return torch.lerp(m, g, 1 - beta1).div_(1 - beta1 ** (step + 1))
        return m / (1 - beta1**step)

    def _track(self, g: Tensor, state: dict[str, Any], rank: int, beta: float) -> Tensor:
        """One step of COSMOS's subspace tracking; stores and returns the new basis (``d x r``)."""
        old = state.get("cosmos_basis")
        dtype = state["exp_avg"].dtype
        if old is None:  # the first gradient: its exact leading eigenvectors
            basis = top_eigenvectors(g @ g.t(), rank)  # d x r
            low = basis.t() @ g  # r x o
            state["tracked_cov"] = ((1 - beta) * (low @ low.t())).to(dtype)
        else:
            previous, tracked = old.to(g.dtype), state["tracked_cov"].to(g.dtype)
            basis = torch.linalg.qr(beta * previous @ tracked + (1 - beta) * g @ (g.t() @ previous)).Q  # d x r
            change = previous.t() @ basis  # r x r: K, old coordinates -> new
            low = basis.t() @ g  # r x o
            state["tracked_cov"] = (beta * change.t() @ tracked @ change + (1 - beta) * low @ low.t()).to(dtype)
        state["cosmos_basis"] = basis.to(dtype)
        return basis

    def moments(self, state: dict[str, Any]) -> dict[str, Tensor]:
        out = {"first": state["exp_avg"]}
        return {**out, "second": state["exp_avg_sq"]} if "exp_avg_sq" in state else out

    def set_moments(self, state: dict[str, Any], moments: dict[str, Tensor]) -> None:
        state["exp_avg"] = moments["first"]
        if "second" in moments:
            state["exp_avg_sq"] = moments["second"]

    def reset(self, state: dict[str, Any]) -> None:
        """Zero ``M`` and ``V`` and restart bias correction; the tracked basis stays (it is the projector's part)."""
        state["exp_avg"].zero_()
        if "exp_avg_sq" in state:
            state["exp_avg_sq"].zero_()
        state["moment_step"] = 0

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any] | None = None) -> int:
        if group is None:
            raise ValueError("the cosmos rule's state depends on the group's rank and proj_type; pass the group")
        m, n = int(shape[0]), int(shape[1])
        rank, side = cosmos_rank(group, (m, n))
        d, o = (m, n) if side == "left" else (n, m)
        return (m * n + d * rank + rank * rank + rank * o) * dtype.itemsize
