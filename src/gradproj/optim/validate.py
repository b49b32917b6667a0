"""Argument checks shared by every optimizer: each error names the value and the valid range."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..projection.projectors import PROJECTORS, SWITCHABLE, get_projector
from ..projection.sides import PROJ_TYPES
from ..rules import RULES
from ..rules.base import UpdateRule
from .adaptive import AUTO
from .ranks import AUTO_RANK, RANKED_PROJECTORS, auto_rank
from .residual import RESIDUALS, SCALE_TYPES
from .weight_norm import RULES as WEIGHT_NORM_RULES

ON_REFRESH = ("keep", "reset", "rotate")
NONFINITE = ("skip", "raise", "checked")


def _choice(key: str, value: Any, valid: Sequence[Any]) -> None:
    if value not in valid:
        raise ValueError(f"{key}={value!r} is not valid; expected one of {tuple(valid)}")


def _int_at_least(key: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key}={value!r} is not valid; expected an integer >= {low}")


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


def check_projection(group: dict[str, Any], rule: str | None = None) -> None:
    """Keys of a group that has ``rank`` (``rule``: the name of the rule its ``R`` runs, when known)."""
    check_rank(group)
    check_gap(group)
    _check_refresh_offset(group["refresh_offset"], group["update_proj_gap"])
    _float_at_least("scale", group["scale"], 0.0, strict=True)
    _choice("proj_type", group["proj_type"], PROJ_TYPES)
    _choice("projector", group["projector"], PROJECTORS)
    _choice("on_refresh", group["on_refresh"], ON_REFRESH)
    _choice("residual", group["residual"], RESIDUALS)
    _choice("scale_type", group["scale_type"], SCALE_TYPES)
    _float_at_least("growth_limit", group["growth_limit"], 1.0)
    _int_at_least("oversample", group["oversample"], 0)
    _int_at_least("power_iters", group["power_iters"], 0)
    _int_at_least("seed", group["seed"], 0)
    _check_alice_keys(group)
    _check_combination(group)
    if rule is not None and group["weight_norm"] and rule not in WEIGHT_NORM_RULES:
        raise ValueError(
            f"weight_norm=True steps each row's magnitude with Adam's betas and eps; the {rule} rule has none "
            f"(use one of {WEIGHT_NORM_RULES}: GradNormLoRP, GradNormLoRP8bit)"
        )


def check_rank(group: dict[str, Any]) -> None:
    """``rank`` (an int >= 1, or ``"auto"``) and the energy-allocated ranks' keys (:mod:`gradproj.optim.ranks`)."""
    rank = group["rank"]
    if rank != AUTO_RANK and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank={rank!r} is not valid; expected an integer >= 1 or {AUTO_RANK!r}")
    _int_at_least("max_rank", group["max_rank"], 1)
    target = group["energy_target"]
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
        raise ValueError(
            f"energy_target={target!r} is not valid; expected a number in (0, 1]: the share of its gradient's energy "
            "beyond which a matrix takes no more rank"
        )
    budget = group["state_budget"]
    if rank == AUTO_RANK and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(
            f"state_budget={budget!r} is not valid; rank='auto' needs the bytes of optimizer state its matrices may "
            "hold together, an integer >= 1"
        )


