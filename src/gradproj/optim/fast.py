"""The batched fast path (``foreach``): the common step of many parameters at once, torch.optim style.

The per-parameter step (:func:`gradproj.optim.step.projected_step`, :func:`~gradproj.optim.step.full_step`)
stays the ground truth; this module takes the steps where nothing but arithmetic happens and does them
for a whole group at a time:

* **projected matrices** between refreshes (GaLore's rule: Adam on ``R``, ``residual="none"``):
  ``R = down(G)`` per matrix, Adam's moments and direction as ``torch._foreach_*`` ops over the group's
  list (torch groups it by device and dtype), and the lift, the decoupled decay and the update as
  **one** ``addmm_`` per matrix, ``W <- (1 - lr wd) W - step_size * up(scale * u)``, where the for-loop
  takes a matmul, a temporary and two more passes over ``W``;
* **full-rank groups** whose maths is AdamW: torch's own fused AdamW kernel (``torch.optim.adamw.adamw``
  with ``fused=True`` on CPU and CUDA, ``foreach=True`` elsewhere), one pass over each tensor.

What it equals: ``R``, the moments and ``u`` are the for-loop's bit for bit (the same kernels, in lists);
the fused ``addmm_`` rounds the product once where the loop rounds it, then scales and adds it (about
1e-7 relative in float32, 1e-16 in float64); the full-rank groups are ``torch.optim.AdamW(fused=True)``
bit for bit (tested), which differs from torch's for-loop AdamW by a few float32 ulps.

A refresh step, a step the dynamics probe samples, a parameter's first step and everything the fast
path cannot do (:func:`blocker`) go through the per-parameter step, so every feature keeps its one owner.

Example:
    >>> import torch, gradproj
    >>> w = torch.nn.Parameter(torch.randn(8, 6))
    >>> opt = gradproj.GaLoreAdamW([{"params": [w], "rank": 2}], lr=1e-2, foreach=True)
    >>> blocker(w, opt.param_groups[0], opt.rule_of(opt.param_groups[0])) is None
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw

from ..projection.projectors import get_projector
from ..projection.sides import project_down
from ..rules.adam import galore_step_size
from ..rules.base import UpdateRule
from .placement import is_sharded, local
from .precision import LOW_PRECISION
from .step import init_full_state, refresh_due

if TYPE_CHECKING:
    from .engine import ProjectedOptimizer

#: the engine's ``foreach``: None picks the fast path where it applies, True demands it, False never
FOREACH = (None, True, False)
#: devices with torch's fused AdamW kernel (elsewhere its foreach kernels)
_FUSED_DEVICES = ("cpu", "cuda")


def fused_adamw_supported(params: list[Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these tensors (floating, on CPU or CUDA)."""
    return bool(params) and all(p.device.type in _FUSED_DEVICES and p.is_floating_point() for p in params)


def blocker(p: Tensor, group: dict[str, Any], rule: UpdateRule) -> str | None:
    """Why ``p`` in ``group`` can never take the fast path, or None if it can (between refreshes)."""
    if is_sharded(p):
        return "it is FSDP2-sharded (the fast path steps whole local tensors)"
    if p.dtype in LOW_PRECISION:
        return f"it is {p.dtype}, which steps on a float32 working copy one parameter at a time"
    if rule.name != "adam":
        return f"its rule {rule.name!r} has no batched step (adam has)"
    if "rank" not in group:
        return None
    if group["residual"] != "none":
        return f"residual={group['residual']!r} has no batched step yet (GaLore's 'none' has)"
    if get_projector(group["projector"]).observes(group):
        return f"projector={group['projector']!r} with tracking observes every step's R"
    return None


