"""The contract every preset x projector x on_refresh honours (one registry, one suite)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import gradproj
from conftest import ALL_COMBINATIONS, PRESET_NAMES, PROJECTORS, build, grad_stream, make_params

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
    spec_kwargs = {} if preset == "galore_adafactor" else {"lr": 1e-2}
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


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("projector", PROJECTORS)
def test_loss_goes_down_and_dtype_is_preserved(preset: str, projector: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).to(torch.bfloat16)
    x = torch.randn(256, 32, dtype=torch.bfloat16)
    y = x @ (torch.randn(32, 8, dtype=torch.bfloat16) / 32**0.5)  # a learnable linear teacher
    groups = gradproj.param_groups(model, rank=8, update_proj_gap=10, projector=projector, exclude=())
    kwargs = {"lr": 1e-2}
    if preset == "galore_adafactor":
        kwargs.update(relative_step=False, scale_parameter=False)
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
    kwargs = {"lr": None, "relative_step": True} if preset == "galore_adafactor" else {"lr": 1e-2}
    opt = gradproj.PRESETS[preset](_split_groups(params, rank=4), **kwargs)
    if preset != "galore_adafactor":  # relative-step Adafactor has no lr to schedule
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    before = [p.detach().clone() for p in params]
    params[1].grad = None  # a parameter without gradient is left alone
    params[0].grad = torch.randn_like(params[0])
    params[2].grad = torch.randn_like(params[2])
    loss = opt.step(lambda: 1.5)
    assert loss == 1.5
    assert torch.equal(params[1], before[1]) and not torch.equal(params[0], before[0])
    if preset != "galore_adafactor":
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
