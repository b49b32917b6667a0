"""Build any registered method (:mod:`gradproj.optim.registry`) for a model: one parameter split for
every method, ours and the peers', so that they train the same matrices at the same rates.

Attention and MLP matrices (``target_modules``) form the first group, at ``lr``; embeddings, norms and
the head the other, at ``other_lr``. Projected methods give the first group a ``rank``.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16))
    >>> spec = OptimizerSpec(name="galore_adamw", rank=4, target_modules="1")
    >>> type(build_optimizer(model, spec)).__name__
    'GaLoreAdamW'
    >>> OptimizerSpec(name="apollo_mini", rank=64).resolved_rank
    1
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..options import check, option
from ..projection.projectors import PROJECTORS
from ..projection.sides import PROJ_TYPES
from .adaptive import ADAPTIVE_DEFAULTS, AUTO, check_gap, parse_gap
from .component import REFRESH_SCHEDULES
from .defaults import PROJECTION_DEFAULTS
from .external import lora_optimizer, peer_optimizer
from .fast import fused_adamw_supported
from .features import POLICIES, check_policy
from .groups import ATTENTION_AND_MLP, Target, param_groups
from .precision import LOW_PRECISION
from .presets import PRESETS
from .ranks import AUTO_RANK, RANK_DEFAULTS, check_rank, parse_budget, parse_rank
from .registry import Method, get_method, trainer_methods
from .spikes import SPIKE_DEFAULTS
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
    max_rank: int | None = option(
        None, help=f"rank auto: most rank one matrix takes (default {RANK_DEFAULTS['max_rank']})", minimum=1,
        group="optimizer",
    )  # fmt: skip
    energy_target: float | None = option(
        None,
        help="rank auto: a matrix takes no more rank than keeps this share of its gradient's energy, in (0, 1] "
        f"(default {RANK_DEFAULTS['energy_target']})",
        above=0,
        group="optimizer",
    )
    update_proj_gap: int | str = option(
        200,
        help="steps between basis refreshes, or auto: each matrix refreshes when its basis keeps less than "
        "--energy-threshold of the gradient's energy it kept when fresh, after --min-gap and by --max-gap steps",
        parse=parse_gap,
        group="optimizer",
    )
    min_gap: int | None = option(
        None, help=f"auto: fewest steps between two refreshes (default {ADAPTIVE_DEFAULTS['min_gap']})", minimum=1,
        group="optimizer",
    )  # fmt: skip
    max_gap: int | None = option(
        None, help=f"auto: most steps between two refreshes (default {ADAPTIVE_DEFAULTS['max_gap']})", minimum=1,
        group="optimizer",
    )  # fmt: skip
    energy_threshold: float | None = option(
        None,
        help="auto: refresh once the basis keeps less than this fraction of the energy share it kept on the step "
        f"after its refresh, in (0, 1) (default {ADAPTIVE_DEFAULTS['energy_threshold']})",
        above=0,
        group="optimizer",
    )
    check_every: int | None = option(
        None,
        help=f"auto: measure the kept share every this many steps (default {ADAPTIVE_DEFAULTS['check_every']})",
        minimum=1,
        group="optimizer",
    )
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
    spam_reset_gap: int | None = option(
        None, help=f"stable_spam: steps between moment resets, 0 never (default {SPIKE_DEFAULTS['spam_reset_gap']})",
        minimum=0, group="optimizer",
    )  # fmt: skip
    spam_theta: float | None = option(
        None, help=f"stable_spam: decay of the maxima's mean, the clipping threshold, in [0, 1) "
        f"(default {SPIKE_DEFAULTS['spam_theta']})", minimum=0, group="optimizer",
    )  # fmt: skip
    spam_gamma1: float | None = option(
        None, help="stable_spam: decay of the gradient norm's mean, in [0, 1) "
        f"(default {SPIKE_DEFAULTS['spam_gamma1']})", minimum=0, group="optimizer",
    )  # fmt: skip
    spam_gamma2: float | None = option(
        None, help="stable_spam: decay of the squared gradient norm's mean, in [0, 1) "
        f"(default {SPIKE_DEFAULTS['spam_gamma2']})", minimum=0, group="optimizer",
    )  # fmt: skip
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
        """Options of the projected group, in our key names, the method's fixed ones winning."""
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
        if self.leading_basis is not None:
            options["leading_basis"] = self.leading_basis
        if self.method.kind == "peer":  # a peer's fixed options are in its own key names: _peer adds them
            return options
        fixed = {k: v for k, v in self.method.group_options.items() if k != "rank"}
        return {**options, **fixed}


