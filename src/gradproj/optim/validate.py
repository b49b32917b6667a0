"""Argument checks shared by every optimizer: each error names the value and the valid range."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..options import fraction, integer_at_least
from ..projection.projectors import PROJECTORS, SWITCHABLE, get_projector
from ..projection.sides import PROJ_TYPES
from ..rules import REGISTRY as RULE_REGISTRY
from ..rules import check_rule_options, make_rule
from ..rules.base import UpdateRule
from .features import check_projected as check_projected_keys
from .features import feature_conflict
from .features import sharding_blocker as feature_sharding_blocker
from .residual import SCALE_TYPES
from .residuals import RESIDUALS

ON_REFRESH = ("keep", "reset", "rotate")
NONFINITE = ("skip", "raise", "checked")


def _choice(key: str, value: Any, valid: Sequence[Any]) -> None:
    if value not in valid:
        raise ValueError(f"{key}={value!r} is not valid; expected one of {tuple(valid)}")


def _float_at_least(key: str, value: Any, low: float, *, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > low if strict else value >= low)
    if not ok:
        raise ValueError(f"{key}={value!r} is not valid; expected a number {'>' if strict else '>='} {low}")


def check_lr(lr: Any) -> None:
    """A number >= 0, or a 1-element tensor (as torch.optim's Adam and AdamW take it: ``torch.compile``d loops
    pass one, and a scheduler fills it in place)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or lr.is_complex() or lr.dtype == torch.bool:
            raise ValueError(
                f"lr={lr!r} is not valid; a Tensor lr must be 1-element and real (shape {tuple(lr.shape)} given)"
            )
        lr = float(lr)  # what every step reads (gradproj.rules.base.learning_rate)
    _float_at_least("lr", lr, 0.0)


def check_common(group: dict[str, Any]) -> None:
    """lr, weight_decay and (for Adam rules) betas/eps."""
    check_lr(group["lr"])
    _float_at_least("weight_decay", group["weight_decay"], 0.0)
    if "betas" in group:
        check_betas(group["betas"])
    if "eps" in group and not isinstance(group["eps"], (tuple, list)):
        _float_at_least("eps", group["eps"], 0.0)


def check_betas(betas: Any, *, lengths: tuple[int, ...] = (2,)) -> None:
    """``(beta1, beta2)``, each in [0, 1) (``lengths``: the tuple sizes the optimizer takes)."""
    if not (isinstance(betas, (tuple, list)) and len(betas) in lengths):
        what = " or ".join({2: "a pair (beta1, beta2)", 3: "(beta1, beta2, track_beta)"}[n] for n in lengths)
        raise ValueError(f"betas={betas!r} is not valid; expected {what}, each in [0, 1)")
    for i, beta in enumerate(betas):
        if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ValueError(f"betas[{i}]={beta!r} is not valid; expected a number in [0, 1)")


def check_projection(group: dict[str, Any], rule: UpdateRule | None = None) -> None:
    """Keys of a group that has ``rank`` (``rule``: the rule its ``R`` runs, when known): the step features'
    keys and what they refuse (:mod:`gradproj.optim.features`), then the projector's, side's and residual's."""
    check_projected_keys(group)
    _float_at_least("scale", group["scale"], 0.0, strict=True)
    _choice("proj_type", group["proj_type"], PROJ_TYPES)
    _choice("projector", group["projector"], PROJECTORS)
    _choice("on_refresh", group["on_refresh"], ON_REFRESH)
    _choice("residual", group["residual"], tuple(RESIDUALS))
    _choice("scale_type", group["scale_type"], SCALE_TYPES)
    _float_at_least("growth_limit", group["growth_limit"], 1.0)
    integer_at_least("oversample", group["oversample"], 0)
    integer_at_least("power_iters", group["power_iters"], 0)
    integer_at_least("seed", group["seed"], 0)
    _check_alice_keys(group)
    check_rule_options(group)  # every rule's own keys, through its options
    error = combination_error(group, rule)
    if error is not None:
        raise ValueError(error)


def _check_alice_keys(group: dict[str, Any]) -> None:
    """Switching, tracking, compensation, bias correction and the group's own rule."""
    for key in ("switching", "bias_correction", "nesterov"):
        if not isinstance(group[key], bool):
            raise ValueError(f"{key}={group[key]!r} is not valid; expected True or False")
    if group["leading_basis"] is not None:
        integer_at_least("leading_basis", group["leading_basis"], 1)
        if isinstance(group["rank"], int) and group["leading_basis"] > group["rank"]:
            raise ValueError(
                f"leading_basis={group['leading_basis']} exceeds rank={group['rank']}; a switching refresh keeps "
                "at most rank leading directions (use leading_basis <= rank, or None for 40/256 of the rank)"
            )
    fraction("track_beta", group["track_beta"])
    fraction("compensation_beta", group["compensation_beta"])
    _float_at_least("compensation_scale", group["compensation_scale"], 0.0)
    _float_at_least("muon_scale", group["muon_scale"], 0.0)
    if group["rule"] is not None:
        _choice("rule", group["rule"], tuple(RULE_REGISTRY))


