"""The side-by-side line-up: every method of the registry (:mod:`gradproj.optim.registry`), ours and
the peers', built by :func:`gradproj.optim.build.build_optimizer` on the same parameter split.

Each method receives two learning rates (attention/MLP matrices, everything else), so every method,
peer or ours, gets the same per-group sweep. Peers are optional installs: a missing one is reported
by :func:`missing`, never fatal.

Example:
    >>> [m.name for m in lineup()][:3]
    ['adamw', 'adamw8bit', 'galore_adamw']
    >>> bench_spec(get_method("apollo_mini"), 3e-3, 1e-2, rank=64, gap=50).resolved_rank
    1
"""

from __future__ import annotations

import importlib
import warnings

from ..optim.build import OptimizerSpec
from ..optim.groups import ATTENTION_AND_MLP
from ..optim.registry import METHODS, Method, get_method

__all__ = ["Method", "bench_spec", "get_method", "lineup", "missing"]


def lineup() -> list[Method]:
    """Every registered method, in the registry's order."""
    return list(METHODS.values())


def bench_spec(method: Method, lr_m: float, lr_o: float, *, rank: int, gap: int) -> OptimizerSpec:
    """The options a bench run gives ``method``: its learning rates, the run's rank and refresh gap,
    the paper's targets (attention and MLP), everything else the method's own defaults."""
    return OptimizerSpec(
        name=method.name, lr=lr_m, other_lr=lr_o, rank=rank, update_proj_gap=gap, target_modules=ATTENTION_AND_MLP
    )


def missing(method: Method) -> str | None:
    """Why a method cannot run here (its peer does not import), or None if it can."""
    module = method.module()
    if module is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(module)
    except Exception as error:  # a peer may fail on import for reasons of its own (missing deps, CUDA)
        return f"{module} does not import ({type(error).__name__}: {error})".splitlines()[0][:200]
    return None
