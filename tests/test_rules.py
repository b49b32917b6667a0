"""Each update rule on its own, read from the rule registry (a rule added there is covered with no edit here): its
state's bytes are what it declares, its moments survive the round trip rotation uses, a reset zeroes them and
restarts bias correction, and its direction is finite and shaped like the gradient it was given."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import gradproj
from gradproj.rules import REGISTRY, make_rule

SHAPE = (12, 8)


#: options that make a rule keep the moments these tests carry (SCALE's matrices keep none: its head's momentum)
WITH_MOMENTS = {"colnorm": {"momentum": 0.9}}


def _group(rule: str) -> dict[str, Any]:
    """The group of the first preset whose matrices run ``rule`` (its options and hyper-parameters, rank 2)."""
    for preset in gradproj.PRESETS.values():
        if (preset.projection_defaults()["rule"] or preset.RULE) == rule:
            w = torch.nn.Parameter(torch.zeros(SHAPE, dtype=torch.float64))
            return dict(preset([{"params": [w], "rank": 2, **WITH_MOMENTS.get(rule, {})}]).param_groups[0])
    raise AssertionError(f"no preset runs the {rule} rule")


def _stepped(rule: str, steps: int = 3) -> tuple[Any, dict[str, Any], dict[str, Any], torch.Tensor]:
    torch.manual_seed(0)
    engine, group = make_rule(rule), _group(rule)
    weight, state = torch.randn(SHAPE, dtype=torch.float64), {}
    engine.init_state(state, SHAPE, weight, full_shape=SHAPE)
    state.setdefault("moment_step", 0)
    u = torch.empty(0)
    for _ in range(steps):
        u, step_size = engine.direction(torch.randn(SHAPE, dtype=torch.float64), state, group, weight)
        assert isinstance(step_size, float) and step_size > 0
    return engine, state, group, u


@pytest.mark.parametrize("rule", list(REGISTRY))
def test_a_rules_state_holds_the_bytes_it_declares(rule: str) -> None:
    engine, state, group, u = _stepped(rule)
    held = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    assert held == engine.state_bytes(SHAPE, torch.float64, group)
    assert u.shape == SHAPE and bool(torch.isfinite(u).all())


@pytest.mark.parametrize("rule", list(REGISTRY))
def test_moments_survive_the_round_trip_and_a_reset_zeroes_them(rule: str) -> None:
    engine, state, _, _ = _stepped(rule)
    before = {k: v.clone() for k, v in engine.moments(state).items()}
    assert before and set(before) <= {"first", "second"}
    engine.set_moments(state, engine.moments(state))
    after = engine.moments(state)
    assert all(torch.allclose(after[k], before[k], rtol=0, atol=1e-6 * (1 + before[k].abs().max())) for k in before)
    engine.reset(state)
    assert state["moment_step"] == 0 and all(bool((m == 0).all()) for m in engine.moments(state).values())
