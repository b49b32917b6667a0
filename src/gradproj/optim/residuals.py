"""Residual policies as components: what happens to the part of the gradient the basis does not capture,
each a registered class with its capabilities (the maths is :mod:`gradproj.optim.residual`'s).

| policy | reads ``G`` every step | growth limiter | rank may change (``rank="auto"``) | fused fast form |
|---|---|---|---|---|
| ``none`` (GaLore) | no | no | yes | one ``addmm_`` |
| ``fira`` | yes | yes | yes | one-sided bases |
| ``apollo`` | yes | yes | no | one-sided bases |
| ``alice`` (compensation) | yes | yes | no | no |

A group names its policy with ``residual``; the step calls :func:`combine`, the fast path :func:`step_weight`,
and the engine, the planner and the checks ask the policy (``reads_gradient``, :meth:`Residual.state_bytes`,
:meth:`Residual.conflict`). A new policy is its class here and one entry in :data:`RESIDUALS`.

Example:
    >>> import torch
    >>> w, g = torch.zeros(4, 3), torch.ones(4, 3)
    >>> p = torch.eye(4, 2)  # a left basis: R = P^T G is 2 x 3
    >>> group = {"residual": "none", "scale": 1.0, "weight_decay": 0.0}
    >>> step_weight(w, g, p.T @ g, torch.ones(2, 3), (p, None), "left", group, {}, keep=1.0, step_size=0.5)
    >>> w[:, 0].tolist(), RESIDUALS["fira"].reads_gradient
    ([-0.5, -0.5, 0.0, 0.0], True)
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from ..projection.bases import Bases
from ..rules.base import ALL_ROWS, Rows
from ..rules.limiter import limit_growth
from .fused_update import decay_only, lift_into, limited
from .residual import Inputs, alice_update, discarded, galore_update, scaling_factor

#: the sides whose channels (columns of a left basis' ``R``, rows of a right one's) the fused forms scale
_ONE_SIDED = ("left", "right")


def _channel_phi(x: Inputs) -> Tensor | None:
    """Fira's or APOLLO's ``phi`` on one process's whole matrix, for a fused form; None for a basis without a
    side whose channels it scales (two-sided, the identity), which the fused forms leave to ``combine``."""
    return scaling_factor(x.shape, x.low, x.u, x.side, x.group) if x.side in _ONE_SIDED else None


class Residual:
    """``none``: GaLore's ``scale * up(u)``; the base of every policy (each default: no state, no refusal)."""

    name: ClassVar[str] = "none"
    #: whether the update reads the full gradient ``G`` (GaLore's needs ``R`` alone)
    reads_gradient: ClassVar[bool] = False
    #: whether it keeps the growth limiter's norm (one number in the step's dtype)
    limited: ClassVar[bool] = False
    #: whether its state is independent of the rank, so that a rank allocator may change the rank
    resizable: ClassVar[bool] = True

    def combine(self, x: Inputs) -> tuple[Tensor, Tensor | None]:
        """The full-space update (before ``-step_size``) and the scaling factor ``phi`` probes report (or None)."""
        return galore_update(x.low, x.u, x.bases, x.group), None

    def fused_step(self, weight: Tensor, x: Inputs, keep: float, step_size: float) -> bool:
        """``weight <- keep * weight - step_size * combine(x)`` in fewer passes, if this policy has a fused form for
        ``x.side``; returns whether it stepped (``x.u`` is scaled in place)."""
        lift_into(weight, x.u.mul_(x.group["scale"]), x.bases, keep, -step_size)
        return True

    def state_bytes(self, shape: tuple[int, int], side: str, limiter: int) -> int:
        """Bytes of its state for a matrix of ``shape`` projected on ``side`` (``limiter``: one number's bytes)."""
        return limiter if self.limited else 0

    def replicated_state(self, side: str) -> tuple[str, ...]:
        """Its state keys every process keeps whole under a row split (FSDP2)."""
        return ()

    def conflict(self, group: dict[str, Any]) -> str | None:
        """Why the group's other options do not fit this policy, or None."""
        return None


class Fira(Residual):
    """Fira: ``scale * up(u) + limit(phi * (G - up(R)))``."""

    name = "fira"
    reads_gradient = limited = True

    def combine(self, x: Inputs) -> tuple[Tensor, Tensor | None]:
        phi = scaling_factor(x.shape, x.low, x.u, x.side, x.group, x.rows.norm)
        residual = discarded(x.full, x.low, *x.bases).mul_(phi.to(x.full.dtype))
        limited_residual = limit_growth(residual, x.state, x.group["growth_limit"], x.rows.norm)
        return galore_update(x.low, x.u, x.bases, x.group).add_(limited_residual), phi

    def fused_step(self, weight: Tensor, x: Inputs, keep: float, step_size: float) -> bool:
        phi = _channel_phi(x)  # of u before its scale
        if phi is None:
            return False
        residual = discarded(x.full, x.low, *x.bases)  # G - up(R), m x n
        w = limited(residual, phi, x.side, x.state, x.group)
        lift_into(weight, x.u.mul_(x.group["scale"]), x.bases, keep, -step_size)
        weight.addcmul_(residual, w.to(weight.dtype), value=-step_size)  # m x n, w per channel
        return True


