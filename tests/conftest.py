"""One registry of optimizer configurations drives the contract and twin suites."""

from __future__ import annotations

import inspect
import itertools
import sys
import warnings
from typing import Any

import pytest
import torch

import gradproj
from gradproj.optim.fast import blocker
from gradproj.optim.validate import ON_REFRESH, combination_error
from gradproj.projection import PROJECTORS
from gradproj.rules import make_rule

# tests/toy_method.py registers a method when imported: only tests/test_toy_method.py's subprocess loads it (as a
# plugin, which also collects tests/toy_trains.py); never this process, whose registries it would change
collect_ignore = ["toy_method.py"] + ([] if "toy_method" in sys.modules else ["toy_trains.py"])

# Every enumeration comes from its owner: a projector, preset or on_refresh policy added there is
# covered by the contract and twin suites with no edit here.
PRESET_NAMES = tuple(gradproj.PRESETS)


def lr_kwargs(preset: str, lr: float = 1e-2) -> dict[str, Any]:
    """The constructor's learning rate (Adafactor's relative step: its scale, 1e-2 being transformers' step)."""
    return {"lr": lr}


def _spec(preset: str) -> dict[str, Any]:
    cls = gradproj.PRESETS[preset]
    defaults = cls.projection_defaults()
    signature = inspect.signature(cls).parameters
    # what a twin needs to run the preset: its projection defaults and its constructor's eps and betas
    twin = {k: v for k, v in defaults.items() if k not in ("residual", "seed", "rule")}
    twin["projected_rule"] = defaults["rule"]
    twin.update({k: signature[k].default for k in ("eps", "betas") if k in signature})
    if "betas" in twin:  # Alice's third beta is its tracking decay, already in the projection defaults
        twin["betas"] = tuple(twin["betas"][:2])
    return {
        "kwargs": lr_kwargs(preset),
        "rule": cls.RULE,
        "residual": defaults["residual"],
        "scale": defaults["scale"],
        "twin": twin,
    }


# (preset, constructor kwargs, engine rule, engine residual, default scale), read off the presets themselves
PRESET_SPECS: dict[str, dict[str, Any]] = {name: _spec(name) for name in PRESET_NAMES}


def exact_twin(preset: str) -> bool:
    """Whether the preset's twin holds to the suites' tolerances (float64, or float32 for 8-bit states). An 8-bit
    weight-normalised preset rebuilds ``v`` from a float32 ``W``, so an 8-bit code may sit one level off the twin's:
    tests/test_weight_norm.py follows that one at a bound on the weights instead."""
    spec = PRESET_SPECS[preset]
    return not (spec["twin"]["weight_norm"] and spec["rule"] == "adam8bit")


def compatible(preset: str, projector: str) -> bool:
    """Whether the preset's options fit the projector (Alice's switching needs leading directions)."""
    return combination_error({**gradproj.PRESETS[preset].projection_defaults(), "projector": projector}) is None


#: every (preset, projector) that fits; the others are tested to raise (test_errors)
PAIRS = [
    (preset, projector)
    for preset, projector in itertools.product(PRESET_NAMES, PROJECTORS)
    if compatible(preset, projector)
]
INCOMPATIBLE = [pair for pair in itertools.product(PRESET_NAMES, PROJECTORS) if pair not in PAIRS]
ALL_COMBINATIONS = [(preset, projector, policy) for preset, projector in PAIRS for policy in ON_REFRESH]


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


def state_equal(a: object, b: object) -> bool:
    """Recursive equality of state dicts: tensors by value (and dtype), everything else by ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


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


def takes_fast_path(preset: str, projector: str | None = None) -> bool:
    """Whether the preset's matrices (on ``projector``, or its own) can take the batched fast path, as the fast
    path itself declares it (:func:`gradproj.optim.fast.blocker` on the preset's projected group)."""
    cls = gradproj.PRESETS[preset]
    group = {**cls.projection_defaults(), "rank": 2, **({"projector": projector} if projector else {})}
    return blocker(torch.zeros(4, 4), group, make_rule(group["rule"] or cls.RULE)) is None


@pytest.fixture(params=["fast", "loop"])
def engine_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on both of the engine's paths: ``fast`` as built (``foreach=None``), ``loop`` with the
    fast path refusing every parameter, so that every step is the per-parameter ground truth. Where the
    preset's matrices can never take the fast path, its ``fast`` run is the loop already: ``loop`` is skipped."""
    if request.param == "loop":
        params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
        preset = params.get("preset")
        if preset and not takes_fast_path(preset, params.get("projector")):
            pytest.skip(f"{preset} never takes the fast path here: its 'fast' run is this one")
        monkeypatch.setattr("gradproj.optim.engine.blocker", lambda *args: "the test runs the for-loop")
    return str(request.param)
