"""Every optimizer the quality comparison runs, ours and the peers', built the same way.

Each method receives the model's two parameter sets (targeted matrices and everything else)
and two learning rates, so every method, peer or ours, gets the same per-group sweep.
Peers are optional installs: a missing one is reported by :func:`available`, never fatal.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import gradproj

Builder = Callable[[list[torch.Tensor], list[torch.Tensor], float, float, int], torch.optim.Optimizer]


@dataclass(frozen=True)
class Method:
    """A named optimizer recipe; ``needs`` is the import a peer requires."""

    name: str
    build: Builder
    needs: str | None = None
    notes: str = ""
    options: dict[str, Any] = field(default_factory=dict)


def _ours(preset: str, **options: Any) -> Builder:
    def build(
        mats: list[torch.Tensor], rest: list[torch.Tensor], lr_m: float, lr_o: float, rank: int
    ) -> torch.optim.Optimizer:
        # Named parameters give seeds that do not depend on how many optimizers this process built.
        # (torch wants every group named or none).
        named = [(f"matrix.{i}", p) for i, p in enumerate(mats)]
        others = [(f"other.{i}", p) for i, p in enumerate(rest)]
        groups = [{"params": named, "rank": rank, "lr": lr_m, **options}, {"params": others, "lr": lr_o}]
        return gradproj.PRESETS[preset](groups, lr=lr_m)

    return build


def _adamw(
    mats: list[torch.Tensor], rest: list[torch.Tensor], lr_m: float, lr_o: float, rank: int
) -> torch.optim.Optimizer:
    return torch.optim.AdamW([{"params": mats, "lr": lr_m}, {"params": rest, "lr": lr_o}], lr=lr_m, weight_decay=0.0)


def _peer(module: str, cls: str, **group_keys: Any) -> Builder:
    def build(
        mats: list[torch.Tensor], rest: list[torch.Tensor], lr_m: float, lr_o: float, rank: int
    ) -> torch.optim.Optimizer:
        optimizer_class = getattr(importlib.import_module(module), cls)
        groups = [{"params": rest, "lr": lr_o}, {"params": mats, "rank": rank, "lr": lr_m, **group_keys}]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optimizer_class(groups, lr=lr_m, weight_decay=0.0)  # type: ignore[no-any-return]

    return build


def methods(gap: int) -> list[Method]:
    """The comparison's line-up; ``gap`` is every projected method's ``update_proj_gap``."""
    common = {"update_proj_gap": gap}
    return [
        Method("adamw", _adamw, notes="torch.optim.AdamW"),
        Method(
            "galore-torch", _peer("galore_torch", "GaLoreAdamW", scale=0.25, proj_type="std", **common), "galore_torch"
        ),
        Method("fira", _peer("fira", "FiraAdamW", alpha=1.0, proj_type="std", **common), "fira"),
        Method(
            "apollo-torch",
            _peer(
                "apollo_torch", "APOLLOAdamW", proj="random", scale_type="channel", scale=1.0, proj_type="std", **common
            ),
            "apollo_torch",
        ),
        Method(
            "apollo-torch-mini",
            _peer(
                "apollo_torch",
                "APOLLOAdamW",
                proj="random",
                scale_type="tensor",
                scale=128.0,
                proj_type="std",
                **common,
            ),
            "apollo_torch",
            options={"rank": 1},
        ),
        Method("galore_adamw", _ours("galore_adamw", scale=0.25, **common)),
        Method("galore_adamw+rsvd", _ours("galore_adamw", scale=0.25, projector="rsvd", **common)),
        Method("galore_adamw+rotate", _ours("galore_adamw", scale=0.25, on_refresh="rotate", **common)),
        Method("galore_adamw8bit", _ours("galore_adamw8bit", scale=0.25, **common)),
        Method("fira_adamw", _ours("fira_adamw", scale=1.0, **common)),
        Method("fira_adamw+rotate", _ours("fira_adamw", scale=1.0, on_refresh="rotate", **common)),
        Method("apollo_adamw", _ours("apollo_adamw", **common)),
        Method("apollo_mini", _ours("apollo_adamw", scale_type="tensor", scale=128.0, **common), options={"rank": 1}),
    ]


def available(method: Method) -> bool:
    """Whether a method's peer package imports here."""
    if method.needs is None:
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(method.needs)
    except Exception:  # a peer may fail on import for reasons of its own (missing deps, CUDA)
        return False
    return True
