"""Argument checks shared by every optimizer: each error names the value and the valid range."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..projection.projectors import PROJECTORS
from ..projection.sides import PROJ_TYPES
from .residual import RESIDUALS, SCALE_TYPES

ON_REFRESH = ("keep", "reset", "rotate")
NONFINITE = ("skip", "raise")


def _choice(key: str, value: Any, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"{key}={value!r} is not valid; expected one of {tuple(valid)}")


def _int_at_least(key: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key}={value!r} is not valid; expected an integer >= {low}")


def _float_at_least(key: str, value: Any, low: float, *, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > low if strict else value >= low)
    if not ok:
        raise ValueError(f"{key}={value!r} is not valid; expected a number {'>' if strict else '>='} {low}")


def check_common(group: dict[str, Any]) -> None:
    """lr, weight_decay and (for Adam rules) betas/eps."""
    if group.get("lr") is not None:
        _float_at_least("lr", group["lr"], 0.0)
    _float_at_least("weight_decay", group["weight_decay"], 0.0)
    if "betas" in group:
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas={betas!r} is not valid; expected a pair (beta1, beta2) in [0, 1)")
        for i, beta in enumerate(betas):
            if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
                raise ValueError(f"betas[{i}]={beta!r} is not valid; expected a number in [0, 1)")
    if "eps" in group and not isinstance(group["eps"], (tuple, list)):
        _float_at_least("eps", group["eps"], 0.0)


def check_projection(group: dict[str, Any]) -> None:
    """Keys of a group that has ``rank``."""
    _int_at_least("rank", group["rank"], 1)
    _int_at_least("update_proj_gap", group["update_proj_gap"], 1)
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
