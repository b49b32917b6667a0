"""Optimizers by name for the trainer: every gradproj preset plus the AdamW baselines, with the
learning rates and scales we measured (docs/BENCHMARKS.md) as defaults.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16))
    >>> spec = OptimizerSpec(name="galore_adamw", rank=4, target_modules="1")
    >>> type(build_optimizer(model, spec)).__name__
    'GaLoreAdamW'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..optim import APOLLOAdamW, FiraAdamW, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, param_groups


@dataclass(frozen=True)
class Recipe:
    """How a name becomes an optimizer, and its defaults."""

    cls: Callable[..., torch.optim.Optimizer]
    lr: float  # projected matrices (attention/MLP)
    other_lr: float  # embeddings, norms, head
    scale: float | None = None
    group_options: tuple[tuple[str, Any], ...] = ()  # fixed keys of the projected group
    constructor: tuple[tuple[str, Any], ...] = ()  # fixed constructor keywords


#: Learning rates: the best of the per-group sweep on Shakespeare (docs/BENCHMARKS.md); the GaLore
#: paper uses 1e-2 for GaLore and 1e-3 for AdamW everywhere.
RECIPES: dict[str, Recipe] = {
    "adamw": Recipe(torch.optim.AdamW, 1e-3, 1e-2),
    "adamw8bit": Recipe(GaLoreAdamW8bit, 1e-3, 1e-2),
    "galore_adamw": Recipe(GaLoreAdamW, 1e-2, 1e-2, 0.25),
    "galore_adamw8bit": Recipe(GaLoreAdamW8bit, 1e-2, 1e-2, 0.25),
    "galore_adafactor": Recipe(GaLoreAdafactor, 1e-2, 1e-2, 0.25, constructor=(("relative_step", False),)),
    "fira_adamw": Recipe(FiraAdamW, 3e-3, 1e-2, 1.0),
    "apollo_adamw": Recipe(APOLLOAdamW, 1e-2, 1e-2, 1.0),
    "apollo_mini": Recipe(APOLLOAdamW, 3e-3, 1e-2, 128.0, group_options=(("rank", 1), ("scale_type", "tensor"))),
}
FULL_RANK = ("adamw", "adamw8bit")


@dataclass(frozen=True, kw_only=True)
class OptimizerSpec:
    """What the command line says about the optimizer; ``None`` means the recipe's default."""

    name: str = "galore_adamw"
    lr: float | None = None
    other_lr: float | None = None
    rank: int = 128
    update_proj_gap: int = 200
    scale: float | None = None
    projector: str = "svd"
    proj_type: str = "std"
    on_refresh: str = "keep"
    weight_decay: float = 0.0
    target_modules: str = "all-linear"

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ValueError(f"unknown optimizer {self.name!r}; valid: {', '.join(RECIPES)}")

    @property
    def matrix_lr(self) -> float:
        return self.lr if self.lr is not None else RECIPES[self.name].lr

    @property
    def rest_lr(self) -> float:
        return self.other_lr if self.other_lr is not None else RECIPES[self.name].other_lr

    @property
    def projected(self) -> bool:
        return self.name not in FULL_RANK


def build_optimizer(
    model: nn.Module, spec: OptimizerSpec, *, summary: bool = False, layerwise: bool = False
) -> torch.optim.Optimizer:
    """Groups from ``spec.target_modules`` (projected unless a full-rank baseline) and the optimizer.

    Embeddings, norms and the head form the second group, at ``spec.rest_lr``. With ``layerwise``
    the AdamW baseline is gradproj's engine without ranks (torch's AdamW bit for bit), which can
    step inside backward.
    """
    recipe = RECIPES[spec.name]
    if layerwise and recipe.cls is torch.optim.AdamW:
        recipe = Recipe(GaLoreAdamW, recipe.lr, recipe.other_lr, constructor=(("eps", 1e-8),))
    fixed = dict(recipe.group_options)
    options: dict[str, Any] = {}
    if spec.projected:
        options = {
            "update_proj_gap": spec.update_proj_gap,
            "scale": spec.scale if spec.scale is not None else recipe.scale,
            "proj_type": spec.proj_type,
            "projector": spec.projector,
            "on_refresh": spec.on_refresh,
            **{k: v for k, v in fixed.items() if k != "rank"},
        }
    rank = int(fixed.get("rank", spec.rank))
    groups = param_groups(model, target_modules=spec.target_modules, rank=rank, summary=summary, **options)
    groups[0]["lr"] = spec.matrix_lr
    if not spec.projected:
        del groups[0]["rank"]
    for group in groups[1:]:
        group["lr"] = spec.rest_lr
    if recipe.cls is torch.optim.AdamW:
        for group in groups:
            group.pop("param_names", None)  # torch < 2.6 does not know the key
    return recipe.cls(groups, lr=spec.matrix_lr, weight_decay=spec.weight_decay, **dict(recipe.constructor))
