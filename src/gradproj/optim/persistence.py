"""What an optimizer of the engine saves, loads and copies, beside torch's own ``state_dict``.

* ``state_dict()`` is torch's plus ``{"gradproj": {"nonfinite_steps": n, **extra_state}}``: tensors and
  plain numbers only, so it loads with ``torch.load(weights_only=True)``; ``load_state_dict`` keeps every
  saved tensor's dtype (torch would cast floating state to the parameter's dtype: float32 quantization
  scales of bf16 weights would round) and points the engine's tables at the group dicts torch rebuilt, so
  that a scheduler's edits reach the step.
* ``copy.deepcopy`` and ``pickle`` keep torch's ``defaults``, ``state`` and ``param_groups`` (torch keeps only
  these) and the optimizer's own settings and counters (``foreach``, ``nonfinite``, ``nonfinite_steps``,
  ``extra_state``, a preset's own options); torch's hooks are not kept (as torch does not keep them), the
  tables derived from the groups (``_DERIVED``) are rebuilt, and a copy has no layer-wise stepper or probe
  attached: those act on the original's parameters.

Example:
    >>> import copy, torch, gradproj
    >>> w = torch.nn.Parameter(torch.randn(8, 6))
    >>> opt = gradproj.GaLoreAdamW([{"params": [w], "rank": 2}], lr=0.1, foreach=False)
    >>> opt.nonfinite_steps = 3
    >>> twin = copy.deepcopy(opt)
    >>> twin.foreach, twin.nonfinite_steps, twin.state_dict()["gradproj"]
    (False, 3, {'nonfinite_steps': 3})
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, ClassVar

from torch import Tensor
from torch.optim import Optimizer


class Persistent(Optimizer):
    """The saving, loading and copying half of :class:`~gradproj.optim.engine.ProjectedOptimizer` (see the
    module); the engine provides its tables' names (``_DERIVED``), ``_reset_derived`` and ``_index_group``."""

    #: attributes a copy does not carry: rebuilt from the groups by ``_reset_derived`` and ``_index_group``
    _DERIVED: ClassVar[tuple[str, ...]] = ()
    nonfinite_steps: int
    extra_state: dict[str, float | int]
    _basis_cache: dict[Tensor, Any]

    def _reset_derived(self) -> None:
        raise NotImplementedError

    def _index_group(self, group: dict[str, Any], index: int) -> None:
        raise NotImplementedError

    def _point_at_groups(self) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``{"gradproj": {"nonfinite_steps": n, **extra_state}}``; plain data only."""
        state = super().state_dict()
        state["gradproj"] = {"nonfinite_steps": self.nonfinite_steps, **self.extra_state}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like torch does, but keep every saved tensor's dtype (torch would cast
        floating state to the parameter dtype, e.g. float32 quantization scales to bf16)."""
        state_dict = dict(state_dict)
        extra = dict(state_dict.pop("gradproj", {}))
        super().load_state_dict(state_dict)
        # torch rebuilt the group dicts: point each parameter at its live group (lr from schedulers)
        self._point_at_groups()
        self.nonfinite_steps = int(extra.pop("nonfinite_steps", 0))
        self.extra_state = dict(extra)
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
        self._basis_cache.clear()

    # ------------------------------------------------------------------------------------ copies, pickles
    def __getstate__(self) -> dict[str, Any]:
        kept = {k: v for k, v in self.__dict__.items() if k not in self._DERIVED and not k.startswith("_optimizer_")}
        return {**kept, **super().__getstate__()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict also ends here, with the loaded state and groups only: the parameters, their
        # tables and the attached helpers stay (load_state_dict points the tables at the new groups); a copy or
        # an unpickled optimizer (whose state holds the defaults too) rebuilds its tables
        copied = "defaults" in state
        super().__setstate__(state)
        if copied:
            self._reset_derived()
            with warnings.catch_warnings():  # the original warned about its groups already
                warnings.simplefilter("ignore")
                for index, group in enumerate(self.param_groups):
                    self._index_group(group, index)