def check_gap(group: dict[str, Any]) -> None:
    """``update_proj_gap`` (an int >= 1, or ``"auto"``) and the adaptive refresh's keys."""
    gap = group["update_proj_gap"]
    if gap != AUTO and (isinstance(gap, bool) or not isinstance(gap, int) or gap < 1):
        raise ValueError(f"update_proj_gap={gap!r} is not valid; expected an integer >= 1 or {AUTO!r}")
    _int_at_least("min_gap", group["min_gap"], 1)
    _int_at_least("max_gap", group["max_gap"], 1)
    if group["min_gap"] > group["max_gap"]:
        raise ValueError(
            f"min_gap={group['min_gap']} > max_gap={group['max_gap']}; an adaptive refresh waits at least min_gap "
            "and at most max_gap steps (use min_gap <= max_gap)"
        )
    _int_at_least("check_every", group["check_every"], 1)
    threshold = group["energy_threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise ValueError(
            f"energy_threshold={threshold!r} is not valid; expected a number in (0, 1): the share of the fresh "
            "basis' captured energy below which a matrix refreshes"
        )
    if gap == AUTO and group["refresh_offset"] != 0:
        raise ValueError(
            f"refresh_offset={group['refresh_offset']!r} applies to a fixed update_proj_gap; with 'auto' each "
            "matrix refreshes on its own signal (use refresh_offset=0)"
        )


def _check_refresh_offset(offset: Any, gap: int | str) -> None:
    if not isinstance(gap, int):
        return  # "auto": checked with the gap
    valid = isinstance(offset, int) and not isinstance(offset, bool) and 0 <= offset < gap
    if offset != "staggered" and not valid:
        raise ValueError(
            f"refresh_offset={offset!r} is not valid; expected 'staggered' or an int in [0, update_proj_gap={gap})"
        )


