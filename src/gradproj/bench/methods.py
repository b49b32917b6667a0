"""The side-by-side line-up: every method of the registry (:mod:`gradproj.optim.registry`), ours and
the peers', each trained by the trainer, whose :func:`gradproj.optim.build.build_optimizer` gives
them all the same parameter split.

Each method receives two learning rates (attention/MLP matrices, everything else), so every method,
peer or ours, gets the same per-group sweep. Peers are optional installs: a missing one is reported
by :func:`missing`, never fatal.

Example:
    >>> [m.name for m in lineup()][:3]
    ['adamw', 'adamw8bit', 'galore_adamw']
    >>> missing(get_method("galore_adamw")) is None  # ours always run
    True
"""

from __future__ import annotations

import importlib
import warnings

from ..optim.registry import METHODS, Method, get_method

__all__ = ["Method", "get_method", "lineup", "missing"]


def lineup() -> list[Method]:
    """Every registered method, in the registry's order."""
    return list(METHODS.values())


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