class FastPath:
    """The engine's batched steps; keeps torch's per-parameter step-count tensors for the fused kernel
    (plain ints stay the state's truth: a tensor is rebuilt whenever its int moved without it)."""

    def __init__(self) -> None:
        self._counts: dict[Tensor, tuple[int, Tensor]] = {}

    def takes(self, engine: ProjectedOptimizer, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p`` (fast-path capable) steps here this step: a full-rank one always; a projected one
        when it is not due a refresh and the dynamics probe does not sample it."""
        if "rank" not in group:
            return True
        state = engine.state[p]
        if refresh_due(state, group):  # the first step too: the for-loop initializes a projected state
            return False
        return engine.probe is None or not engine.probe.wants(state["step"])

    # ------------------------------------------------------------ full rank
    def full(self, engine: ProjectedOptimizer, group: dict[str, Any], params: list[Tensor]) -> None:
        """torch's fused (or foreach) AdamW over ``params``, on the state the for-loop keeps."""
        rule, states = engine.rule_of(group), [engine.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            if not state:
                init_full_state(rule, state, p, tuple(p.shape))
        counts = [self._count(p, s["moment_step"]) for p, s in zip(params, states, strict=True)]
        beta1, beta2 = group["betas"]
        fused = fused_adamw_supported(params)
        adamw(
            params,
            [local(p.grad) for p in params],  # type: ignore[arg-type]
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            counts,
            foreach=None if fused else True,
            fused=fused or None,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
        for p, s, count in zip(params, states, counts, strict=True):
            s["moment_step"] += 1
            s["step"] += 1
            self._counts[p] = (s["moment_step"], count)

    def _count(self, p: Tensor, step: int) -> Tensor:
        kept = self._counts.get(p)
        if kept is not None and kept[0] == step:
            return kept[1]
        return torch.tensor(float(step), dtype=torch.float32, device=p.device)

    # ------------------------------------------------------------ projected
    def projected(self, engine: ProjectedOptimizer, group: dict[str, Any], params: list[Tensor]) -> None:
        """GaLore's step between refreshes for ``params``: the matmuls one matrix at a time (they are
        compute-bound), everything elementwise as one list."""
        states = [engine.state[p] for p in params]
        bases = [engine.bases(p) for p in params]
        lows = [project_down(local(p.grad), *b) for p, b in zip(params, bases, strict=True)]  # type: ignore[arg-type]
        directions, step_sizes = adam_directions(lows, states, group)
        torch._foreach_mul_(directions, group["scale"])  # scaled in the low-rank space, as the loop does
        keep = 1 - group["lr"] * group["weight_decay"]
        for p, u, b, step_size, state in zip(params, directions, bases, step_sizes, states, strict=True):
            lift_into(p, u, b, keep, -step_size)
            state["step"] += 1


def adam_directions(
    lows: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
) -> tuple[list[Tensor], list[float]]:
    """:class:`gradproj.rules.adam.Adam`'s ``direction`` for many ``R`` at once: the moments advanced in
    place (torch's ``lerp_`` form) and ``u = m / (sqrt(v) + eps)``, with each one's step size."""
    beta1, beta2 = group["betas"]
    exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    torch._foreach_lerp_(exp_avgs, lows, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, lows, lows, value=1 - beta2)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denominators, group["eps"])
    directions = list(torch._foreach_div(exp_avgs, denominators))
    for s in states:
        s["moment_step"] += 1
    return directions, [galore_step_size(s["moment_step"], group) for s in states]


def lift_into(weight: Tensor, u: Tensor, bases: tuple[Tensor | None, Tensor | None], keep: float, alpha: float) -> None:
    """``weight <- keep * weight + alpha * up(u)`` in one BLAS call (two for a two-sided basis; none for
    the identity, whose ``u`` is full size)."""
    left, right = bases
    if left is not None and right is not None:
        weight.addmm_(left @ u, right, beta=keep, alpha=alpha)  # (m, r) @ (r, n)
    elif left is not None:
        weight.addmm_(left, u, beta=keep, alpha=alpha)  # (m, r) @ (r, n)
    elif right is not None:
        weight.addmm_(u, right, beta=keep, alpha=alpha)  # (m, r) @ (r, n)
    else:
        weight.mul_(keep).add_(u, alpha=alpha)  # (m, n)
