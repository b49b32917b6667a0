"""Bad input gets an error that names the value and what would be valid; no NaN is ever applied."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import gradproj
from conftest import INCOMPATIBLE, lr_kwargs, make_params
from gradproj.optim.validate import sharding_blocker
from gradproj.rules import make_rule


def _groups(**group):  # type: ignore[no-untyped-def]
    return [{"params": make_params([(16, 8)]), **group}]


@pytest.mark.parametrize(
    ("group", "kwargs", "message"),
    [
        ({"rank": 0}, {}, r"rank=0 .* integer >= 1"),
        ({"rank": 2.5}, {}, r"rank=2.5 .* integer >= 1"),
        ({"rank": 4, "proj_type": "diagonal"}, {}, r"proj_type='diagonal' .*'std', 'reverse_std'"),
        ({"rank": 4, "projector": "qr"}, {}, r"projector='qr' .*'svd', 'rsvd', 'eigh', 'dct', 'random'"),
        ({"rank": 4, "on_refresh": "spin"}, {}, r"on_refresh='spin' .*'keep', 'reset', 'rotate'"),
        ({"rank": 4, "update_proj_gap": 0}, {}, r"update_proj_gap=0 .* integer >= 1"),
        ({"rank": 4}, {"betas": (0.9, 1.0)}, r"betas\[1\]=1.0 .* \[0, 1\)"),
        ({"rank": 4}, {"lr": -1.0}, r"lr=-1.0 .* >= 0"),
        ({"rank": 4, "scale_type": "row"}, {}, r"scale_type='row'"),
        ({"rank": 4, "leading_basis": 5}, {}, r"leading_basis=5 exceeds rank=4"),
        ({"rank": 4, "leading_basis": 0}, {}, r"leading_basis=0 .* integer >= 1"),
        ({"rank": 4, "switching": True, "projector": "random"}, {}, r"switching=True .*projector='random' has none"),
        ({"rank": 4, "switching": "yes"}, {}, r"switching='yes' .* True or False"),
        ({"rank": 4, "track_beta": 1.0}, {}, r"track_beta=1.0 .* \[0, 1\)"),
        ({"rank": 4, "compensation_scale": -0.1}, {}, r"compensation_scale=-0.1 .* >= 0"),
        ({"rank": 4, "residual": "alice", "proj_type": "full"}, {}, r"residual='alice' needs a one-sided basis"),
        ({"rank": 4, "projector": "eigh", "proj_type": "full"}, {}, r"projector='eigh' needs a one-sided basis"),
        ({"rank": 4, "residual": "alice", "projector": "identity"}, {}, r"projector='identity' discards nothing"),
        ({"rank": 4, "rule": "sgd"}, {}, r"rule='sgd' .*'racs'"),
    ],
)
def test_constructor_errors_name_the_value_and_the_valid_range(group, kwargs, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        gradproj.GaLoreAdamW(_groups(**group), **kwargs)


@pytest.mark.parametrize(("preset", "projector"), INCOMPATIBLE)
def test_presets_refuse_projectors_they_cannot_use(preset: str, projector: str) -> None:
    """Every (preset, projector) pair the contract suite leaves out raises a clear error instead."""
    assert INCOMPATIBLE, "the suite should leave out Alice's switching with bases that have no order"
    with pytest.raises(ValueError, match=f"projector='{projector}'"):
        gradproj.PRESETS[preset](_groups(rank=4, projector=projector), **lr_kwargs(preset))


@pytest.mark.parametrize(
    ("preset", "options", "reason"),
    [
        ("galore_adafactor", {}, "factored statistics average over whole rows"),
        ("racs", {"projector": "svd", "on_refresh": "rotate"}, "racs rule refits"),
    ],
)
def test_methods_without_a_row_sharded_form_say_why(preset: str, options: dict[str, Any], reason: str) -> None:
    cls = gradproj.PRESETS[preset]
    group = {"rank": 4, **cls.projection_defaults(), **options}
    assert reason in sharding_blocker(group, make_rule(group["rule"] or cls.RULE))  # type: ignore[operator]


@pytest.mark.parametrize("preset", ["alice", "alice0", "racs", "fira_adamw"])
def test_frontier_methods_have_a_row_sharded_form(preset: str) -> None:
    cls = gradproj.PRESETS[preset]
    group = {"rank": 4, **cls.projection_defaults()}
    assert sharding_blocker(group, make_rule(group["rule"] or cls.RULE)) is None


def test_a_rejected_group_leaves_the_optimizer_unchanged() -> None:
    opt = gradproj.GaLoreAdamW(_groups(rank=2))
    for bad in ({"params": make_params([(8, 8)]), "rank": 0}, {"params": make_params([(2, 3, 4)]), "rank": 2}):
        with pytest.raises(ValueError):
            opt.add_param_group(bad)
    assert len(opt.param_groups) == 1


def test_unknown_projection_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="projektor"):
        gradproj.GaLoreAdamW(_groups(rank=2), projektor="svd")


def test_rank_larger_than_the_matrix_is_clamped_with_a_warning() -> None:
    groups = _groups(rank=64)
    with pytest.warns(UserWarning, match="rank=64 exceeds"):
        opt = gradproj.GaLoreAdamW(groups)
    p = groups[0]["params"][0]
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["basis_right"].shape == (8, 8)


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (2, 8, 8), (16,)])
def test_non_matrix_weights_are_refused_in_a_rank_group(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"takes 2-D weight matrices only"):
        gradproj.GaLoreAdamW([{"params": make_params([shape]), "rank": 2}])


def test_adafactor_lr_conflicts_are_explained() -> None:
    with pytest.raises(ValueError, match=r"lr=None needs relative_step=True; pass a learning rate"):
        gradproj.GaLoreAdafactor(_groups(rank=2), relative_step=False)
    with pytest.raises(ValueError, match=r"warmup_init=True requires relative_step=True"):
        gradproj.GaLoreAdafactor(_groups(rank=2), lr=1e-3, relative_step=False, warmup_init=True)


@pytest.mark.parametrize("preset", list(gradproj.PRESETS))
def test_nonfinite_gradient_is_skipped_without_touching_weights_or_state(preset: str) -> None:
    params = make_params([(32, 16), (8,)], torch.float32)
    kwargs = lr_kwargs(preset)
    opt = gradproj.PRESETS[preset]([{"params": params[:1], "rank": 4}, {"params": params[1:]}], **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    weights = [p.detach().clone() for p in params]
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[params[0]].items()}
    params[0].grad = torch.randn_like(params[0])
    params[1].grad = torch.full_like(params[1], float("nan"))  # one bad tensor poisons the whole step
    with pytest.warns(RuntimeWarning, match="non-finite gradient in param_groups\\[1\\]"):
        opt.step()
    assert opt.nonfinite_steps == 1 and opt.state_dict()["gradproj"]["nonfinite_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(params, weights, strict=True))
    for key, value in opt.state[params[0]].items():
        assert torch.equal(value, state[key]) if isinstance(value, torch.Tensor) else value == state[key]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_nonfinite_element_among_finite_ones_is_caught(bad: float) -> None:
    params = make_params([(32, 16), (8,), (0, 4)], torch.float32)  # an empty one, as an FSDP2 rank may hold
    opt = gradproj.GaLoreAdamW([{"params": params[:1], "rank": 4}, {"params": params[1:]}], nonfinite="raise")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # all finite: applied
    params[0].grad[17, 3] = bad
    with pytest.raises(FloatingPointError, match="param_groups\\[0\\]"):
        opt.step()


def test_checked_gradients_are_not_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    params = make_params([(32, 16), (8,)], torch.float32)
    opt = gradproj.GaLoreAdamW([{"params": params[:1], "rank": 4}, {"params": params[1:]}], nonfinite="checked")
    for p in params:
        p.grad = torch.randn_like(p)

    def scan() -> bool:
        raise AssertionError("step() scanned the gradients its caller had checked")

    monkeypatch.setattr(opt, "_gradients_are_finite", scan)
    before = params[0].detach().clone()
    opt.step()
    assert not torch.equal(params[0], before)
    # a layer-wise step has no caller's check: step_parameter checks its gradient either way
    assert not opt.step_parameter(params[1], torch.full_like(params[1], float("nan")))


def test_nonfinite_gradient_can_raise_instead() -> None:
    params = make_params([(32, 16)], torch.float32)
    opt = gradproj.GaLoreAdamW([{"params": params, "rank": 4}], nonfinite="raise")
    params[0].grad = torch.full_like(params[0], float("inf"))
    before = params[0].detach().clone()
    with pytest.raises(FloatingPointError, match="not applied"):
        opt.step()
    assert torch.equal(params[0], before)
    with pytest.raises(ValueError, match="nonfinite='ignore'"):
        gradproj.GaLoreAdamW([{"params": params, "rank": 4}], nonfinite="ignore")