def build_optimizer(
    model: nn.Module,
    spec: OptimizerSpec,
    *,
    summary: bool = False,
    layerwise: bool = False,
    bf16_update: str = "nearest",
    nonfinite: str = "skip",
) -> torch.optim.Optimizer:
    """The optimizer ``spec`` names, over ``model``'s trainable parameters.

    ``nonfinite`` is our engine's (``"checked"`` where the caller skips non-finite steps itself, as the
    trainer does from the clipped gradient norm); torch's and the peers' optimizers check nothing.

    ``layerwise`` (stepping inside backward) and a gradient policy (``spec.spike_policy``) need a gradproj
    optimizer: torch's AdamW is then replaced by the engine without ranks, which is torch's AdamW bit for
    bit (tested). So it is for a model with bf16 weights: the engine keeps float32 moments and rounds each
    step by ``bf16_update`` (:mod:`gradproj.optim.precision`), where torch's AdamW would keep bf16 moments.
    """
    method = spec.method
    if layerwise and not method.supports_layerwise:
        raise ValueError(f"--optimizer {method.name} cannot step layer-wise; use one of gradproj's own methods")
    low_precision = any(p.dtype in LOW_PRECISION for p in model.parameters())
    if method.peer and bf16_update != "nearest":
        raise ValueError(
            f"--bf16-update {bf16_update} needs one of gradproj's optimizers; --optimizer {method.name} rounds "
            "its own updates (use --bf16-update nearest)"
        )
    if method.peer and spec.refresh_offset != "aligned":
        raise ValueError(
            f"--refresh-offset {spec.refresh_offset} needs one of gradproj's optimizers; --optimizer {method.name} "
            "refreshes every matrix on the same step (use --refresh-offset aligned)"
        )
    if method.peer and spec.rank == AUTO_RANK:
        raise ValueError(
            f"--rank auto needs one of gradproj's optimizers; --optimizer {method.name} keeps one fixed rank "
            "(give --rank a number)"
        )
    if method.peer and spec.group_options().get("update_proj_gap") == AUTO:
        raise ValueError(
            f"--update-proj-gap auto needs one of gradproj's optimizers; --optimizer {method.name} refreshes on a "
            "fixed gap (give --update-proj-gap a number of steps)"
        )
    if method.peer and spec.policy_options():
        raise ValueError(
            f"--spike-policy {spec.spike_policy} needs one of gradproj's optimizers; --optimizer {method.name} "
            "reads its gradients as they are (use --spike-policy none, or the peer stable-spam-pytorch-optimizer)"
        )
    if method.kind == "lora":
        return lora_optimizer(model, spec, DEFAULT_RANK)
    if method.kind == "peer":
        return peer_optimizer(spec, _groups(model, spec, summary=False, names=False))
    if method.kind == "torch" and not layerwise and not low_precision and not spec.policy_options():
        groups = _groups(model, spec, summary=summary, names=False)
        # torch's fastest kernel where it has one (its own default on a CPU is the for-loop)
        kernel = {"fused": fused_adamw_supported([p for g in groups for p in g["params"]]), **method.constructor}
        return torch.optim.AdamW(groups, lr=spec.matrix_lr, weight_decay=spec.weight_decay, **kernel)
    if method.preset is None:  # a kernel variant of torch's AdamW (adamw+loop): torch's own, or nothing
        raise ValueError(
            f"--optimizer {method.name} is torch's AdamW with fixed kernel options, which keeps bf16 moments for "
            "bf16 weights; use --optimizer adamw (the engine's AdamW, float32 moments) for them"
        )
    groups = _groups(model, spec, summary=summary, names=True)
    preset = PRESETS[method.preset]
    options = {"bf16_update": bf16_update, "nonfinite": nonfinite, **spec.policy_options(), **method.constructor}
    return preset(groups, lr=spec.matrix_lr, weight_decay=spec.weight_decay, **options)


def _groups(model: nn.Module, spec: OptimizerSpec, *, summary: bool, names: bool) -> list[dict[str, Any]]:
    """[targeted matrices (with ``rank`` if projected), the rest], each with its learning rate."""
    options = spec.group_options() if spec.projected else {}
    groups = param_groups(model, target_modules=spec.target_modules, rank=spec.resolved_rank or 1, **options)
    if not spec.projected:
        del groups[0]["rank"]
    elif spec.resolved_rank == AUTO_RANK:
        groups[0]["state_budget"] = budget_bytes(spec, groups[0])
    groups[0]["lr"] = spec.matrix_lr
    for group in groups[1:]:
        group["lr"] = spec.rest_lr
    if summary:
        from .groups import format_summary

        preset = PRESETS[spec.method.preset] if spec.method.preset else None
        defaults = preset.projection_defaults() if preset is not None else {}
        shown = [{**defaults, **g} if "rank" in g else g for g in groups]  # the preset's rule and basis
        print(format_summary(shown, preset.RULE if preset is not None else "adam"))
    if not names:  # torch < 2.6 and the peers do not know the key
        for group in groups:
            group.pop("param_names", None)
    return groups


def budget_bytes(spec: OptimizerSpec, group: dict[str, Any]) -> int:
    """``spec.state_budget`` in bytes for the projected ``group``: as given, or its fraction of the state the
    method keeps at the fixed rank it names (``0.75x@128``; ``0.75x``: :data:`DEFAULT_RANK`).

    >>> import torch
    >>> from dataclasses import replace
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    >>> spec = OptimizerSpec(name="galore_adamw", rank="auto", state_budget="0.5x@8", target_modules="0")
    >>> group = _groups(model, spec, summary=False, names=False)[0]
    >>> group["state_budget"], budget_bytes(replace(spec, state_budget="1x@8"), group)  # (8*32 + 2*8*32) * 4
    (1536, 3072)
    """
    from .groups import state_bytes

    assert spec.budget is not None
    budget = parse_budget(spec.budget)
    if isinstance(budget, int):
        return budget
    fraction, rank = budget
    preset = PRESETS[spec.method.preset or "galore_adamw"]
    fixed = {**preset.projection_defaults(), **group, "rank": rank or DEFAULT_RANK}
    return int(fraction * sum(state_bytes(p, fixed, preset.RULE) for p in group["params"]))


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
