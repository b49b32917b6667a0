"""``OptimizerSpec``: a method by name and its options, each one self-describing field (default, help,
limits, flag), the one object the trainer's config, the bench, the planner and the Hugging Face integration
hand to :func:`gradproj.optim.build.build_optimizer`; the trainer's ``--optimizer`` ... flags are generated from it.

Example:
    >>> OptimizerSpec(name="apollo_mini", rank=64).resolved_rank
    1
    >>> OptimizerSpec(name="galore_adamw", update_proj_gap=0)
    Traceback (most recent call last):
    ...
    ValueError: update_proj_gap=0 is not valid; expected an integer >= 1 or 'auto'
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..options import check, given_option, option
from ..projection.projectors import PROJECTORS
from ..projection.sides import PROJ_TYPES
from ..rules import check_rule_options, rule_defaults
from ..rules.colnorm import ColumnNormOptions
from ..rules.muon import MuonOptions
from .adaptive import ADAPTIVE_DEFAULTS, AdaptiveOptions, check_gap, parse_gap
from .component import REFRESH_SCHEDULES
from .defaults import PROJECTION_DEFAULTS
from .features import POLICIES, check_policy
from .groups import ATTENTION_AND_MLP, Target
from .ranks import AUTO_RANK, RankOptions, check_rank, parse_budget, parse_rank
from .registry import Method, get_method, trainer_methods
from .spikes import SPIKE_DEFAULTS, StableSpamOptions
from .validate import ON_REFRESH

#: Rank of a projected method when none is given (galore-torch's default); the trainer gives hidden / 4.
DEFAULT_RANK = 128


def _trainer_names() -> tuple[str, ...]:
    return tuple(m.name for m in trainer_methods())


def _method_help() -> str:
    return "; ".join(f"{m.name}: {m.summary}" for m in trainer_methods())


def _scale_help() -> str:
    scales = ", ".join(f"{m.name} {m.default_scale():g}" for m in trainer_methods() if m.projected)
    return f"update scale (default per optimizer: {scales})"


def _projector_help() -> str:
    bases = ", ".join(f"{m.name} {m.default_option('projector')}" for m in trainer_methods() if m.projected)
    return f"basis of the projection (default per optimizer: {bases})"


@dataclass(frozen=True, kw_only=True)
class OptimizerSpec:
    """A method by name and the options a user may set; ``None`` means the method's default. Each
    field describes itself (:func:`gradproj.options.option`): the trainer's ``--optimizer``,
    ``--lr``, ... flags are generated from these fields."""

    name: str = option(
        "galore_adamw", help=_method_help, choices=_trainer_names, flag="--optimizer", group="optimizer"
    )  #: a name of :data:`gradproj.optim.registry.METHODS` (the command line offers ours)
    lr: float | None = option(
        None, help="learning rate of the projected matrices (default: per optimizer)", above=0, group="optimizer"
    )
    other_lr: float | None = option(
        None, help="learning rate of embeddings, norms and head (default: per optimizer)", above=0, group="optimizer"
    )
    rank: int | str | None = option(
        None,
        help=f"projection rank (the trainer's default: hidden size / 4, the paper's ratio; built directly: "
        f"{DEFAULT_RANK}), or auto: each matrix's rank from its gradient's energy at every refresh, within "
        "--state-budget; a method with a fixed rank (APOLLO-Mini: 1) ignores it",
        parse=parse_rank,
        group="optimizer",
    )
    state_budget: str | None = option(
        None,
        help="rank auto: optimizer state the projected matrices may hold together, in bytes (24000000, 24MB, "
        "22.9MiB) or as a fraction of the method's state at a fixed rank (0.75x: at the rank the run would "
        "have used; 0.75x@128: at rank 128)",
        group="optimizer",
    )
    # the step features' options, generated from their components' options (their help, default and bounds)
    max_rank: int | None = given_option(RankOptions, "max_rank", prefix="rank auto: ", group="optimizer")
    energy_target: float | None = given_option(RankOptions, "energy_target", prefix="rank auto: ", group="optimizer")
    update_proj_gap: int | str = option(
        200,
        help="steps between basis refreshes, or auto: each matrix refreshes when its basis keeps less than "
        "--energy-threshold of the gradient's energy it kept when fresh, after --min-gap and by --max-gap steps",
        parse=parse_gap,
        group="optimizer",
    )
    min_gap: int | None = given_option(AdaptiveOptions, "min_gap", prefix="auto: ", group="optimizer")
    max_gap: int | None = given_option(AdaptiveOptions, "max_gap", prefix="auto: ", group="optimizer")
    energy_threshold: float | None = given_option(
        AdaptiveOptions, "energy_threshold", prefix="auto: ", group="optimizer"
    )
    check_every: int | None = given_option(AdaptiveOptions, "check_every", prefix="auto: ", group="optimizer")
    scale: float | None = option(None, help=_scale_help, above=0, group="optimizer")
    projector: str | None = option(None, help=_projector_help, choices=PROJECTORS, group="optimizer")
    proj_type: str = option(
        "std", help="which side is projected, galore-torch's names", choices=PROJ_TYPES, group="optimizer"
    )
    on_refresh: str = option(
        "keep", help="what happens to the moments when the basis changes", choices=ON_REFRESH, group="optimizer"
    )
    refresh_offset: str = option(
        "aligned",
        help="when each matrix refreshes: all on the same step (galore-torch's schedule), or staggered, each at "
        "its own phase within the gap so that no step carries every SVD",
        choices=REFRESH_SCHEDULES,
        group="optimizer",
    )
    leading_basis: int | None = option(
        None,
        help="Alice's switching refresh: leading directions it keeps, the rest drawn from the complement "
        "(default: 40/256 of the rank, the paper's share); methods that do not switch ignore it",
        minimum=1,
        group="optimizer",
    )
    spike_policy: str = option(
        "none",
        help="what happens to each gradient before the optimizer: stable_spam clips entries above the running "
        "mean of the gradient's maxima, rescales each matrix to its norm's running statistics and resets the "
        "moments every --spam-reset-gap steps (Stable-SPAM; any of gradproj's optimizers)",
        choices=tuple(POLICIES),
        group="optimizer",
    )
    spam_reset_gap: int | None = given_option(
        StableSpamOptions, "spam_reset_gap", prefix="stable_spam: ", group="optimizer"
    )
    spam_theta: float | None = given_option(StableSpamOptions, "spam_theta", prefix="stable_spam: ", group="optimizer")
    spam_gamma1: float | None = given_option(
        StableSpamOptions, "spam_gamma1", prefix="stable_spam: ", group="optimizer"
    )
    spam_gamma2: float | None = given_option(
        StableSpamOptions, "spam_gamma2", prefix="stable_spam: ", group="optimizer"
    )
    # the rules' own options (muon's, SCALE's colnorm), generated from their options
    momentum: float | None = given_option(MuonOptions, "momentum", prefix="muon, scale: ", group="optimizer")
    ns_steps: int | None = given_option(MuonOptions, "ns_steps", prefix="muon: ", group="optimizer")
    adjust_lr_fn: str | None = given_option(MuonOptions, "adjust_lr_fn", prefix="muon: ", group="optimizer")
    ns_dtype: str | None = given_option(MuonOptions, "ns_dtype", prefix="muon: ", group="optimizer")
    norm_dim: int | None = given_option(ColumnNormOptions, "norm_dim", prefix="scale: ", group="optimizer")
    weight_decay: float = option(0.0, help="decoupled weight decay", minimum=0, group="optimizer")
    target_modules: Target = option(
        ATTENTION_AND_MLP,
        help="regex of module names to project, or all-linear (default: attention and MLP, the paper's targets)",
        group="optimizer",
    )

    def __post_init__(self) -> None:
        get_method(self.name)  # an unknown name fails here, listing the valid ones (peers included)
        check(self, skip=("name",))
        options = {**PROJECTION_DEFAULTS, **self.group_options(), "state_budget": 1}  # bytes resolved at build
        check_gap(options)  # the engine's own checks, before any build
        check_rule_options(options)
        if self.rank is not None:
            check_rank({**options, "rank": self.rank})
        if self.state_budget is not None:
            parse_budget(self.state_budget)
        given = [k for k in SPIKE_DEFAULTS if k != "spike_policy" and getattr(self, k) is not None]
        if given and self.spike_policy == "none":
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ValueError(f"{flags} set(s) the stable_spam policy's options; add --spike-policy stable_spam")
        check_policy({**SPIKE_DEFAULTS, **self.policy_options(), "eps": 0.0, "lr": 1.0})
        if self.resolved_rank == AUTO_RANK and self.budget is None:
            raise ValueError(
                "rank auto needs --state-budget (bytes, or a fraction of the state at a fixed rank: 0.75x)"
            )

    def at_default_rank(self, default: int) -> OptimizerSpec:
        """This spec where the run's own rank decides (the trainer's hidden / 4): ``rank`` if none was given,
        and a budget given as a fraction (``0.75x``) taken of the state at that rank (``0.75x@RANK``).

        >>> OptimizerSpec(rank="auto", state_budget="0.5x").at_default_rank(64).state_budget
        '0.5x@64'
        """
        budget = self.state_budget
        if budget is not None and budget.strip().lower().endswith("x"):
            budget = f"{budget.strip()}@{default}"
        return replace(self, rank=self.rank if self.rank is not None else default, state_budget=budget)

    def fixed_rank_twin(self, default: int) -> OptimizerSpec:
        """rank auto: the same spec at the fixed rank its budget is measured against (what baselines and
        LoRA are planned and compared at); otherwise this spec at its default rank."""
        spec = self.at_default_rank(default)
        reference = reference_rank(spec, default)
        return spec if reference is None else replace(spec, rank=reference, state_budget=None)

    @property
    def budget(self) -> str | None:
        """rank auto: the state budget as given, else the state the method keeps at the spec's own rank
        (``1x@RANK``: a variant such as ``galore_adamw+auto_rank`` run at ``--rank 64``)."""
        if self.state_budget is not None:
            return self.state_budget
        if self.rank == AUTO_RANK:
            return None  # --rank auto names no rank to compare with: it needs --state-budget
        return f"1x@{self.rank if self.rank is not None else DEFAULT_RANK}"

    @property
    def method(self) -> Method:
        return get_method(self.name)

    @property
    def matrix_lr(self) -> float:
        return self.lr if self.lr is not None else self.method.lr

    @property
    def rest_lr(self) -> float:
        return self.other_lr if self.other_lr is not None else self.method.other_lr

    @property
    def projected(self) -> bool:
        return self.method.projected

    @property
    def resolved_rank(self) -> int | str | None:
        """The rank the optimizer really uses (None for full-rank methods; ``"auto"``: allocated)."""
        if not self.projected:
            return None
        return self.method.fixed_rank or (self.rank if self.rank is not None else DEFAULT_RANK)

    def policy_options(self) -> dict[str, Any]:
        """The gradient policy's keys as given (the engine fills in the rest); none without a policy.

        >>> OptimizerSpec(spike_policy="stable_spam", spam_reset_gap=500).policy_options()
        {'spike_policy': 'stable_spam', 'spam_reset_gap': 500}
        """
        if self.spike_policy == "none":
            return {}
        return {k: getattr(self, k) for k in SPIKE_DEFAULTS if getattr(self, k) is not None}

    def group_options(self) -> dict[str, Any]:
        """Options of the projected group, in our key names, the method's fixed ones winning (but over the rules'
        own options, which the method sets as its defaults: the Muon family's bfloat16 iterations)."""
        scale = self.scale if self.scale is not None else self.method.default_scale()
        projector = self.projector if self.projector is not None else self.method.default_option("projector")
        options = {
            "update_proj_gap": self.update_proj_gap,
            "scale": scale,
            "proj_type": self.proj_type,
            "projector": projector,
            "on_refresh": self.on_refresh,
            "refresh_offset": 0 if self.refresh_offset == "aligned" else self.refresh_offset,
        }
        for key in (*ADAPTIVE_DEFAULTS, "max_rank", "energy_target"):  # given ones only: the engine fills in the rest
            if getattr(self, key) is not None:
                options[key] = getattr(self, key)
        rule_options = {key: getattr(self, key) for key in rule_defaults() if getattr(self, key) is not None}
        if self.leading_basis is not None:
            options["leading_basis"] = self.leading_basis
        if self.method.kind == "peer":  # a peer's fixed options are in its own key names: _peer adds them
            return {**options, **rule_options}
        fixed = {k: v for k, v in self.method.group_options.items() if k != "rank"}
        return {**options, **fixed, **rule_options}


def reference_rank(spec: OptimizerSpec, default: int) -> int | None:
    """``rank="auto"``: the fixed rank its state is compared with, the one its budget names
    (``0.75x@64``), else ``default``; None for a fixed rank.

    >>> auto = OptimizerSpec(rank="auto", state_budget="0.5x@32")
    >>> reference_rank(auto, 64), reference_rank(OptimizerSpec(rank=8), 64)
    (32, None)
    """
    if spec.resolved_rank != AUTO_RANK:
        return None
    budget = parse_budget(spec.budget) if spec.budget is not None else None
    return budget[1] or default if isinstance(budget, tuple) else default
