"""Layer-wise (in-backward) updates: each parameter is stepped as soon as its gradient is ready
and its gradient is freed at once, so gradients never occupy more than about one layer.

It is still one optimizer: :func:`attach_layerwise` hooks a gradproj optimizer to its parameters;
LR schedulers, ``state_dict`` and checkpoints work unchanged, and ``optimizer.step()`` becomes a
no-op (every parameter was already stepped during ``backward``).

Gradient accumulation (``grad_accum=k``): call ``backward`` k times per step. A projected
parameter between refreshes keeps only its *low-rank* gradient ``P^T G`` (r x n) across the
micro-batches (projection is linear, so the sum of projections is the projection of the sum) and
steps on the last one. Three cases keep the full gradient in ``.grad`` across micro-batches
instead, exactly as standard accumulation does: a **refresh step** (the new basis is computed
from the full ``G``, so on those steps gradient memory is the standard one), groups without
``rank`` (embeddings, norms, head), and Fira/APOLLO (their residual uses ``G`` itself).
Either way k micro-batches of size b give the update of one batch of size k*b.

Clipping (``max_grad_norm``): a parameter is stepped before later gradients exist, so the global
norm of *this* step is not known when it is needed. We use the best bound available then: the
gradient in hand is multiplied by ``min(1, max_grad_norm / max(norm_{t-1}, running_t))``, where
``norm_{t-1}`` is the global norm of the previous step and ``running_t`` the norm of this step's
gradients seen so far, this one included (in backward order, the head first). So a parameter is
never clipped less than the previous step's norm asks, a spike is clipped from the layer where
it appears onward, and no parameter's clipped gradient exceeds ``max_grad_norm``. Norms are of
the gradients each step actually used: the full gradient where one was kept, the low-rank
``P^T G`` otherwise (its norm is at most ``||G||``). ``norm_{t-1}`` lives in the optimizer's
state dict, so resume stays exact, and each step's global norm is reported as ``grad_norm``.
With ``max_grad_norm=None`` nothing is scaled and the maths equals the standard step's.

Non-finite gradients: a parameter whose gradient holds NaN/Inf is skipped (nothing of it
changes) and counted in ``skipped_parameters`` (and in ``last_step_skipped`` for the step that
just completed); parameters stepped earlier in the same backward keep their update. Check the
loss before ``backward`` (the trainer does) and call :meth:`LayerwiseStepper.discard` to drop a
step whose loss is not finite.

Example:
    >>> import torch, gradproj
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    >>> opt = gradproj.GaLoreAdamW(gradproj.param_groups(model, target_modules=["0"], rank=2), lr=1e-2)
    >>> stepper = gradproj.attach_layerwise(opt, grad_accum=2)
    >>> before = model[0].weight.clone()
    >>> for _ in range(2):
    ...     model(torch.randn(4, 8)).square().mean().backward()
    >>> bool((model[0].weight != before).any()), model[0].weight.grad is None
    (True, True)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .optim.engine import ProjectedOptimizer
from .optim.ranks import auto_rank

#: key of the previous step's gradient norm in ``optimizer.extra_state``
NORM_KEY = "layerwise_grad_norm"


class LayerwiseStepper:
    """Steps ``optimizer``'s parameters inside ``backward``; see the module docstring."""

    def __init__(
        self,
        optimizer: ProjectedOptimizer,
        *,
        grad_accum: int = 1,
        max_grad_norm: float | None = None,
        hooks: bool = True,
    ) -> None:
        if not isinstance(optimizer, ProjectedOptimizer):
            raise TypeError(
                f"layer-wise updates need a gradproj optimizer, got {type(optimizer).__name__}; "
                "for AdamW use gradproj.GaLoreAdamW with groups without 'rank' (it is torch's AdamW bit for bit)"
            )
        if not isinstance(grad_accum, int) or grad_accum < 1:
            raise ValueError(f"grad_accum={grad_accum!r} must be an integer >= 1")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r} must be > 0, or None for no clipping")
        if optimizer.layerwise is not None:
            raise RuntimeError("this optimizer already steps layer-wise; detach() the other stepper first")
        if any(auto_rank(group) for group in optimizer.param_groups):
            raise ValueError(
                "rank='auto' allocates the ranks of a group's matrices together on a refresh step, which "
                "layer-wise updates (one matrix at a time inside backward) cannot do yet; use an integer rank, "
                "or step after backward"
            )
        if not hooks and grad_accum != 1:
            raise ValueError("without hooks (under DDP) accumulate with DistributedDataParallel.no_sync()")
        self.optimizer, self.grad_accum, self.max_grad_norm = optimizer, grad_accum, max_grad_norm
        self.micro_batch = 0  # backward passes completed in the current step
        self.skipped_parameters = 0  # over the stepper's life
        self.last_step_skipped = 0  # in the last completed step
        self._skipped_now = 0  # in the step under way
        self.grad_norm = math.nan  # global norm of the last completed step
        self._low: dict[Tensor, Tensor] = {}
        self._kept: set[Tensor] = set()  # parameters whose full .grad accumulates across micro-batches
        self._held = 0  # bytes of gradients held between hooks (kept .grad and low-rank sums)
        #: most gradient bytes alive at once in any hook (held ones plus the one just computed)
        self.peak_gradient_bytes = 0
        self._square_sum = 0.0
        self._end_queued = False
        self._handles = [
            p.register_post_accumulate_grad_hook(self._on_gradient)
            for group in optimizer.param_groups
            for p in group["params"]
            if p.requires_grad and hooks
        ]
        optimizer.layerwise = self

    # -- hooks ------------------------------------------------------------------------------
    def _queue_end_of_backward(self) -> None:
        if not self._end_queued:  # once per backward: learn when it ends
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._end_queued = True

    def _on_gradient(self, p: Tensor) -> None:
        self._queue_end_of_backward()
        assert p.grad is not None
        fresh = 0 if p in self._kept else _nbytes(p.grad)
        self.peak_gradient_bytes = max(self.peak_gradient_bytes, self._held + fresh)
        if self.micro_batch < self.grad_accum - 1:
            if not self.optimizer.needs_full_gradient(p):  # keep r x n, free m x n now
                with torch.no_grad():
                    low = self.optimizer.project_gradient(p, p.grad)
                    if p in self._low:
                        self._low[p].add_(low)
                    else:
                        self._low[p] = low
                        self._held += _nbytes(low)
                p.grad = None
            elif p not in self._kept:
                self._kept.add(p)
                self._held += fresh
            return
        self._step(p, p.grad)
        p.grad = None

    def step_gradient(self, p: Tensor, grad: Tensor) -> None:
        """Step ``p`` now with ``grad`` (an all-reduced gradient, from a DDP communication hook;
        see :mod:`gradproj.distributed`). Must be called inside ``backward``."""
        self._queue_end_of_backward()
        self.peak_gradient_bytes = max(self.peak_gradient_bytes, _nbytes(grad))
        self._step(p, grad)

    @torch.no_grad()
    def _step(self, p: Tensor, grad: Tensor | None) -> None:
        assert grad is not None
        if p in self._kept:
            self._kept.remove(p)
            self._held -= _nbytes(grad)
        low = self._low.pop(p, None)
        if low is not None:
            self._held -= _nbytes(low)
            low = low.add_(self.optimizer.project_gradient(p, grad))
            grad = None
        used = grad if low is None else low
        assert used is not None
        wide = torch.promote_types(used.dtype, torch.float32)  # bf16 squares would lose the norm
        self._square_sum += float(torch.linalg.vector_norm(used, dtype=wide)) ** 2
        coefficient = self.clip_coefficient()
        if coefficient < 1.0:
            used.mul_(coefficient)  # the gradient is ours to scale: it is freed right after
        applied = self.optimizer.step_parameter(p, grad, low=low)
        self.skipped_parameters += not applied
        self._skipped_now += not applied

    def _end_of_backward(self) -> None:
        self._end_queued = False
        self.micro_batch += 1
        if self.micro_batch < self.grad_accum:
            return
        self.grad_norm = math.sqrt(self._square_sum)
        self.optimizer.extra_state[NORM_KEY] = self.grad_norm
        self.last_step_skipped, self._skipped_now = self._skipped_now, 0
        self._square_sum, self.micro_batch = 0.0, 0

    # -- public -----------------------------------------------------------------------------
    def clip_coefficient(self) -> float:
        """What the gradient in hand is multiplied by: ``min(1, max_grad_norm / max(previous step's
        norm, norm of this step's gradients so far))`` (the module docstring says why)."""
        if self.max_grad_norm is None:
            return 1.0
        previous = float(self.optimizer.extra_state.get(NORM_KEY, 0.0))
        reference = max(previous if math.isfinite(previous) else 0.0, math.sqrt(self._square_sum))
        return min(1.0, self.max_grad_norm / (reference + 1e-6))

    def discard(self) -> None:
        """Drop the current step's accumulated gradients (e.g. a micro-batch's loss was not finite)."""
        self._low.clear()
        self._kept.clear()
        self._held = 0
        self.optimizer.zero_grad(set_to_none=True)
        self._square_sum, self.micro_batch, self._skipped_now = 0.0, 0, 0

    def detach(self) -> None:
        """Remove the hooks and give the optimizer its ordinary ``step`` back."""
        for handle in self._handles:
            handle.remove()
        self.optimizer.layerwise = None


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def attach_layerwise(
    optimizer: ProjectedOptimizer, *, grad_accum: int = 1, max_grad_norm: float | None = None
) -> LayerwiseStepper:
    """Step ``optimizer``'s parameters during ``backward`` (see :mod:`gradproj.layerwise`).

    Call ``backward`` ``grad_accum`` times per optimizer step; ``optimizer.step()`` is then a
    no-op and may stay in the loop. ``max_grad_norm`` clips with the previous step's global norm.
    """
    return LayerwiseStepper(optimizer, grad_accum=grad_accum, max_grad_norm=max_grad_norm)
