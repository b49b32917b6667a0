"""The registries of step features, one per kind (:mod:`gradproj.optim.component`), and what a group chose.

Each kind is ``{component.name: component}`` over its components, the default first; a group chooses one
component of each kind by one key (:func:`features_of`). The defaults of every component's keys,
the checks of their values and what they do not combine with are read from here, so that adding a
component is its module and one entry below.

Example:
    >>> sorted(SCHEDULES), sorted(POLICIES)
    (['adaptive', 'fixed'], ['none', 'stable_spam'])
    >>> features_of({"rank": "auto", "weight_norm": False}).allocator.name
    'energy'
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..rules.base import UpdateRule
from .adaptive import AdaptiveGap
from .component import Component, GradientPolicy, RankAllocator, RefreshSchedule, Reparametrisation
from .ranks import EnergyRank
from .spikes import StableSpam
from .weight_norm import WeightNorm

Kind = TypeVar("Kind", bound=Component)


def registry(*components: Kind) -> dict[str, Kind]:
    """``{name: component}``, the kind's default first."""
    return {component.name: component for component in components}


#: gradient policies (``spike_policy``): every group, projected or not
POLICIES: dict[str, GradientPolicy] = registry(GradientPolicy(), StableSpam())
#: refresh schedules (``update_proj_gap``), rank allocators (``rank``), reparametrisations (``weight_norm``)
SCHEDULES: dict[str, RefreshSchedule] = registry(RefreshSchedule(), AdaptiveGap())
ALLOCATORS: dict[str, RankAllocator] = registry(RankAllocator(), EnergyRank())
REPARAMETRISATIONS: dict[str, Reparametrisation] = registry(Reparametrisation(), WeightNorm())
#: the kinds a projected group composes (a gradient policy applies to every group)
PROJECTED_KINDS: tuple[dict[str, Any], ...] = (SCHEDULES, ALLOCATORS, REPARAMETRISATIONS)


def chosen(kind: dict[str, Kind], group: dict[str, Any]) -> Kind:
    """The component of ``kind`` that ``group`` chooses: the first other than the default that it selects."""
    components = iter(kind.values())
    default = next(components)
    return next((c for c in components if c.selects(group)), default)


@dataclass(frozen=True)
class Features:
    """The components one group runs, and those of them that take part in each of the step's questions (the
    ones that override the base's answer), so that the step asks only those."""

    policy: GradientPolicy
    schedule: RefreshSchedule
    allocator: RankAllocator
    reparametrisation: Reparametrisation
    #: the components that may keep a step off the fast path, read the full gradient, or plan the step
    fast_skippers: tuple[Component, ...] = field(init=False)
    gradient_readers: tuple[Component, ...] = field(init=False)
    planners: tuple[Component, ...] = field(init=False)

    def __post_init__(self) -> None:
        def overriding(name: str) -> tuple[Component, ...]:
            return tuple(c for c in self if getattr(type(c), name) is not getattr(Component, name))

        object.__setattr__(self, "fast_skippers", overriding("skips_fast"))
        object.__setattr__(self, "gradient_readers", overriding("needs_full_gradient"))
        object.__setattr__(self, "planners", overriding("plan"))

    def __iter__(self) -> Iterator[Component]:
        return iter((self.policy, self.schedule, self.allocator, self.reparametrisation))


#: the group keys that choose the components, one per kind
_SELECTORS = (GradientPolicy.key, RefreshSchedule.key, RankAllocator.key, Reparametrisation.key)
#: what each combination of those keys' values chose (the step asks several times per parameter)
_CHOSEN: dict[tuple[Any, ...], Features] = {}


def features_of(group: dict[str, Any]) -> Features:
    """What ``group`` runs (a group without ``rank`` runs only its policy: the others are the defaults)."""
    key = tuple(group.get(selector) for selector in _SELECTORS)
    try:
        return _CHOSEN[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable value, which the group's checks refuse: choose without remembering
        return _choose(group)
    features = _CHOSEN[key] = _choose(group)
    return features


def _choose(group: dict[str, Any]) -> Features:
    return Features(
        chosen(POLICIES, group), chosen(SCHEDULES, group), chosen(ALLOCATORS, group), chosen(REPARAMETRISATIONS, group)
    )


def every_component() -> Iterator[Component]:
    """Every registered component, kind by kind (policies first)."""
    for kind in (POLICIES, *PROJECTED_KINDS):
        yield from kind.values()


def projected_defaults() -> dict[str, Any]:
    """The keys every projected group's components add, with their defaults."""
    return {key: value for kind in PROJECTED_KINDS for c in kind.values() for key, value in c.defaults.items()}


def policy_defaults() -> dict[str, Any]:
    """The keys a gradient policy adds to every group (``spike_policy`` and each policy's own)."""
    own = {key: value for c in POLICIES.values() for key, value in c.defaults.items()}
    return {GradientPolicy.key: GradientPolicy.value, **own}


def check_policy(group: dict[str, Any]) -> None:
    """The group's gradient policy by name, and its keys."""
    name = group.get(GradientPolicy.key, GradientPolicy.value)
    if name not in POLICIES:
        raise ValueError(f"{GradientPolicy.key}={name!r} is not valid; expected one of {tuple(POLICIES)}")
    POLICIES[name].check(group)


def check_projected(group: dict[str, Any]) -> None:
    """Every projected component's keys (a projected group has them all, chosen or not)."""
    for kind in PROJECTED_KINDS:
        for component in kind.values():
            component.check(group)


def feature_conflict(group: dict[str, Any], rule: UpdateRule | None) -> str | None:
    """Why the group's chosen projected components do not work with its other options, or None."""
    features = features_of(group)
    for component in (features.schedule, features.allocator, features.reparametrisation):
        error = component.conflict(group, rule)
        if error is not None:
            return error
    return None


def sharding_blocker(group: dict[str, Any]) -> str | None:
    """Why a component the group chose cannot run on FSDP2 rows yet, or None."""
    return next((c.sharding_blocker for c in features_of(group) if c.sharding_blocker is not None), None)


def fast_blocker(group: dict[str, Any]) -> str | None:
    """Why a component the group chose keeps its parameters off the batched fast path, or None."""
    return next((c.fast_blocker for c in features_of(group) if c.fast_blocker is not None), None)


def refresh_due(state: dict[str, Any], group: dict[str, Any]) -> bool:
    """Whether a parameter with this state refreshes its basis on its next step: on its first step (no state,
    or no basis yet), then when its group's schedule says so."""
    if "last_refresh" not in state or state["last_refresh"] < 0:  # a gradient policy's keys may come first
        return True
    return features_of(group).schedule.due(state, group)