def _fraction(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{key}={value!r} is not valid; expected a number in [0, 1)")


def _check_alice_keys(group: dict[str, Any]) -> None:
    """Switching, tracking, compensation, bias correction and the group's own rule."""
    for key in ("switching", "bias_correction", "nesterov", "weight_norm"):
        if not isinstance(group[key], bool):
            raise ValueError(f"{key}={group[key]!r} is not valid; expected True or False")
    if group["leading_basis"] is not None:
        _int_at_least("leading_basis", group["leading_basis"], 1)
        if group["rank"] != AUTO_RANK and group["leading_basis"] > group["rank"]:
            raise ValueError(
                f"leading_basis={group['leading_basis']} exceeds rank={group['rank']}; a switching refresh keeps "
                "at most rank leading directions (use leading_basis <= rank, or None for 40/256 of the rank)"
            )
    _fraction("track_beta", group["track_beta"])
    _fraction("compensation_beta", group["compensation_beta"])
    _float_at_least("compensation_scale", group["compensation_scale"], 0.0)
    _float_at_least("muon_scale", group["muon_scale"], 0.0)
    if group["rule"] is not None:
        _choice("rule", group["rule"], RULES)


def combination_error(group: dict[str, Any]) -> str | None:
    """Why a projected group's options do not fit together, or None. ``track_beta`` belongs to the eigh
    projector and others ignore it (Alice with ``projector="svd"`` is Alice-0 on an exact SVD basis).

    >>> from gradproj import Alice
    >>> print(combination_error({**Alice.projection_defaults(), "projector": "random"}))  # doctest: +ELLIPSIS
    switching=True needs a basis with leading directions; projector='random' has none (use one of ...)
    """
    projector = group["projector"]
    if group["rule"] == "cosmos":  # first: the generic messages below would suggest projectors it refuses
        return _cosmos_error(group)
    if group["switching"] and projector not in SWITCHABLE:
        return (
            f"switching=True needs a basis with leading directions; projector={projector!r} has none "
            f"(use one of {SWITCHABLE}, or switching=False)"
        )
    if group["proj_type"] == "full" and (projector == "eigh" or group["residual"] == "alice"):
        what = "projector='eigh'" if projector == "eigh" else "residual='alice'"
        return f"{what} needs a one-sided basis; proj_type='full' projects both sides (use std/left/right)"
    if group.get("update_proj_gap") == AUTO and projector == "identity":
        return "update_proj_gap='auto' refreshes a basis that keeps too little; projector='identity' keeps all of G"
    if group.get("rank") == AUTO_RANK:
        error = _auto_rank_error(group)
        if error is not None:
            return error
    if group["residual"] == "alice" and projector == "identity":
        return "residual='alice' compensates what a basis discards; projector='identity' discards nothing"
    if group["weight_norm"]:
        return _weight_norm_error(group)
    return None


def _weight_norm_error(group: dict[str, Any]) -> str | None:
    """GradNormLoRP is GaLore on the direction of a weight-normalised matrix: no residual policy on it, and no
    ranks planned from ``G`` (the direction has its own gradient)."""
    if group["residual"] != "none":
        return (
            f"weight_norm=True runs GaLore's step on each row's direction; residual={group['residual']!r} on the "
            "direction is not built (use residual='none')"
        )
    if group.get("rank") == AUTO_RANK:
        return (
            "weight_norm=True is not supported with rank='auto' (its ranks are planned from G, not from the "
            "direction's gradient; use an integer rank)"
        )
    return None


def _cosmos_error(group: dict[str, Any]) -> str | None:
    """The cosmos rule keeps its own one-sided basis of a fixed rank and steps the whole matrix."""
    if group["projector"] != "identity":
        return (
            f"rule='cosmos' tracks its own basis and steps all of G; projector={group['projector']!r} would "
            "project G first (use projector='identity')"
        )
    if group.get("rank") == AUTO_RANK:
        return "rule='cosmos' keeps a basis of a fixed rank; rank='auto' is not supported (use an integer rank)"
    if group.get("update_proj_gap") == AUTO or group["switching"]:
        what = "update_proj_gap='auto'" if group.get("update_proj_gap") == AUTO else "switching=True"
        return f"rule='cosmos' moves its basis by one QR every step; {what} does not apply (leave it unset)"
    if group["proj_type"] == "full":
        return "rule='cosmos' needs a one-sided basis; proj_type='full' projects both sides (use std/left/right)"
    if group["residual"] != "none":
        return (
            f"rule='cosmos' handles the rest of the momentum itself (Muon); residual={group['residual']!r} "
            "would add a second one (use residual='none')"
        )
    return None


def _auto_rank_error(group: dict[str, Any]) -> str | None:
    """What ``rank="auto"`` does not take yet: a basis whose directions are not ordered by energy, two-sided
    bases, switching, and residual policies with state shaped by the rank."""
    if group["projector"] not in RANKED_PROJECTORS:
        return (
            f"rank='auto' takes a prefix of a basis ordered by captured energy; projector={group['projector']!r} "
            f"has no such order (use one of {RANKED_PROJECTORS})"
        )
    if group["proj_type"] == "full":
        return "rank='auto' allocates one rank per matrix; proj_type='full' projects both sides (use std/left/right)"
    if group["switching"]:
        return "rank='auto' keeps the leading directions; switching=True draws some at random (use switching=False)"
    if group["residual"] not in ("none", "fira"):
        return f"rank='auto' supports residual 'none' and 'fira'; residual={group['residual']!r} is not supported yet"
    return None


def _check_combination(group: dict[str, Any]) -> None:
    error = combination_error(group)
    if error is not None:
        raise ValueError(error)


def sharding_blocker(group: dict[str, Any], rule: UpdateRule) -> str | None:
    """Why this group cannot step FSDP2 row-sharded parameters yet, or None if it can."""
    if not rule.shardable:
        return f"the {rule.name} rule cannot step a block of rows alone: {rule.unshardable_because}"
    if "rank" not in group:
        return None
    if group["rank"] == AUTO_RANK:
        return "rank='auto' allocates ranks across the whole group on one process"
    if group.get("weight_norm"):
        return "weight_norm=True rebuilds each matrix from its rows' magnitudes on one process"
    rotates = group["on_refresh"] == "rotate" and get_projector(group["projector"]).changes_basis
    if rule.name == "racs" and rotates:
        return "the racs rule refits its row and column scalings from all rows at a rotation (use on_refresh='keep')"
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
        if not auto_rank(group) and group["rank"] > min(p.shape):
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
