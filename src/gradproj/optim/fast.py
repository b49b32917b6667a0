"""The batched fast path (``foreach``): the common step of many parameters at once, torch.optim style.

The per-parameter step (:func:`gradproj.optim.step.projected_step`, :func:`~gradproj.optim.step.full_step`)
stays the ground truth; this module takes the steps where nothing but arithmetic happens and does them
for a whole group at a time:

* **projected matrices** between refreshes (Adam on ``R``, every residual policy): ``R = down(G)``, Adam's
  moments and direction, then the update folded into the weight (:mod:`gradproj.optim.fused_update`:
  GaLore's decay, lift and update as **one** ``addmm_``; Fira's and APOLLO's scaled terms as one
  ``addcmul_``). On a CPU each matrix goes through all of it before the next (its ``R``, moments and
  ``u`` stay in cache, and each temporary is freed before the next is allocated); on other devices,
  where a step is bound by kernel launches, Adam's elementwise steps run as ``torch._foreach_*`` lists
  over the group. ``compile=True`` generates one kernel per matrix for them instead
  (:func:`adam_direction`, through ``torch.compile``);
* **full-rank groups** whose maths is AdamW: torch's own fused AdamW kernel (``torch.optim.adamw.adamw``
  with ``fused=True`` on CPU and CUDA, ``foreach=True`` elsewhere), one pass over each tensor.

What it equals: ``R``, the moments and ``u`` are the for-loop's bit for bit (the same kernels, one by
one or in lists; compiled, to a few float32 ulps); the fused update rounds differently (a product
rounded once inside ``addmm_``, a limiter norm from channel norms): about 1e-7 relative in float32,
1e-16 in float64. The full-rank groups are ``torch.optim.AdamW(fused=True)`` bit for bit (tested), which
differs from torch's for-loop AdamW by a few float32 ulps.

A refresh step, a step a step feature keeps for itself (:meth:`~gradproj.optim.component.Component.skips_fast`),
a step the dynamics probe samples, a parameter's first step and everything the fast path cannot do
(:func:`blocker`: a rule without a batched kernel, a feature that declares a ``fast_blocker``) go through
the per-parameter step, so every feature keeps its one owner.

Example:
    >>> import torch, gradproj
    >>> w = torch.nn.Parameter(torch.randn(8, 6))
    >>> opt = gradproj.GaLoreAdamW([{"params": [w], "rank": 2}], lr=1e-2, foreach=True)
    >>> blocker(w, opt.param_groups[0], opt.rule_of(opt.param_groups[0])) is None
    True
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw

from ..projection.projectors import get_projector
from ..projection.sides import project_down
from ..rules.adam import galore_ratio, galore_step_size, update_moments
from ..rules.base import UpdateRule, learning_rate
from .features import fast_blocker, features_of, refresh_due
from .placement import is_sharded, local
from .precision import LOW_PRECISION
from .residuals import step_weight
from .step import init_full_state

if TYPE_CHECKING:
    from .engine import ProjectedOptimizer

#: the engine's ``foreach``: None picks the fast path where it applies, True demands it, False never
FOREACH = (None, True, False)
#: devices with torch's fused AdamW kernel (elsewhere its foreach kernels)
_FUSED_DEVICES = ("cpu", "cuda")
#: devices where a projected matrix goes from its projection to its update before the next one starts
#: (caches and the allocator favour it); elsewhere the elementwise steps run as lists (launches dominate)
ONE_BY_ONE_DEVICES = ("cpu",)


def fused_adamw_supported(tensors: list[Tensor]) -> bool:
    """Whether torch's fused AdamW kernel steps these tensors (one parameter's weight, gradient and moments)
    right: floating, on CPU or CUDA, and contiguous. On a strided view (a transposed or sliced weight, or
    its gradient) the CPU kernel of torch 2.13 computes a wrong step and writes outside the view; torch's
    foreach kernels, which take the others, handle strides."""
    return all(t.device.type in _FUSED_DEVICES and t.is_floating_point() and t.is_contiguous() for t in tensors)


def blocker(p: Tensor, group: dict[str, Any], rule: UpdateRule) -> str | None:
    """Why ``p`` in ``group`` can never take the fast path, or None if it can (between refreshes)."""
    if is_sharded(p):
        return "it is FSDP2-sharded (the fast path steps whole local tensors)"
    if p.dtype in LOW_PRECISION:
        return f"it is {p.dtype}, which steps on a float32 working copy one parameter at a time"
    if not rule.fast_kernel:
        return f"its rule {rule.name!r} has no batched step (adam has)"
    if "rank" not in group:
        return None
    feature = fast_blocker(group)
    if feature is not None:
        return feature
    if get_projector(group["projector"]).observes(group):
        return f"projector={group['projector']!r} with tracking observes every step's R"
    return None


class FastPath:
    """The engine's batched steps; keeps torch's per-parameter step-count tensors for the fused kernel
    (plain ints stay the state's truth: a tensor is rebuilt whenever its int moved without it)."""

    def __init__(self, compile: bool = False) -> None:
        self._counts: dict[Tensor, tuple[int, Tensor]] = {}
        #: Adam's elementwise step of one matrix: eager, or generated by torch.compile
        self._direction = compiled_adam_direction() if compile else adam_direction
        self.compiled = compile

    def takes(self, engine: ProjectedOptimizer, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p`` (fast-path capable) steps here this step: a full-rank one always; a projected one
        when it is not due a refresh and the dynamics probe does not sample it."""
        if "rank" not in group:
            return True
        state = engine.state[p]
        if refresh_due(state, group):  # the first step too: the for-loop initializes a projected state
            return False
        if any(feature.skips_fast(state, group) for feature in features_of(group).fast_skippers):
            return False  # e.g. a refresh schedule's measurement: the per-parameter step owns it
        return engine.probe is None or not engine.probe.wants(state["step"])

    # ------------------------------------------------------------ full rank
    def full(self, engine: ProjectedOptimizer, group: dict[str, Any], params: list[Tensor]) -> None:
        """torch's fused (or foreach) AdamW over ``params``, on the state the for-loop keeps."""
        rule, states = engine.rule_of(group), [engine.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            if "step" not in state:
                init_full_state(rule, state, p, tuple(p.shape))
        counts = [self._count(p, s["moment_step"]) for p, s in zip(params, states, strict=True)]
        tensors = [(p, _gradient(p), s["exp_avg"], s["exp_avg_sq"]) for p, s in zip(params, states, strict=True)]
        fused = [fused_adamw_supported(list(ts)) for ts in tensors]
        for kernel in (True, False):  # the fused kernel where it is right, torch's foreach kernels elsewhere
            chosen = [i for i, f in enumerate(fused) if f is kernel]
            if chosen:
                _adamw([tensors[i] for i in chosen], [counts[i] for i in chosen], group, fused=kernel)
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
        """The projected step between refreshes for ``params``: one matrix at a time on a CPU (or compiled),
        the elementwise steps as lists elsewhere."""
        listed = []
        for p in params:
            if self.compiled or p.device.type in ONE_BY_ONE_DEVICES:
                self._projected_one(engine, group, p)
            else:
                listed.append(p)
        if listed:
            self._projected_listed(engine, group, listed)

    def _projected_one(self, engine: ProjectedOptimizer, group: dict[str, Any], p: Tensor) -> None:
        state, bases, grad = engine.state[p], engine.bases(p), _gradient(p)
        low = project_down(grad, *bases)
        beta1, beta2 = group["betas"]
        u = self._direction(low, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, group["eps"])
        state["moment_step"] += 1
        self._update(engine, group, p, grad, low, u, bases, galore_step_size(state["moment_step"], group))

    def _projected_listed(self, engine: ProjectedOptimizer, group: dict[str, Any], params: list[Tensor]) -> None:
        states = [engine.state[p] for p in params]
        bases = [engine.bases(p) for p in params]
        grads = [_gradient(p) for p in params]
        lows = [project_down(g, *b) for g, b in zip(grads, bases, strict=True)]
        directions, step_sizes = adam_directions(lows, states, group)
        for p, g, low, u, b, step_size in zip(params, grads, lows, directions, bases, step_sizes, strict=True):
            self._update(engine, group, p, g, low, u, b, step_size)

    @staticmethod
    def _update(
        engine: ProjectedOptimizer,
        group: dict[str, Any],
        p: Tensor,
        grad: Tensor,
        low: Tensor,
        u: Tensor,
        bases: tuple[Tensor | None, Tensor | None],
        step_size: float,
    ) -> None:
        side, state = engine.layout(p, group).side, engine.state[p]
        keep = 1 - learning_rate(group) * group["weight_decay"]
        step_weight(local(p), grad, low, u, bases, side, group, state, keep=keep, step_size=step_size)
        state["step"] += 1


def _adamw(
    tensors: list[tuple[Tensor, Tensor, Tensor, Tensor]], counts: list[Tensor], group: dict[str, Any], *, fused: bool
) -> None:
    """torch's functional AdamW over ``(weight, gradient, exp_avg, exp_avg_sq)`` tuples: its fused kernel, or its
    foreach kernels."""
    weights, grads, exp_avgs, exp_avg_sqs = (list(column) for column in zip(*tensors, strict=True))
    beta1, beta2 = group["betas"]
    adamw(
        weights,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        counts,
        foreach=None if fused else True,
        fused=fused or None,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=learning_rate(group),
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=False,
    )


def _gradient(p: Tensor) -> Tensor:
    """``p``'s local gradient (the engine batches parameters that have one)."""
    assert p.grad is not None
    return local(p.grad)


def adam_direction(low: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float, eps: float) -> Tensor:
    """:class:`gradproj.rules.adam.Adam`'s direction for one ``R`` (its counter and step size aside): the
    moments advanced in place and ``u = m / (sqrt(v) + eps)``, the same kernels in the same order."""
    update_moments(exp_avg, exp_avg_sq, low, {"betas": (beta1, beta2)})
    return galore_ratio(exp_avg, exp_avg_sq, eps)


@lru_cache(maxsize=1)
def compiled_adam_direction() -> Callable[..., Tensor]:
    """:func:`adam_direction` through ``torch.compile``: one generated kernel reads ``R`` and both moments
    and writes the moments and ``u`` (shared by every optimizer; one compile per shape and dtype)."""
    return torch.compile(adam_direction, fullgraph=True)  # type: ignore[no-any-return]


def adam_directions(
    lows: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
) -> tuple[list[Tensor], list[float]]:
    """:func:`adam_direction` for many ``R`` at once, as ``torch._foreach_*`` lists (torch's ``lerp_``
    form of the moments), with each one's step size."""
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
