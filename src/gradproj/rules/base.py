"""The interface every update rule implements.

A rule sees only the (possibly projected) gradient. It owns its moment tensors in the
per-parameter state and returns a *direction* ``u`` and a *step size* ``s``; the optimizer
applies ``p -= s * up(u)`` (plus any residual term). ``moment_step`` counts the updates the
moments have seen, so that ``on_refresh="reset"`` restarts bias correction too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from .limiter import local_norm


class Rows(Protocol):
    """Sums over the rows of a matrix of which this process may hold only some rows (FSDP2 splits
    rows across processes; a placement, :mod:`gradproj.optim.placement`, implements this)."""

    def total(self, x: Tensor) -> Tensor:
        """``x``, a sum over this process's rows, summed over the rows every process holds."""
        ...

    def norm(self, x: Tensor, rows: bool) -> Tensor:
        """The Frobenius norm of a whole tensor of which this process holds ``x`` (its rows if ``rows``)."""
        ...

    def maximum(self, x: Tensor) -> Tensor:
        """``x``, a maximum over this process's rows, maximized over the rows every process holds."""
        ...

    def whole(self, x: Tensor, rows: int, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """This process's rows of ``fn`` of the whole ``rows``-row matrix of which it holds ``x``."""
        ...


class AllRows:
    """Every row is on this process: sums are already whole."""

    def total(self, x: Tensor) -> Tensor:
        return x

    def norm(self, x: Tensor, rows: bool) -> Tensor:
        return local_norm(x, rows)

    def maximum(self, x: Tensor) -> Tensor:
        return x

    def whole(self, x: Tensor, rows: int, fn: Callable[[Tensor], Tensor]) -> Tensor:
        return fn(x)


ALL_ROWS = AllRows()


def learning_rate(group: dict[str, Any]) -> float:
    """The group's ``lr`` as a Python number: torch.optim takes a number or a 1-element tensor (which a
    ``torch.compile``d loop passes and a scheduler fills in place), so it is read afresh at every step.

    >>> learning_rate({"lr": 0.1}), learning_rate({"lr": torch.tensor([0.5])})
    (0.1, 0.5)
    """
    lr = group["lr"]
    return float(lr) if isinstance(lr, Tensor) else lr


class UpdateRule:
    """Base class; see :class:`gradproj.rules.adam.Adam` for the canonical implementation."""

    name = ""
    #: whether a process may step a block of rows alone (FSDP2): elementwise rules, or rules whose sums
    #: over rows go through :class:`Rows`
    shardable = True
    #: what the rule reads across rows, for the error that refuses it a row split (when not shardable)
    unshardable_because = "it averages over whole rows and columns"
    #: state keys every process keeps whole and equal under a row split (per-column statistics); the
    #: other tensors are split by rows like the moments
    replicated_state: tuple[str, ...] = ()
    #: whether the rule reads the group's ``rank`` itself (COSMOS keeps its own basis; with the identity
    #: projector, the rank is otherwise unused)
    uses_rank = False
    #: whether the engine's batched fast path has this rule's step (:mod:`gradproj.optim.fast`: Adam's)
    fast_kernel = False
    #: why the rule cannot step FSDP2 rows when the basis rotates its state (None: it can)
    rotation_unshardable_because: str | None = None
    #: state keys stored as 8-bit codes (``<key>_codes`` and ``<key>_absmax``) and whether their map is signed:
    #: what a checkpoint re-sharded to another world size quantizes again
    quantized: dict[str, bool] = {}  # noqa: RUF012 (read-only)
    #: the frozen dataclass of the group keys this rule reads beyond Adam's (None: none); its defaults join
    #: every projected group's (:data:`gradproj.optim.defaults.PROJECTION_DEFAULTS`) and it validates them
    options_type: type | None = None

    def conflict(self, group: dict[str, Any]) -> str | None:
        """Why a projected ``group`` running this rule has options the rule does not take, or None."""
        return None

    def relative_step(self, group: dict[str, Any]) -> bool:
        """Whether the step size this rule computes for ``group`` is relative to the weight's scale rather than
        the group's ``lr`` alone (Adafactor's ``relative_step``); decoupled decay then runs at that step size."""
        return False

    def init_state(
        self, state: dict[str, Any], shape: tuple[int, ...], like: Tensor, full_shape: tuple[int, ...] | None = None
    ) -> None:
        """Create zeroed moments for a gradient of ``shape`` (dtype/device of ``like``); ``full_shape`` is
        the whole moment's when ``shape`` is one process's rows of it (FSDP2)."""
        raise NotImplementedError

    def direction(
        self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], param: Tensor, rows: Rows = ALL_ROWS
    ) -> tuple[Tensor, float]:
        """Advance the moments with ``grad``; return ``(u, step_size)``. ``grad`` may be this process's
        rows of a whole gradient; ``rows`` completes sums over rows."""
        raise NotImplementedError

    def whole_input(
        self, grad: Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]] | None:
        """The matrix of which the next :meth:`direction` takes a function of the whole (``rows.whole``), and that
        function, computed without advancing any state; None for a rule that reads no whole matrix. FSDP2 computes
        it ahead for several matrices at once, each on another rank (:mod:`gradproj.optim.spread_whole`)."""
        return None

    def apply_full(
        self, param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any], rows: Rows = ALL_ROWS
    ) -> None:
        """Full-rank update ``param -= step_size * u`` (rules may fuse it)."""
        u, step_size = self.direction(grad, state, group, param, rows)
        param.add_(u.to(param.dtype), alpha=-step_size)

    def moments(self, state: dict[str, Any]) -> dict[str, Tensor]:
        """Dense float views of the moments (``first`` and/or ``second``) for basis rotation."""
        raise NotImplementedError

    def set_moments(self, state: dict[str, Any], moments: dict[str, Tensor]) -> None:
        """Store dense moments back (the inverse of :meth:`moments`)."""
        raise NotImplementedError

    def reset(self, state: dict[str, Any]) -> None:
        """Zero the moments and restart bias correction."""
        self.set_moments(state, {k: torch.zeros_like(v) for k, v in self.moments(state).items()})
        state["moment_step"] = 0

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any] | None = None) -> int:
        """Bytes of state the rule keeps for a gradient of ``shape`` (exact); ``group``: the parameter's group,
        for rules whose state depends on its options (COSMOS's rank)."""
        raise NotImplementedError
