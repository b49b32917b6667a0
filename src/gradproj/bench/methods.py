"""Every optimizer the side-by-side benchmark runs, ours and the peers', built the same way.

A method receives the model and two learning rates (attention/MLP matrices, everything else), so
every method, peer or ours, gets the same per-group sweep. Peers are optional installs: a missing
one is reported by :func:`missing`, never fatal. ``refresh`` names the function each method calls
to recompute its basis, so the harness can time basis refreshes for peers and ours alike.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import gradproj

Builder = Callable[[nn.Module, float, float, int], torch.optim.Optimizer]

#: The function that recomputes a basis, per implementation (module, class, method).
OUR_REFRESH = ("gradproj.optim.engine", "ProjectedOptimizer", "_refresh")
GALORE_TORCH_REFRESH = ("galore_torch.galore_projector", "GaLoreProjector", "get_orthogonal_matrix")
FIRA_REFRESH = ("fira.gradient_projection", "GradientProjector", "get_orthogonal_matrix")
APOLLO_REFRESH = ("apollo_torch.random_projector", "GradientProjector", "get_orthogonal_matrix")


@dataclass(frozen=True)
class Method:
    """A named optimizer recipe; ``needs`` is the import a peer requires."""

    name: str
    build: Builder
    needs: str | None = None
    notes: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    refresh: tuple[str, str, str] | None = None


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Attention and MLP matrices (the paper's targets) vs. embeddings, norms and head."""
    mats = [p for n, p in model.named_parameters() if p.dim() == 2 and ("self_attn" in n or "mlp" in n)]
    ids = {id(p) for p in mats}
    return mats, [p for p in model.parameters() if id(p) not in ids]


def _ours(preset: str, init: Any = None, **options: Any) -> Builder:
    def build(model: nn.Module, lr_m: float, lr_o: float, rank: int) -> torch.optim.Optimizer:
        mats, rest = split_parameters(model)
        # Named parameters give seeds that do not depend on how many optimizers this process built.
        # (torch wants every group named or none).
        named = [(f"matrix.{i}", p) for i, p in enumerate(mats)]
        others = [(f"other.{i}", p) for i, p in enumerate(rest)]
        groups = [{"params": named, "rank": rank, "lr": lr_m, **options}, {"params": others, "lr": lr_o}]
        return gradproj.PRESETS[preset](groups, lr=lr_m, **(init or {}))

    return build


def _full(module: str | None, cls: str) -> Builder:
    """A full-rank optimizer (torch's AdamW or a peer's 8-bit AdamW) with the two learning rates."""

    def build(model: nn.Module, lr_m: float, lr_o: float, rank: int) -> torch.optim.Optimizer:
        mats, rest = split_parameters(model)
        owner = torch.optim if module is None else importlib.import_module(module)
        groups = [{"params": mats, "lr": lr_m}, {"params": rest, "lr": lr_o}]
        return getattr(owner, cls)(groups, lr=lr_m, weight_decay=0.0)  # type: ignore[no-any-return]

    return build


def _peer(module: str, cls: str, **group_keys: Any) -> Builder:
    def build(model: nn.Module, lr_m: float, lr_o: float, rank: int) -> torch.optim.Optimizer:
        mats, rest = split_parameters(model)
        optimizer_class = getattr(importlib.import_module(module), cls)
        groups = [{"params": rest, "lr": lr_o}, {"params": mats, "rank": rank, "lr": lr_m, **group_keys}]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optimizer_class(groups, lr=lr_m, weight_decay=0.0)  # type: ignore[no-any-return]

    return build


