"""The projected optimizer: one ``torch.optim.Optimizer`` that composes a projector, a side,
an update rule, a residual policy, an ``on_refresh`` policy and the step features
(:mod:`gradproj.optim.features`) per parameter group.

A group with ``rank`` is *projected*: when its refresh schedule says so (every ``update_proj_gap``
steps by default) its basis is refreshed from the gradient ``G``; each step the rule runs on
``R = down(G)`` and the weight moves by ``-step_size * combine(G, R, u)`` (see
:mod:`gradproj.optim.residual`). A group without ``rank`` runs the rule in full (Adam rules then
follow torch.optim.AdamW bit for bit).
Weight decay is decoupled and applied in full space: ``p *= 1 - lr * weight_decay``.

Per-parameter state holds tensors, ints and strings only, so ``state_dict()`` loads with
``torch.load(..., weights_only=True)`` and a loaded optimizer continues in lockstep.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..projection.bases import Bases, derive_seed
from ..projection.projectors import Layout, get_projector, layout_of
from ..rules import make_rule
from ..rules.base import UpdateRule
from .component import GradientPolicy, StepPlan, refresh_phases
from .defaults import PROJECTION_DEFAULTS
from .fast import FOREACH, FastPath, blocker
from .features import check_policy, every_component, features_of, policy_defaults, refresh_due
from .finite import check_dense
from .groups import budget_costs
from .one_at_a_time import OneAtATime, ParamRecord
from .placement import LOCAL, Local, is_sharded, local, placement_of
from .precision import BF16_UPDATES, LOW_PRECISION, compute_dtype, widen, working_weight
from .spread import due_refreshes, spread_refreshes
from .spread_whole import due_whole, spread_whole
from .step import InBackwardStepping, ProjectedContext, StepProbe, full_step, projected_step
from .validate import (
    NONFINITE,
    _choice,
    check_common,
    check_matrices,
    check_projection,
    check_real,
    sharding_blocker,
)

#: mixed into a parameter's seed key for its stochastic rounding (independent of its basis draws)
_ROUNDING = 0x5EED


class ProjectedOptimizer(OneAtATime):
    """The engine behind every preset. Prefer the presets (:class:`gradproj.GaLoreAdamW`, ...).

    Args:
        params: parameters or groups; groups with ``rank`` are projected.
        defaults: the rule's hyper-parameters (``lr``, ``betas``, ``eps``, ``weight_decay``...).
        rule: a name of :data:`gradproj.rules.REGISTRY` (``"adam"``, ...);
            a group may run another on its ``R`` with its own ``rule`` key.
        projection: overrides of :data:`PROJECTION_DEFAULTS` for projected groups.
        nonfinite: ``"skip"`` (default) drops a step whose gradients contain NaN/Inf, leaving
            every weight and state untouched, counts it in ``nonfinite_steps`` and warns;
            ``"raise"`` raises :class:`FloatingPointError` instead, also before any change;
            ``"checked"``: the caller has checked every gradient before it calls ``step()``, which then
            reads none of them an extra time (gradproj's trainer skips a step whose global gradient norm
            is not finite, and builds its optimizers so). :meth:`step_parameter` checks either way.
        projection: may also hold a gradient policy's keys (its name and options:
            :func:`~gradproj.optim.features.policy_defaults`), which become every group's default, projected
            or not.
        bf16_update: how a bf16 weight's float32 step is rounded back: ``"nearest"``, ``"stochastic"``
            or ``"kahan"`` (a compensation buffer in the state); see :mod:`gradproj.optim.precision`.
            A group may set its own. Weights in float32/float64 are stepped in place either way.
        foreach: the batched fast path (:mod:`gradproj.optim.fast`): None (default) takes it wherever it
            applies, as torch does; True raises, naming the parameter and why, where it cannot; False
            steps every parameter on its own (the ground truth the fast path is tested against).
        compile: ``torch.compile`` each matrix's elementwise fast-path step (Adam's moments and direction
            as one generated kernel; one compile per shape and dtype, the first step pays it).
    """

    #: the update rule a preset runs (a name of :data:`gradproj.rules.RULES`)
    RULE: ClassVar[str] = "adam"
    #: the preset's own overrides of :data:`PROJECTION_DEFAULTS` (its residual policy, default scale...)
    PROJECTION: ClassVar[dict[str, Any]] = {"residual": "none"}

    @classmethod
    def projection_defaults(cls) -> dict[str, Any]:
        """What a projected group of this preset gets for every key it does not set.

        >>> from gradproj import FiraAdamW
        >>> FiraAdamW.projection_defaults()["residual"], FiraAdamW.projection_defaults()["scale"]
        ('fira', 1.0)
        """
        return {**PROJECTION_DEFAULTS, **cls.PROJECTION}

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        rule: str,
        projection: dict[str, Any] | None = None,
        nonfinite: str = "skip",
        bf16_update: str = "nearest",
        foreach: bool | None = None,
        compile: bool = False,
    ) -> None:
        _choice("nonfinite", nonfinite, NONFINITE)
        _choice("foreach", foreach, FOREACH)
        _choice("compile", compile, (False, True))
        if compile and foreach is False:
            raise ValueError("compile=True compiles the fast path, which foreach=False never takes; use foreach=None")
        _choice("bf16_update", bf16_update, BF16_UPDATES)
        defaults = {**defaults, "bf16_update": bf16_update}
        projection = dict(projection or {})
        defaults.update({k: projection.pop(k) for k in policy_defaults() if k in projection})  # every group's
        unknown = set(projection) - set(PROJECTION_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown projection option(s) {sorted(unknown)}; valid: {sorted(PROJECTION_DEFAULTS)}")
        check_common(defaults)  # before any parameter is read, as torch.optim checks its arguments
        self.foreach = foreach
        self._compile = compile
        self.rule = make_rule(rule)
        self.nonfinite = nonfinite
        self.nonfinite_steps = 0
        self._projection_defaults = {**PROJECTION_DEFAULTS, **projection}
        #: plain numbers that helpers (layer-wise stepping) keep with the optimizer's checkpoint
        self.extra_state: dict[str, float | int] = {}
        #: FSDP2: compute each due refresh on one rank and broadcast it (:mod:`gradproj.optim.spread`);
        #: False repeats every refresh on every rank (the same bits, world times the work)
        self.spread = True
        self._reset_derived()
        super().__init__(params, defaults)

    #: what a copy does not carry: the records derived from the groups (rebuilt from them), caches, and the
    #: helpers attached to this optimizer (their hooks sit on its parameters, not the copy's)
    _DERIVED: ClassVar[tuple[str, ...]] = ("_fast", "_rules", "_records", "_basis_cache", "layerwise", "probe")

    def _reset_derived(self) -> None:
        """The tables :meth:`add_param_group` fills, empty; no helper attached."""
        self._fast = FastPath(compile=self._compile)
        self._rules: dict[str, UpdateRule] = {self.rule.name: self.rule}
        self._records: dict[Tensor, ParamRecord] = {}
        #: what steps the parameters inside backward (:class:`gradproj.layerwise.LayerwiseStepper`), if any
        self.layerwise: InBackwardStepping | None = None
        #: what samples per-layer training dynamics (:class:`gradproj.dynamics.Dynamics`), if any
        self.probe: StepProbe | None = None
        self._basis_cache: dict[Tensor, Bases] = {}

    def _point_at_groups(self) -> None:
        """After torch rebuilt the group dicts (a load): every record follows its live group."""
        for group in self.param_groups:
            for p in group["params"]:
                self._records[p].group = group

    # ----------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "rank" in param_group:
            for key, value in self._projection_defaults.items():
                param_group.setdefault(key, value)
        merged = {**self.defaults, **param_group}
        if features_of(merged).policy.transforms:
            for key, value in policy_defaults().items():
                param_group.setdefault(key, self.defaults.get(key, value))
            merged = {**self.defaults, **param_group}
        check_common(merged)
        check_policy(merged)
        _choice(
            "bf16_update", merged.get("bf16_update", "nearest"), BF16_UPDATES
        )  # before torch appends the group, so a bad group leaves no trace
        if "rank" in merged:
            check_projection(merged, self.rule_of(merged))
        super().add_param_group(param_group)
        try:
            self._index_group(self.param_groups[-1], len(self.param_groups) - 1)
        except ValueError:
            self._forget(self.param_groups.pop())  # a refused group leaves no trace
            raise

    def _forget(self, group: dict[str, Any]) -> None:
        """Drop a refused group's parameters from every table keyed by parameter (their records too: a group
        refused by ``foreach=True`` had them made)."""
        tables = [getattr(self, name) for name in self._DERIVED]
        for table in (t for t in tables if isinstance(t, dict)):
            for p in group["params"]:
                table.pop(p, None)

    def _index_group(self, group: dict[str, Any], index: int) -> None:
        """Record the group's parameters (their names, seed keys, refresh phases, state costs and fast-path
        capability); raises ValueError for a parameter the group cannot step."""
        names = group.get("param_names") or [None] * len(group["params"])
        for j, (p, name) in enumerate(zip(group["params"], names, strict=True)):
            # unnamed parameters are named by their place in the optimizer, so building the same optimizer
            # twice gives the same bases (the seed key is the name's CRC-32), whatever the process did before
            name = name or f"param_groups[{index}].params[{j}]"
            check_real(p, name)
            self._records[p] = ParamRecord(name, zlib.crc32(name.encode()), group)
        if "rank" in group:
            check_matrices(group, [self._records[p].name for p in group["params"]])
            if any(feature.needs_state_costs for feature in features_of(group)):
                for p, costs in budget_costs(group, self.rule_of(group).name).items():
                    self._records[p].costs = costs
            phases = refresh_phases(group["refresh_offset"], len(group["params"]), group["update_proj_gap"])
            for p, phase in zip(group["params"], phases, strict=True):
                self._records[p].phase = phase
        self._check_fast_path(group)

    def _check_fast_path(self, group: dict[str, Any]) -> None:
        """Which of ``group``'s parameters the fast path may step; with ``foreach=True``, none may be refused."""
        rule = self.rule_of(group)
        for p in group["params"]:
            reason = None if self.foreach is False else blocker(p, group, rule)
            if reason is not None and self.foreach:
                raise ValueError(
                    f"foreach=True cannot step {self._records[p].name}: {reason}; use foreach=None or False"
                )
            self._records[p].fast = self.foreach is not False and reason is None

    # ------------------------------------------------------- public accessors
    def owns(self, p: Tensor) -> bool:
        """Whether ``p`` is one of this optimizer's parameters."""
        return p in self._records

    def bases(self, p: Tensor) -> Bases:
        """``(left, right)``: the basis ``p``'s gradient is projected on now (``(None, None)`` before the
        first refresh, or for a parameter without ``rank``)."""
        if "rank" not in self._records[p].group or "step" not in self.state[p]:
            return None, None
        cached = self._basis_cache.get(p)  # filled only by projectors that cache; kept in the weight's dtype
        if cached is not None and p.dtype not in LOW_PRECISION:
            return cached
        return self.context(p).bases()

    def layout(self, p: Tensor, group: dict[str, Any], plan: StepPlan | None = None) -> Layout:
        """Shape, effective rank, side, dtype and device of a projected parameter (its rank allocator's: the
        rank ``plan`` gives it on this step's refresh, or the one it holds; by default the group's)."""
        planned = None if plan is None else plan.ranks.get(p)
        rank = features_of(group).allocator.rank(self.state[p], planned)
        return layout_of((int(p.shape[0]), int(p.shape[1])), group, p.dtype, p.device, rank)

    def rule_of(self, group: dict[str, Any]) -> UpdateRule:
        """The rule a group runs: its own ``rule`` key (a preset whose matrices run another rule) or the optimizer's."""
        name = group.get("rule") or self.rule.name
        if name not in self._rules:
            self._rules[name] = make_rule(name)
        return self._rules[name]

    def placement(self, p: Tensor) -> Local:
        """Where ``p``'s matrix lives: :mod:`gradproj.optim.placement` (FSDP2 rows, or all here)."""
        if not is_sharded(p):
            return LOCAL
        record = self._records[p]
        if record.placement is None:
            blocker = sharding_blocker(record.group, self.rule_of(record.group))
            if blocker is not None:
                raise ValueError(
                    f"{record.name}: {blocker}, so it cannot step FSDP2-sharded parameters yet; change that option "
                    "or use DDP (gradproj.optim.registry.fsdp_capable() lists the methods that can)"
                )
            record.placement = placement_of(p)
        return record.placement

    def context(self, p: Tensor, plan: StepPlan | None = None) -> ProjectedContext:
        """A projected parameter as the step sees it (:class:`~gradproj.optim.step.ProjectedContext`), with what
        ``plan`` decided for it on this step."""
        record = self._records[p]
        group = record.group
        return ProjectedContext(
            compute=compute_dtype(p.dtype) if p.dtype in LOW_PRECISION else None,  # None: no widening
            name=record.name,
            seed_key=record.seed_key,
            group=group,
            state=self.state[p],
            layout=self.layout(p, group, plan),
            projector=get_projector(group["projector"]),
            rule=self.rule_of(group),
            placement=self.placement(p),
            cache=self._basis_cache,
            key=p,
            features=features_of(group),
            probe=self.probe,
            prepared=None if plan is None else plan.prepared.get(p),
            phase=record.phase,
        )

    def refresh_due(self, p: Tensor) -> bool:
        """Whether ``p``'s next step recomputes its basis (:func:`gradproj.optim.features.refresh_due`)."""
        return refresh_due(self.state[p], self._records[p].group)

    def state_costs(self, p: Tensor) -> tuple[int, int]:
        """``p``'s state bytes at rank 1 and per further rank (computed when its group plans its ranks)."""
        return self._records[p].costs

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one step; returns the closure's loss if a closure was given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layerwise is not None:  # every parameter was stepped inside backward
            return loss
        check_dense((p, self._records[p].name) for g in self.param_groups for p in g["params"])
        if self.nonfinite != "checked" and not self._gradients_are_finite():
            return loss
        self._transform_gradients()  # before anything reads a gradient: every part sees the transformed one
        plan = StepPlan(prepared=spread_refreshes(due_refreshes(self)) if self.spread else {})
        spread_whole(due_whole(self) if self.spread else [])  # whole-matrix directions, each on one rank
        self._plan(plan)
        for group in self.param_groups:
            batched = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self._records[p].fast and self._fast.takes(self, p, group):
                    batched.append(p)
                else:
                    self._step_one(p, group, local(p.grad), plan=plan)
            if batched:  # each parameter's step is independent of the others': the order does not matter
                (self._fast.projected if "rank" in group else self._fast.full)(self, group, batched)
        return loss

    def _transform_gradients(self) -> None:
        """Every group's gradient policy on its parameters' gradients (those whose policy rewrites them)."""
        for group in self.param_groups:
            policy = features_of(group).policy
            for p in group["params"] if policy.transforms else ():
                if p.grad is not None:
                    self._transform(p, group, policy, local(p.grad))

    def _plan(self, plan: StepPlan) -> None:
        """Each step feature plans this step for the groups that chose it (all of them at once)."""
        planned: dict[int, tuple[Any, list[dict[str, Any]]]] = {}  # by component, in the groups' order
        for group in self.param_groups:
            for feature in features_of(group).planners if "rank" in group else ():
                planned.setdefault(id(feature), (feature, []))[1].append(group)
        for feature in every_component():  # in the registries' order: a schedule's plan before an allocator's
            if id(feature) in planned:
                feature.plan(self, planned[id(feature)][1], plan)

    def _transform(self, p: Tensor, group: dict[str, Any], policy: GradientPolicy, grad: Tensor) -> None:
        """``policy`` on ``grad`` (``p``'s local gradient) in place; when it says so, the rule's moments are
        zeroed and its bias correction restarts."""
        state = self.state[p]
        if not policy.transform(grad, state, group, self.placement(p)) or "step" not in state:
            return  # no reset, or nothing accumulated yet
        if "rank" in group:  # the moments of R
            ctx = self.context(p)
            with ctx.placement.local_state(state, ctx.low_shape, ctx.replicated) as plain:
                ctx.rule.reset(plain)
            return
        rule, place = self.rule_of(group), self.placement(p)
        with place.local_state(state, place.whole_shape(local(p)), rule.replicated_state) as plain:
            rule.reset(plain)

    def _step_one(
        self,
        p: Tensor,
        group: dict[str, Any],
        grad: Tensor | None,
        low: Tensor | None = None,
        plan: StepPlan | None = None,
    ) -> None:
        """One parameter: the projected step, or the rule in full for a group without ``rank``; a
        low-precision weight is stepped on float32 copies (:mod:`gradproj.optim.precision`)."""
        if p.dtype not in LOW_PRECISION:
            self._step_weight(p, group, local(p), grad, low, plan)
            return
        state, placement, wide = self.state[p], self.placement(p), compute_dtype(p.dtype)
        seed = derive_seed(group.get("seed", 0), self._records[p].seed_key, _ROUNDING)

        def keep(into: dict[str, Any], key: str, value: Tensor) -> None:
            with placement.local_state(into, placement.whole_shape(local(p))) as plain:
                plain[key] = value

        with working_weight(local(p), state, group, seed, local=local, keep=keep) as weight:
            self._step_weight(p, group, weight, widen(grad, wide), widen(low, wide), plan)

    def _step_weight(
        self,
        p: Tensor,
        group: dict[str, Any],
        weight: Tensor,
        grad: Tensor | None,
        low: Tensor | None,
        plan: StepPlan | None,
    ) -> None:
        """Step ``weight`` (``p``'s local tensor, or its float32 working copy) in place."""
        if "rank" in group:
            projected_step(self.context(p, plan), weight, grad, low)
        else:
            assert grad is not None
            full_step(self.rule_of(group), self.placement(p), weight, grad, self.state[p], group)
