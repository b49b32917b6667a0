"""One registry of optimizer configurations drives the contract and twin suites."""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import pytest
import torch

import gradproj

PROJECTORS = ("svd", "rsvd", "dct", "random")
ON_REFRESH = ("keep", "reset", "rotate")
PRESET_NAMES = tuple(gradproj.PRESETS)

# (preset, constructor kwargs, engine rule, engine residual)
PRESET_SPECS: dict[str, dict[str, Any]] = {
    "galore_adamw": {"kwargs": {"lr": 1e-2}, "rule": "adam", "residual": "none", "scale": 0.25},
    "galore_adamw8bit": {"kwargs": {"lr": 1e-2}, "rule": "adam8bit", "residual": "none", "scale": 0.25},
    "galore_adafactor": {"kwargs": {}, "rule": "adafactor", "residual": "none", "scale": 0.25},
    "fira_adamw": {"kwargs": {"lr": 1e-2}, "rule": "adam", "residual": "fira", "scale": 1.0},
    "apollo_adamw": {"kwargs": {"lr": 1e-2}, "rule": "adam", "residual": "apollo", "scale": 1.0},
}

ALL_COMBINATIONS = list(itertools.product(PRESET_NAMES, PROJECTORS, ON_REFRESH))


def make_params(
    shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float64, seed: int = 0
) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def grad_stream(params: list[torch.Tensor], steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """Gradients with a dominant low-rank part (as real gradients have) plus noise."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        grads = []
        for p in params:
            if p.dim() == 2:
                m, n = p.shape
                low = torch.randn(m, 3, generator=gen, dtype=p.dtype) @ torch.randn(3, n, generator=gen, dtype=p.dtype)
                grads.append(low + 0.1 * torch.randn(m, n, generator=gen, dtype=p.dtype))
            else:
                grads.append(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        out.append(grads)
    return out


def build(
    preset: str, params: list[torch.Tensor], names: list[str] | None = None, **group: Any
) -> gradproj.ProjectedOptimizer:
    spec = PRESET_SPECS[preset]
    g: dict[str, Any] = {"params": params, **group}
    if names is not None:
        g["params"] = list(zip(names, params, strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gradproj.PRESETS[preset]([g], **spec["kwargs"])


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
