"""What a finished run says about itself (``summary.json``): its losses, evaluation, what the optimizer held
and did (state bytes, refreshes, allocated ranks, the gradient policy's totals), memory planned and measured.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..optim.placement import local_bytes
from .logs import allocated_ranks, basis_refreshes, gradient_policy, optimizer_state_bytes
from .progress import Progress

if TYPE_CHECKING:
    from .loop import Trainer


def run_summary(
    self: Trainer,
    model: nn.Module,
    progress: Progress,
    final: dict[str, float],
    losses: list[float],
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    """The summary of ``self``'s run: ``model`` trained for ``progress.step`` steps by ``optimizer``."""
    finite = [x for x in losses[-10:] if math.isfinite(x)]
    return {
        "run_dir": str(self.run_dir),
        "model_name": str(getattr(self.config, "model", None) or self.task.describe().get("model", "")),
        "parameters": sum(p.numel() for p in model.parameters()),
        "rank": self.rank,  # the rank the optimizer uses; None for the full-rank baselines
        "steps": progress.step,
        f"{self.task.unit}_seen": progress.seen,
        "skipped_steps": progress.skipped,
        "final_train_loss": sum(finite) / len(finite) if finite else math.nan,
        "final_train_loss_steps": len(finite),  # the steps of this session it averages (up to 10)
        "eval": final,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "basis_refreshes": basis_refreshes(optimizer),  # {"refreshes", "matrices"}, or None
        "allocated_ranks": allocated_ranks(optimizer, self.reference_rank),  # rank auto, or None
        "gradient_policy": gradient_policy(optimizer),  # {"clipped", "resets", "tensors"}, or None
        "layerwise": self.stepper is not None,
        # layer-wise: the most gradient bytes alive at once; standard: every gradient, held until the step
        "gradient_bytes": self.stepper.peak_gradient_bytes
        if self.stepper is not None
        else sum(local_bytes(p) for p in model.parameters() if p.requires_grad),
        "weight_bytes": sum(local_bytes(p) for p in model.parameters()),  # this rank's (a shard under --fsdp)
        "world_size": self.parallel.world,
        "global_batch": self.config.global_batch,
        **self.task.describe(),
        **({"dynamics": self.dynamics.summary()} if self.dynamics is not None else {}),
        "dtype": self.config.dtype,
        "bf16_update": self.config.weight_update if self.config.dtype == "bf16" else None,
        "memory": {
            "planned": self.planned,
            "measured": self.memory.measured if self.memory is not None else {},
            "measured_step": self.memory.step if self.memory is not None else None,
            "device": str(self.parallel.device(self.config.device)),
        },
    }