def combination_error(group: dict[str, Any], rule: UpdateRule | None = None) -> str | None:
    """Why a projected group's options do not fit together, or None: what its rule refuses (``rule``, or the
    group's own ``rule`` key), then the projector, side and residual, then what its step features refuse
    (:func:`gradproj.optim.features.feature_conflict`). ``track_beta`` belongs to the eigh projector and others
    ignore it (Alice with ``projector="svd"`` is Alice-0 on an exact SVD basis).

    >>> from gradproj import Alice
    >>> print(combination_error({**Alice.projection_defaults(), "projector": "random"}))  # doctest: +ELLIPSIS
    switching=True needs a basis with leading directions; projector='random' has none (use one of ...)
    """
    projector = group["projector"]
    if rule is None and group["rule"] is not None:
        rule = make_rule(group["rule"])
    error = rule.conflict(group) if rule is not None else None
    if error is not None:  # first: the generic messages below would suggest options the rule refuses
        return error
    if group["switching"] and projector not in SWITCHABLE:
        return (
            f"switching=True needs a basis with leading directions; projector={projector!r} has none "
            f"(use one of {SWITCHABLE}, or switching=False)"
        )
    if group["proj_type"] == "full" and not get_projector(projector).two_sided:
        sides = "proj_type='full' projects both sides (use std/left/right)"
        return f"projector={projector!r} needs a one-sided basis; {sides}"
    return RESIDUALS[group["residual"]].conflict(group) or feature_conflict(group, rule)


def sharding_blocker(group: dict[str, Any], rule: UpdateRule) -> str | None:
    """Why this group cannot step FSDP2 row-sharded parameters yet, or None if it can."""
    if not rule.shardable:
        return f"the {rule.name} rule cannot step a block of rows alone: {rule.unshardable_because}"
    if "rank" not in group:
        return None
    blocker = feature_sharding_blocker(group)
    if blocker is not None:
        return blocker
    rotates = group["on_refresh"] == "rotate" and get_projector(group["projector"]).changes_basis
    if rule.rotation_unshardable_because is not None and rotates:
        return f"{rule.rotation_unshardable_because} (use on_refresh='keep')"
    return None


def check_real(p: Tensor, name: str) -> None:
    """Every rule steps real tensors: a complex parameter is refused when its group is added, not at its first step."""
    if p.is_complex():
        raise ValueError(
            f"{name} is {p.dtype}; gradproj's optimizers step real parameters only. Keep it as a real tensor "
            "(torch.view_as_real gives its (..., 2) layout, torch.view_as_complex turns it back inside the model)"
        )


def check_matrices(group: dict[str, Any], names: Sequence[str]) -> None:
    """A projected group holds 2-D matrices only (``names``: its parameters' names, for the message); a fixed
    rank above a matrix's smaller side is clipped to it, with one warning for the group."""
    clipped = []
    for p, name in zip(group["params"], names, strict=True):
        if p.dim() != 2:
            raise ValueError(
                f"{name} has shape {tuple(p.shape)}; a group with 'rank' takes 2-D weight "
                "matrices only. Put vectors, embeddings you do not want projected, conv kernels and "
                "3-D expert weights in a group without 'rank' (gradproj.param_groups does this for you)."
            )
        if isinstance(group["rank"], int) and group["rank"] > min(p.shape):
            clipped.append((name, tuple(p.shape)))
    if clipped:
        name, shape = clipped[0]
        ranks = sorted({min(shape) for _, shape in clipped})
        warn_at_caller(
            f"rank={group['rank']} exceeds the smaller side of {len(clipped)} of the group's {len(group['params'])} "
            f"matrices (e.g. {name}, {shape[0]}x{shape[1]}); each of them uses rank min(m, n) instead "
            f"({', '.join(map(str, ranks))})"
        )


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn with the first frame outside gradproj and torch as the place, so that the warning points at the
    user's line (an optimizer's groups are checked several calls deep inside torch's constructor)."""
    inside = (str(Path(__file__).parents[1]), str(Path(torch.__file__).parent))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    warnings.warn(message, category, stacklevel=level + 1)
