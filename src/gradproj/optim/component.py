"""The kinds of step feature a projected optimizer composes, and what each one declares.

Every group runs one component of each kind below, chosen by one group key. The engine, the step and the
fast path ask the components what they need (their hooks and declared capabilities); they never check a
feature's name. The registries are in :mod:`gradproj.optim.features`.

| kind | chosen by | the default (here) | others |
|---|---|---|---|
| gradient policy (rewrites a gradient first) | ``spike_policy`` | none | Stable-SPAM (``spikes.py``) |
| refresh schedule (when a basis is recomputed) | ``update_proj_gap`` | a fixed gap | ``"auto"`` (``adaptive.py``) |
| rank allocator (at which rank) | ``rank`` | the group's rank | ``"auto"`` (``ranks.py``) |
| reparametrisation (wraps the projected step) | ``weight_norm`` | none | GradNormLoRP's (``weight_norm.py``) |

A component declares, as class attributes: the keys it adds with their defaults (``defaults``), why the
batched fast path can never step its groups (``fast_blocker``), why FSDP2 rows cannot run it
(``sharding_blocker``) and whether it needs the group's per-rank state costs (``needs_state_costs``); its options
as a frozen dataclass (``options_type``: the keys' types, defaults, bounds and help); and as methods: its keys'
checks (``check``), what it does not combine with (``conflict``), whether a step needs
the full gradient or the per-parameter path (``needs_full_gradient``, ``skips_fast``), the state it starts
(``init_state``) and its bytes (``state_bytes``), and what it plans before the step (``plan``).

Example:
    >>> from gradproj.optim.features import features_of
    >>> features = features_of({"rank": 4, "update_proj_gap": "auto"})
    >>> features.schedule.name, features.allocator.name, features.policy.transforms
    ('adaptive', 'fixed', False)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from torch import Tensor

from ..options import defaults_of
from ..rules.base import UpdateRule, learning_rate

if TYPE_CHECKING:
    import torch

    from ..rules.base import Rows
    from .step import ProjectedContext


@dataclass
class StepPlan:
    """What the planners decided before one step (passed down to each parameter's step, then dropped):
    refreshes computed elsewhere (another rank's, or at a planned rank) and planned ranks, by parameter."""

    prepared: dict[Tensor, dict[str, Tensor]] = field(default_factory=dict)
    ranks: dict[Tensor, int] = field(default_factory=dict)


class Engine(Protocol):
    """What a component's :meth:`Component.plan` may ask of the optimizer."""

    state: Any

    def context(self, p: Tensor, plan: StepPlan | None = None) -> ProjectedContext: ...
    def state_costs(self, p: Tensor) -> tuple[int, int]: ...
    def refresh_due(self, p: Tensor) -> bool: ...


class Component:
    """Base of every kind; each default does nothing and refuses nothing."""

    #: the registered name
    name: ClassVar[str] = ""
    #: the group key that chooses the component of this kind, and the value that chooses this one (the kind's
    #: default is chosen whenever no other is)
    key: ClassVar[str] = ""
    value: ClassVar[Any] = None
    #: its options: a frozen dataclass whose fields are the group keys it adds (documented, with their defaults and
    #: bounds); a configuration's fields for them are generated from it (:func:`gradproj.options.given_option`)
    options_type: ClassVar[type | None] = None
    #: the group keys it adds, with their defaults (filled into every group its kind applies to): its options'
    defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.options_type is not None:
            cls.defaults = defaults_of(cls.options_type)

    #: why the batched fast path can never step its groups (None: it can, between the component's own steps)
    fast_blocker: ClassVar[str | None] = None
    #: why FSDP2 row-sharded parameters cannot run it yet (None: they can)
    sharding_blocker: ClassVar[str | None] = None
    #: whether it reads each matrix's state bytes at rank 1 and per rank (the engine computes them once)
    needs_state_costs: ClassVar[bool] = False

    def selects(self, group: dict[str, Any]) -> bool:
        """Whether ``group`` chooses this component."""
        return bool(self.key) and group.get(self.key) == self.value

    def check(self, group: dict[str, Any]) -> None:
        """Raise ValueError naming a bad value of this component's keys (every group of its kind has them)."""

    def conflict(self, group: dict[str, Any], rule: UpdateRule | None) -> str | None:
        """Why the chosen component does not work with the group's other options (``rule``: its rule if known)."""
        return None

    def needs_full_gradient(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        """Whether the parameter's next step reads its full gradient, not its projection."""
        return False

    def skips_fast(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        """Whether the parameter's next step goes through the per-parameter step."""
        return False

    def init_state(self, ctx: ProjectedContext, weight: Tensor) -> None:
        """Add this component's entries to a projected parameter's new state."""

    def state_bytes(self, shape: tuple[int, ...], group: dict[str, Any], dtype: torch.dtype) -> int:
        """Bytes of the tensors this component keeps for a parameter of ``shape`` stepping in ``dtype``."""
        return 0

    def plan(self, engine: Engine, groups: Sequence[dict[str, Any]], plan: StepPlan) -> None:
        """Before the step: decide what this component decides for ``groups`` (those that chose it) at once."""


class GradientPolicy(Component):
    """What a gradient goes through before the projector and the rule see it; the default passes it on."""

    name = "none"
    key = "spike_policy"
    value = "none"
    #: whether it rewrites gradients (the engine calls :meth:`transform` and hands it every full gradient)
    transforms: ClassVar[bool] = False

    def transform(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], rows: Rows) -> bool:
        """Rewrite ``grad`` (this process's rows of it) in place; return whether the rule's moments restart."""
        return False

    def needs_full_gradient(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        return self.transforms


class RefreshSchedule(Component):
    """When a basis is recomputed; the default refreshes every ``update_proj_gap`` steps at the matrix's phase
    (``refresh_offset``: the same for every matrix, or ``"staggered"`` over the gap)."""

    name = "fixed"
    key = "update_proj_gap"
    defaults: ClassVar[dict[str, Any]] = {"refresh_offset": 0}

    def due(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        """Whether a matrix past its first refresh refreshes on this step."""
        return bool((state["step"] - state.get("refresh_phase", 0)) % group["update_proj_gap"] == 0)

    def refreshed(self, state: dict[str, Any]) -> None:
        """A new basis was just computed."""

    def observe(self, ctx: ProjectedContext, low: Tensor, grad: Tensor) -> None:
        """See this step's ``R`` (this process's part of it) and its full gradient."""

    def check(self, group: dict[str, Any]) -> None:
        gap, offset = group["update_proj_gap"], group["refresh_offset"]
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
            return  # not a fixed gap: the schedule that owns its value checks it
        valid = isinstance(offset, int) and not isinstance(offset, bool) and 0 <= offset < gap
        if offset != "staggered" and not valid:
            raise ValueError(
                f"refresh_offset={offset!r} is not valid; expected 'staggered' or an int in [0, update_proj_gap={gap})"
            )


#: the trainer's ``--refresh-offset``: every matrix at phase 0 (galore-torch's schedule), or spread out
REFRESH_SCHEDULES = ("aligned", "staggered")


def refresh_phases(offset: int | str, count: int, gap: int) -> list[int]:
    """The refresh phase of each of a group's ``count`` matrices: ``offset`` itself for every one, or,
    for ``"staggered"``, phases spread evenly over the gap in the group's order (the ``j``-th of
    ``count`` refreshes ``floor(j * gap / count)`` steps into each gap), so that a step carries at most
    ``ceil(count / gap)`` refreshes instead of all of them. Every rank builds the same groups, so every
    rank agrees. A schedule without a fixed gap (``gap="auto"``) has offset 0: each matrix keeps its own time.

    >>> refresh_phases("staggered", 4, 200), refresh_phases(3, 2, 200)
    ([0, 50, 100, 150], [3, 3])
    """
    if offset == "staggered":
        return [j * gap // count for j in range(count)]
    return [int(offset)] * count


class RankAllocator(Component):
    """At which rank a matrix projects; the default is the group's ``rank`` (capped by the matrix's shape)."""

    name = "fixed"
    key = "rank"

    def rank(self, state: dict[str, Any], planned: int | None) -> int | None:
        """The rank a matrix holds on this step (``planned``: this step's plan for it); None: the group's."""
        return None

    def refreshing(self, ctx: ProjectedContext) -> bool:
        """A refresh at ``ctx.layout.rank`` begins; returns whether the moments must be resized to it."""
        return False

    def resize(self, ctx: ProjectedContext) -> None:
        """Fit the moments to the rank :meth:`refreshing` changed (``on_refresh`` other than rotate)."""


#: the projected step under a reparametrisation: ``(ctx, weight, grad, low) -> (update, step_size)``
LowRankUpdate = Callable[["ProjectedContext", Tensor, "Tensor | None", "Tensor | None"], tuple[Tensor, float]]


class Reparametrisation(Component):
    """How the projected step moves a weight; the default moves the weight itself, with decoupled decay."""

    name = "none"
    key = "weight_norm"
    value = False
    defaults: ClassVar[dict[str, Any]] = {"weight_norm": False}

    def step(
        self, ctx: ProjectedContext, weight: Tensor, grad: Tensor | None, low: Tensor | None, update: LowRankUpdate
    ) -> None:
        """``W *= 1 - rate * weight_decay``, then ``W -= s * update`` (``update``: the projected step's)."""
        direction, step_size = update(ctx, weight, grad, low)
        decay(weight, ctx.group, decay_rate(ctx.rule, ctx.group, step_size))
        weight.add_(direction, alpha=-step_size)


def decay(weight: Tensor, group: dict[str, Any], rate: float) -> None:
    """Decoupled weight decay ``W *= 1 - rate * weight_decay`` (``rate``: :func:`decay_rate`)."""
    if group["weight_decay"] != 0:
        weight.mul_(1 - rate * group["weight_decay"])


def decay_rate(rule: UpdateRule, group: dict[str, Any], step_size: float) -> float:
    """The rate decoupled decay runs at: the group's ``lr``, or for a rule whose step size is relative
    (Adafactor's ``relative_step``) the step size it computed, as ``transformers.Adafactor`` decays."""
    return step_size if rule.relative_step(group) else learning_rate(group)
