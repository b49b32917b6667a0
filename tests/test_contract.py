"""The contract every preset x projector x on_refresh honours (one registry, one suite)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import gradproj
from conftest import (
    ALL_COMBINATIONS,
    PAIRS,
    PRESET_NAMES,
    build,
    compatible,
    grad_stream,
    lr_kwargs,
    make_params,
    state_equal,
)
from gradproj.optim.registry import METHODS

#: every test here runs on the fast path and on the per-parameter step (conftest.engine_path)
pytestmark = pytest.mark.usefixtures("engine_path")

SHAPES = [(72, 64), (64, 80), (16,)]  # large enough for 8-bit quantization to engage


def _split_groups(params: list[torch.Tensor], **group):  # type: ignore[no-untyped-def]
    return [{"params": params[:2], **group}, {"params": params[2:]}]


def _step(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.step()


def _plain(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, int, float, str, bool))


@pytest.mark.parametrize(("preset", "projector", "on_refresh"), ALL_COMBINATIONS)
def test_state_dict_roundtrip_continues_in_lockstep(preset: str, projector: str, on_refresh: str) -> None:
    group = {"rank": 8, "update_proj_gap": 3, "projector": projector, "on_refresh": on_refresh}
    spec_kwargs = lr_kwargs(preset)
    params = make_params(SHAPES, torch.float32)
    opt = gradproj.PRESETS[preset](_split_groups(params, **group), **spec_kwargs)
    stream = grad_stream(params, 8)
    for grads in stream[:4]:  # stop just after the refresh at step 3
        _step(opt, params, grads)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    assert _plain(opt.state_dict())
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = gradproj.PRESETS[preset](_split_groups(twin_params, **group), **spec_kwargs)
    twin.load_state_dict(loaded)
    for grads in stream[4:]:  # crosses the refresh at step 6
        _step(opt, params, grads)
        _step(twin, twin_params, grads)
        for a, b in zip(params, twin_params, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(("preset", "projector"), PAIRS)
def test_loss_goes_down_and_dtype_is_preserved(preset: str, projector: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).to(torch.bfloat16)
    x = torch.randn(256, 32, dtype=torch.bfloat16)
    y = x @ (torch.randn(32, 8, dtype=torch.bfloat16) / 32**0.5)  # a learnable linear teacher
    groups = gradproj.param_groups(model, rank=8, update_proj_gap=10, projector=projector, exclude=())
    kwargs = {"lr": 1e-2, **METHODS[preset].constructor}  # the registry's fixed-lr construction
    opt = gradproj.PRESETS[preset](groups, **kwargs)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.7 * first
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_lr_scheduler_none_grad_and_closure(preset: str) -> None:
    params = make_params(SHAPES, torch.float32)
    kwargs = lr_kwargs(preset)
    opt = gradproj.PRESETS[preset](_split_groups(params, rank=4), **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    before = [p.detach().clone() for p in params]
    params[1].grad = None  # a parameter without gradient is left alone
    params[0].grad = torch.randn_like(params[0])
    params[2].grad = torch.randn_like(params[2])
    loss = opt.step(lambda: 1.5)
    assert loss == 1.5
    assert torch.equal(params[1], before[1]) and not torch.equal(params[0], before[0])
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_param_group_keys_survive_state_dict() -> None:
    params = make_params(SHAPES, torch.float32)
    opt = build("galore_adamw", params[:2], rank=4, projector="dct", on_refresh="rotate")
    saved = opt.state_dict()["param_groups"][0]
    assert (saved["rank"], saved["projector"], saved["on_refresh"], saved["proj_type"]) == (4, "dct", "rotate", "std")


def test_hugging_face_style_groups_work() -> None:
    """transformers' Trainer builds exactly these keys for optim='galore_adamw'."""
    params = make_params(SHAPES, torch.float32)
    groups = [
        {"params": params[2:]},
        {"params": params[:2], "rank": 4, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = gradproj.GaLoreAdamW(groups, lr=1e-3)
    for grads in grad_stream(params, 2):
        _step(opt, params, grads)
    assert opt.state[params[0]]["basis_right"].shape == (4, 64)


def _clone(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


@pytest.mark.parametrize(("preset", "projector"), PAIRS)
def test_saving_and_loading_leave_the_state_dict_unchanged(preset: str, projector: str) -> None:
    params = make_params(SHAPES, torch.float32)
    group = {"rank": 8, "update_proj_gap": 2, "projector": projector, "on_refresh": "rotate"}
    opt = gradproj.PRESETS[preset](_split_groups(params, **group), **lr_kwargs(preset))
    for grads in grad_stream(params, 3):
        _step(opt, params, grads)
    saved = opt.state_dict()
    snapshot = _clone(saved)
    torch.save(saved, io.BytesIO())
    other_params = [p.detach().clone().requires_grad_() for p in params]
    other = gradproj.PRESETS[preset](_split_groups(other_params, **group), **lr_kwargs(preset))
    other.load_state_dict(saved)
    assert state_equal(saved, snapshot)  # neither saving nor loading touched the dict
    assert state_equal(opt.state_dict(), snapshot) and state_equal(other.state_dict(), snapshot)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_equal_parameters_give_equal_state_dicts(preset: str) -> None:
    projector = "rsvd" if compatible(preset, "rsvd") else gradproj.PRESETS[preset].projection_defaults()["projector"]

    def run() -> dict:  # type: ignore[type-arg]
        params = make_params(SHAPES, torch.float32)
        opt = gradproj.PRESETS[preset](
            _split_groups(params, rank=8, update_proj_gap=2, projector=projector), **lr_kwargs(preset)
        )
        for grads in grad_stream(params, 3):
            _step(opt, params, grads)
        return opt.state_dict()

    first, second = run(), run()
    assert first["state"] and state_equal(first, second)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_add_param_group_after_some_steps(preset: str) -> None:
    """A group added mid-run starts fresh: it steps as a new optimizer over it alone would (named
    parameters: the same seeds), and the state dict round trips with both groups."""
    params = make_params([*SHAPES, (40, 56)], torch.float32)

    def groups(ps: list[torch.Tensor]) -> list[dict]:  # type: ignore[type-arg]
        named = [(f"p{i}", p) for i, p in enumerate(ps)]
        return [{"params": named[:2], "rank": 8, "update_proj_gap": 2}, {"params": named[2:3]}]

    late = {"params": [("late", params[3])], "rank": 4, "update_proj_gap": 2}
    late_alone = torch.nn.Parameter(params[3].detach().clone())
    opt = gradproj.PRESETS[preset](groups(params[:3]), **lr_kwargs(preset))
    stream = grad_stream(params, 6)
    for grads in stream[:3]:
        _step(opt, params[:3], grads[:3])
    opt.add_param_group(late)
    alone = gradproj.PRESETS[preset]([{**late, "params": [("late", late_alone)]}], **lr_kwargs(preset))
    for grads in stream[3:]:
        _step(opt, params, grads)
        _step(alone, [late_alone], grads[3:])
    assert opt.state[params[3]]["step"] == 3
    torch.testing.assert_close(params[3].detach(), late_alone.detach(), rtol=0, atol=0)
    copies = [p.detach().clone() for p in params]
    reloaded = gradproj.PRESETS[preset](
        [*groups(copies[:3]), {**late, "params": [("late", copies[3])]}], **lr_kwargs(preset)
    )
    reloaded.load_state_dict(opt.state_dict())
    assert state_equal(reloaded.state_dict(), opt.state_dict())


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_non_contiguous_parameters_step_like_contiguous_ones(preset: str) -> None:
    contiguous = make_params([(72, 64), (64, 80)], torch.float32)
    strided = [
        torch.nn.Parameter(p.detach().t().contiguous().t()) for p in contiguous
    ]  # same values, transposed strides
    assert not any(p.is_contiguous() for p in strided)
    opts = [
        gradproj.PRESETS[preset]([{"params": ps, "rank": 8, "update_proj_gap": 2}], **lr_kwargs(preset))
        for ps in (contiguous, strided)
    ]
    for grads in grad_stream(contiguous, 4):
        _step(opts[0], contiguous, grads)
        _step(opts[1], strided, grads)
    for a, b in zip(contiguous, strided, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_alice_gives_its_short_beta2_to_the_subspace_only() -> None:
    """Embeddings and norms run AdamW with Adam's betas; the subspace moments use Alice's (0.9, 0.9)."""
    params = make_params(SHAPES, torch.float32)
    opt = gradproj.Alice(_split_groups(params, rank=4), lr=1e-2)
    assert opt.param_groups[0]["betas"] == (0.9, 0.9) and opt.param_groups[1]["betas"] == (0.9, 0.999)
    tracked = gradproj.Alice0(_split_groups(params, rank=4), betas=(0.9, 0.95, 0.99))  # pytorch_optimizer's form
    assert tracked.param_groups[0]["betas"] == (0.9, 0.95) and tracked.param_groups[0]["track_beta"] == 0.99
    assert gradproj.Alice0(_split_groups(params, rank=4)).param_groups[0]["track_beta"] == 0.0
