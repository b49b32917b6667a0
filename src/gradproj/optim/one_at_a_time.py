"""Stepping one parameter at a time, and what the engine keeps per parameter: the half of
:class:`~gradproj.optim.engine.ProjectedOptimizer` that layer-wise stepping (:mod:`gradproj.layerwise`) and
DDP's low-rank communication hook (:mod:`gradproj.distributed`) use, and the step's non-finite check.

Example:
    >>> import torch, gradproj
    >>> w = torch.nn.Parameter(torch.randn(8, 6))
    >>> opt = gradproj.GaLoreAdamW([{"params": [w], "rank": 2}], lr=1e-2)
    >>> opt.needs_full_gradient(w), opt.step_parameter(w, torch.randn(8, 6)), opt.needs_full_gradient(w)
    (True, True, False)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..projection.bases import Bases
from ..projection.sides import project_down, project_up
from .component import GradientPolicy
from .features import features_of, refresh_due
from .finite import first_nonfinite
from .persistence import Persistent
from .placement import Local, local
from .precision import compute_dtype, widen
from .residuals import RESIDUALS


@dataclass
class ParamRecord:
    """What the engine knows of one parameter beyond its state: derived from its group when it is added."""

    name: str  #: its name, or its place in the optimizer (``param_groups[i].params[j]``)
    seed_key: int  #: the name's CRC-32, mixed into its basis seed
    group: dict[str, Any]  #: its live group (a scheduler's lr)
    phase: int = 0  #: steps into each gap it refreshes at (:func:`~gradproj.optim.component.refresh_phases`)
    fast: bool = False  #: whether the batched fast path may step it
    costs: tuple[int, int] = (0, 0)  #: its state bytes at rank 1 and per rank (a planned-rank allocator's)
    placement: Local | None = None  #: where its matrix lives, once asked


class OneAtATime(Persistent):
    """One parameter's step and accessors; the engine provides the records, the state and the step itself."""

    nonfinite: str
    _records: dict[Tensor, ParamRecord]

    #: provided by the engine: the current basis, one parameter's step, a gradient policy on one gradient
    bases: Callable[[Tensor], Bases]
    _step_one: Callable[..., None]
    _transform: Callable[[Tensor, dict[str, Any], GradientPolicy, Tensor], None]

    def needs_full_gradient(self, p: Tensor) -> bool:
        """Whether ``p``'s next step needs its full gradient rather than ``project_gradient``'s output:
        groups without ``rank``, Fira/APOLLO residuals (they use ``G`` itself), refresh steps (the new
        basis is computed from ``G``) and the steps a step feature reads ``G`` on (a gradient policy rewrites
        its entries; a refresh schedule may measure it; a reparametrisation may step another tensor)."""
        group, state = self._records[p].group, self.state[p]
        if "rank" not in group or RESIDUALS[group["residual"]].reads_gradient or refresh_due(state, group):
            return True
        return any(feature.needs_full_gradient(state, group) for feature in features_of(group).gradient_readers)

    def project_gradient(self, p: Tensor, grad: Tensor) -> Tensor:
        """``down(grad)`` in ``p``'s current basis, in the step's dtype (float32 for bf16 weights); valid
        when :meth:`needs_full_gradient` is False. Linear, so projected micro-batch gradients can be
        summed instead of full ones."""
        wide = compute_dtype(p.dtype)
        return project_down(grad.to(wide), *(widen(b, wide) for b in self.bases(p)))

    def lift_gradient(self, p: Tensor, low: Tensor) -> Tensor:
        """``up(low)``: the full-shape gradient whose projection is ``low`` (no scale applied)."""
        return project_up(low, *(widen(b, low.dtype) for b in self.bases(p)))

    @torch.no_grad()
    def step_parameter(self, p: Tensor, grad: Tensor | None = None, *, low: Tensor | None = None) -> bool:
        """Step ``p`` alone with its full ``grad``, or with ``low = project_gradient(p, G)`` summed over
        micro-batches. Used by layer-wise (in-backward) stepping; ``step()`` is this for every
        parameter. A non-finite gradient skips ``p`` (returns False; nothing changes) or raises.
        """
        given = grad if low is None else low
        if given is None:
            raise ValueError("step_parameter needs grad or low")
        if not bool(torch.isfinite(given).all()):
            if self.nonfinite == "raise":
                raise FloatingPointError(f"non-finite gradient in {self._records[p].name}")
            return False
        name, group = self._records[p].name, self._records[p].group
        if "rank" not in group and low is not None:
            raise ValueError(f"{name} is not projected; pass its full gradient")
        if low is not None and grad is None and self.needs_full_gradient(p):
            raise ValueError(f"{name} needs its full gradient this step (see needs_full_gradient)")
        policy = features_of(group).policy
        if policy.transforms:  # low was projected from the gradient before the policy rewrote it
            if low is not None:
                raise ValueError(f"{name} has a gradient policy; pass its full gradient, not low")
            self._transform(p, group, policy, local(given))
        self._step_one(p, group, grad, low)
        return True

    def _gradients_are_finite(self) -> bool:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        bad_index = first_nonfinite(params)
        if bad_index is None:
            return True
        bad = self._records[params[bad_index]].name
        message = f"non-finite gradient in {bad}; the step was not applied (no weight or state changed)"
        if self.nonfinite == "raise":
            raise FloatingPointError(message)
        self.nonfinite_steps += 1
        warnings.warn(f"{message}; skipped steps so far: {self.nonfinite_steps}", RuntimeWarning, stacklevel=3)
        return False