def lora_rank(rank: int) -> int:
    """LoRA rank whose Adam state matches GaLore's at ``rank``: GaLore keeps ``2 r n`` numbers for an
    ``m x n`` matrix (``m <= n``), LoRA ``2 r' (m + n)``; ``r' = r / 2`` is equal for square matrices
    and within 30% for LLaMA's MLP shapes."""
    return max(1, rank // 2)


def _lora(model: nn.Module, lr_m: float, lr_o: float, rank: int) -> torch.optim.Optimizer:
    """LoRA through peft on the same matrices: adapters at ``lr_m``, embeddings/norms/head in full at
    ``lr_o`` (as in the GaLore paper's LoRA baseline), frozen base matrices."""
    from peft import LoraConfig, inject_adapter_in_model

    mats, _ = split_parameters(model)
    targets = {id(p) for p in mats}
    names = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if getattr(m, "weight", None) is not None and id(m.weight) in targets
        }
    )
    r = lora_rank(rank)
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=names), model)
    adapters, rest = [], []
    for name, p in model.named_parameters():
        if "lora_" in name:
            adapters.append(p.requires_grad_(True))
        elif id(p) in targets:
            p.requires_grad_(False)
        else:
            rest.append(p.requires_grad_(True))
    groups = [{"params": adapters, "lr": lr_m}, {"params": rest, "lr": lr_o}]
    return torch.optim.AdamW(groups, lr=lr_m, weight_decay=0.0)


def methods(gap: int) -> list[Method]:
    """The comparison's line-up; ``gap`` is every projected method's ``update_proj_gap``."""
    common: dict[str, Any] = {"update_proj_gap": gap}
    ours = OUR_REFRESH
    apollo = {"proj": "random", "proj_type": "std", **common}
    return [
        Method("adamw", _full(None, "AdamW"), notes="torch.optim.AdamW"),
        Method("adamw8bit-bnb", _full("bitsandbytes.optim", "AdamW8bit"), "bitsandbytes", "bitsandbytes AdamW8bit"),
        Method("adamw8bit-torchao", _full("torchao.optim", "AdamW8bit"), "torchao.optim", "torchao AdamW8bit"),
        Method("lora-peft", _lora, "peft", "peft LoRA, rank/2, alpha 2r"),
        Method(
            "galore-torch",
            _peer("galore_torch", "GaLoreAdamW", scale=0.25, proj_type="std", **common),
            "galore_torch",
            refresh=GALORE_TORCH_REFRESH,
        ),
        Method("fira", _peer("fira", "FiraAdamW", alpha=1.0, proj_type="std", **common), "fira", refresh=FIRA_REFRESH),
        Method(
            "apollo-torch",
            _peer("apollo_torch", "APOLLOAdamW", scale_type="channel", scale=1.0, **apollo),
            "apollo_torch",
            refresh=APOLLO_REFRESH,
        ),
        Method(
            "apollo-torch-mini",
            _peer("apollo_torch", "APOLLOAdamW", scale_type="tensor", scale=128.0, **apollo),
            "apollo_torch",
            options={"rank": 1},
            refresh=APOLLO_REFRESH,
        ),
        Method("galore_adamw", _ours("galore_adamw", scale=0.25, **common), refresh=ours),
        Method("galore_adamw+rsvd", _ours("galore_adamw", scale=0.25, projector="rsvd", **common), refresh=ours),
        Method("galore_adamw+dct", _ours("galore_adamw", scale=0.25, projector="dct", **common), refresh=ours),
        Method("galore_adamw+random", _ours("galore_adamw", scale=0.25, projector="random", **common), refresh=ours),
        Method("galore_adamw+rotate", _ours("galore_adamw", scale=0.25, on_refresh="rotate", **common), refresh=ours),
        Method("galore_adamw8bit", _ours("galore_adamw8bit", scale=0.25, **common), refresh=ours),
        Method(
            "galore_adafactor",
            _ours("galore_adafactor", {"relative_step": False, "scale_parameter": False}, scale=0.25, **common),
            notes="Adafactor, fixed lr (relative_step and scale_parameter off)",
            refresh=ours,
        ),
        Method("fira_adamw", _ours("fira_adamw", scale=1.0, **common), refresh=ours),
        Method("fira_adamw+rotate", _ours("fira_adamw", scale=1.0, on_refresh="rotate", **common), refresh=ours),
        Method("apollo_adamw", _ours("apollo_adamw", **common), refresh=ours),
        Method(
            "apollo_mini",
            _ours("apollo_adamw", scale_type="tensor", scale=128.0, **common),
            options={"rank": 1},
            refresh=ours,
        ),
    ]


def missing(method: Method) -> str | None:
    """Why a method cannot run here (its peer does not import), or None if it can."""
    if method.needs is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(method.needs)
    except Exception as error:  # a peer may fail on import for reasons of its own (missing deps, CUDA)
        return f"{method.needs} does not import ({type(error).__name__}: {error})".splitlines()[0][:200]
    return None