class Apollo(Residual):
    """APOLLO: ``sqrt(scale) * limit(phi * G)``."""

    name = "apollo"
    reads_gradient = limited = True
    resizable = False

    def combine(self, x: Inputs) -> tuple[Tensor, Tensor | None]:
        phi = scaling_factor(x.shape, x.low, x.u, x.side, x.group, x.rows.norm)
        update = limit_growth(x.full * phi.to(x.full.dtype), x.state, x.group["growth_limit"], x.rows.norm)
        return update.mul_(x.group["scale"] ** 0.5), phi  # a fresh tensor

    def fused_step(self, weight: Tensor, x: Inputs, keep: float, step_size: float) -> bool:
        phi = _channel_phi(x)
        if phi is None:
            return False
        w = limited(x.full, phi, x.side, x.state, x.group) * x.group["scale"] ** 0.5
        decay_only(weight, keep)
        weight.addcmul_(x.full, w.to(weight.dtype), value=-step_size)  # m x n, w per channel
        return True


class AliceCompensation(Residual):
    """Alice's compensation: ``scale * (up(u) + compensation_scale * limit(C))``, ``C`` the whitened residual."""

    name = "alice"
    reads_gradient = limited = True
    resizable = False

    def combine(self, x: Inputs) -> tuple[Tensor, Tensor | None]:
        return alice_update(x)

    def fused_step(self, weight: Tensor, x: Inputs, keep: float, step_size: float) -> bool:
        return False

    def state_bytes(self, shape: tuple[int, int], side: str, limiter: int) -> int:
        channels = shape[1] if side == "left" else shape[0]  # one discarded energy per uncompressed channel
        return limiter * (1 + channels)

    def replicated_state(self, side: str) -> tuple[str, ...]:
        return ("compensation_sq",) if side == "left" else ()  # a right basis' channels are the (split) rows

    def conflict(self, group: dict[str, Any]) -> str | None:
        if group["proj_type"] == "full":
            return "residual='alice' needs a one-sided basis; proj_type='full' projects both sides (use std/left/right)"
        if group["projector"] == "identity":
            return "residual='alice' compensates what a basis discards; projector='identity' discards nothing"
        return None


#: every residual policy by name (a group's ``residual``)
RESIDUALS: dict[str, Residual] = {r.name: r for r in (Residual(), Fira(), Apollo(), AliceCompensation())}


def combine(
    grad: Tensor | None,
    low: Tensor,
    u: Tensor,
    bases: Bases,
    side: str,
    group: dict[str, Any],
    state: dict[str, Any],
    *,
    shape: tuple[int, ...] | None = None,
    rows: Rows = ALL_ROWS,
) -> tuple[Tensor, Tensor | None]:
    """The group's policy's full-space update for one projected parameter (before ``-step_size``), and its
    scaling factor ``phi`` (None for GaLore). ``grad`` may be None when the policy does not read it; ``shape``
    is the whole matrix's (default ``grad``'s) and ``rows`` the placement's sums, for a process that holds only
    rows of ``grad`` (FSDP2; see :mod:`gradproj.optim.placement`)."""
    policy = RESIDUALS[group["residual"]]
    if policy.reads_gradient and grad is None:
        raise ValueError(f"residual={policy.name!r} needs the full gradient")
    whole = shape or (tuple(grad.shape) if grad is not None else ())
    return policy.combine(Inputs(grad, low, u, bases, side, group, state, whole, rows))


def step_weight(
    weight: Tensor,
    grad: Tensor,
    low: Tensor,
    u: Tensor,
    bases: Bases,
    side: str,
    group: dict[str, Any],
    state: dict[str, Any],
    *,
    keep: float,
    step_size: float,
) -> None:
    """``weight <- keep * weight - step_size * combine(grad, low, u)``: the policy's fused form where it has one,
    else :func:`combine`, decay and add; ``u`` is the rule's direction before ``scale``."""
    policy, x = RESIDUALS[group["residual"]], Inputs(grad, low, u, bases, side, group, state, tuple(grad.shape))
    if policy.fused_step(weight, x, keep, step_size):
        return
    update, _ = policy.combine(x)
    decay_only(weight, keep)
    weight.add_(update, alpha=-step_size)


def replicated_state(group: dict[str, Any], side: str) -> tuple[str, ...]:
    """The group's policy's state keys that every process keeps whole under a row split (FSDP2)."""
    return RESIDUALS[group["residual"]].replicated_state(side)
