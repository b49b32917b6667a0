"""GradNormLoRP beyond the generic contract: the optimizer's weight normalisation equals PyTorch's own
``weight_norm`` parametrisation trained with GaLore (the model-transform form of the same algorithm), every
side and a gradient policy against the float64 twin, the 8-bit variant beside its twin, the model left
as it was (nothing to merge at export), and the inputs it refuses."""

from __future__ import annotations

import zlib
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import gradproj
from conftest import PRESET_SPECS, build, grad_stream, make_params
from gradproj.optim import weight_norm
from gradproj.optim.reference import ReferenceOptimizer
from gradproj.optim.registry import METHODS
from gradproj.projection.bases import derive_seed
from test_reference_twins import step_beside

SHAPES = [(48, 24), (24, 40)]
LR, SCALE, DECAY = 1e-2, 0.25, 0.1


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 16), nn.Tanh(), nn.Linear(16, 6)).double()


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(32, 12, generator=gen, dtype=torch.float64), torch.randn(
        32, 6, generator=gen, dtype=torch.float64
    )


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_equals_torch_weight_norm_trained_with_galore(proj_type: str) -> None:
    """Ours on a plain model against torch.nn.utils.parametrizations.weight_norm on the same model, its ``v``
    in a GaLore group and its ``g`` in an AdamW group at ``lr * scale`` (decay ``lr * weight_decay``): autograd
    gives the two gradients, GaLore the direction's step, torch's AdamW the magnitude's."""
    ours, theirs = mlp(), mlp()
    targets = ["0", "2"]  # 40 x 12 (tall) and 16 x 40 (wide): both sides of std
    opt = gradproj.GradNormLoRP(
        gradproj.param_groups(ours, target_modules=targets, rank=3, update_proj_gap=4, proj_type=proj_type),
        lr=LR,
        weight_decay=DECAY,
    )
    for name in targets:
        parametrizations.weight_norm(theirs.get_submodule(name), dim=0)
    directions = [theirs.get_submodule(n).parametrizations.weight.original1 for n in targets]
    magnitudes = [theirs.get_submodule(n).parametrizations.weight.original0 for n in targets]
    rest = [p for n, p in theirs.named_parameters() if "parametrizations" not in n]
    reference = gradproj.GaLoreAdamW(
        [
            {"params": directions, "rank": 3, "update_proj_gap": 4, "proj_type": proj_type, "weight_decay": 0.0},
            {"params": magnitudes, "lr": LR * SCALE, "weight_decay": DECAY / SCALE},
            {"params": rest},
        ],
        lr=LR,
        weight_decay=DECAY,
    )
    for step in range(11):  # crosses two refreshes
        x, y = data(step)
        for model, optimizer in ((ours, opt), (theirs, reference)):
            optimizer.zero_grad()
            (model(x) - y).square().mean().backward()
            optimizer.step()
        for name in targets:
            torch.testing.assert_close(
                ours.get_submodule(name).weight, theirs.get_submodule(name).weight, rtol=1e-10, atol=1e-12
            )
    for p, magnitude in zip(opt.param_groups[0]["params"], magnitudes, strict=True):
        torch.testing.assert_close(opt.state[p]["magnitude"], magnitude.detach().squeeze(1), rtol=1e-10, atol=1e-12)
    assert not any(parametrize.is_parametrized(m) for m in ours.modules())  # nothing to merge before export


def engine_and_twin(
    preset: str, group: dict[str, Any], shapes: list[tuple[int, int]] = SHAPES, dtype: torch.dtype = torch.float64
) -> tuple[list[torch.Tensor], torch.optim.Optimizer, ReferenceOptimizer]:
    """The preset and its twin (which keeps ``v`` and ``g`` itself) on the same starting weights."""
    spec = PRESET_SPECS[preset]
    params = make_params(shapes, dtype)
    names = [f"w{i}" for i in range(len(params))]
    opt = build(preset, params, names, **group)
    seeds = [derive_seed(0, zlib.crc32(n.encode())) for n in names]
    twin = ReferenceOptimizer(
        [p.detach().clone() for p in params], rule=spec["rule"], residual="none", lr=1e-2, seeds=seeds,
        **{**spec["twin"], **group},
    )  # fmt: skip
    return params, opt, twin


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_every_side_matches_the_twin(proj_type: str) -> None:
    group = {"rank": 6, "update_proj_gap": 4, "proj_type": proj_type, "on_refresh": "rotate", "weight_decay": 0.05}
    params, opt, twin = engine_and_twin("gradnorm_lorp", group)
    step_beside(opt, twin, params, grad_stream(params, 10), 1e-10)


def test_with_stable_spam_matches_the_twin() -> None:
    """The gradient policy clips ``G`` before the reparametrisation reads it (and resets ``R``'s moments only)."""
    group = {"rank": 6, "update_proj_gap": 4, "spike_policy": "stable_spam", "spam_reset_gap": 5}
    params, opt, twin = engine_and_twin("gradnorm_lorp", group)
    stream = grad_stream(params, 12)
    stream[6] = [10 * g for g in stream[6]]  # a spike for AdaClip to catch
    step_beside(opt, twin, params, stream, 1e-10)


def test_8bit_follows_the_twin_with_quantized_moments() -> None:
    """In float32 the engine's ``v`` (rebuilt from ``W``) and the twin's differ in the last bits, which can move
    an 8-bit code one level: the weights are compared, at a bound far below one step (lr * scale = 2.5e-3)."""
    group = {"rank": 8, "update_proj_gap": 4, "weight_decay": 0.01}
    params, opt, twin = engine_and_twin("gradnorm_lorp8bit", group, [(80, 640)], torch.float32)  # R: 8 x 640
    start = params[0].detach().clone()
    for grads in grad_stream(params, 12):
        params[0].grad = grads[0].clone()
        opt.step()
        twin.step(grads)
    assert opt.state[params[0]]["exp_avg_codes"].dtype == torch.uint8
    assert float((params[0].detach() - start).abs().max()) > 1e-2  # it moved
    torch.testing.assert_close(params[0].detach(), twin.params[0], rtol=0, atol=2e-4)


def test_state_is_four_numbers_a_row_and_the_planner_counts_them() -> None:
    params = make_params([(48, 24)])
    plain, normalized = build("galore_adamw", params, rank=4), build("gradnorm_lorp", make_params([(48, 24)]), rank=4)
    for opt in (plain, normalized):
        opt.param_groups[0]["params"][0].grad = torch.randn(48, 24, dtype=torch.float64)
        opt.step()

    def held(opt: torch.optim.Optimizer) -> int:
        state = opt.state[opt.param_groups[0]["params"][0]]
        return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))

    assert held(normalized) - held(plain) == 4 * 48 * 8 == weight_norm.state_bytes(48, torch.float64)
    group = normalized.param_groups[0]
    assert gradproj.state_bytes(group["params"][0], group) == held(normalized)


def test_magnitude_and_direction_norm_rebuild_the_weight() -> None:
    """After any step ``W = g v / ||v||``: each row's norm is its magnitude (the state and the weight agree)."""
    params = make_params(SHAPES)
    opt = build("gradnorm_lorp", params, rank=4, update_proj_gap=3)
    for grads in grad_stream(params, 5):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    for p in params:
        state = opt.state[p]
        torch.testing.assert_close(p.detach().norm(dim=1), state["magnitude"].abs(), rtol=1e-12, atol=0)
        assert not torch.allclose(state["direction_norm"], state["magnitude"])  # v's norm moves on its own


def test_any_galore_group_may_set_it_and_a_plain_one_does_not_change() -> None:
    ours = make_params(SHAPES)
    preset = make_params(SHAPES)
    a = gradproj.GaLoreAdamW([{"params": ours, "rank": 4, "weight_norm": True}], lr=1e-2)
    b = gradproj.GradNormLoRP([{"params": preset, "rank": 4}], lr=1e-2)
    for grads in grad_stream(ours, 3):
        for opt, params in ((a, ours), (b, preset)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for x, y in zip(ours, preset, strict=True):
        assert torch.equal(x, y)


def test_a_zero_row_is_refused_by_name() -> None:
    w = nn.Parameter(torch.randn(6, 4))
    with torch.no_grad():
        w[2] = 0
    opt = gradproj.GradNormLoRP([{"params": [("layers.0.down_proj.weight", w)], "rank": 2}], lr=1e-2)
    w.grad = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"layers\.0\.down_proj\.weight has 1 zero row\(s\) \(row 2 first\)"):
        opt.step()


@pytest.mark.parametrize(
    ("preset", "group", "message"),
    [
        ("galore_adamw", {"weight_norm": "yes"}, r"weight_norm='yes' is not valid; expected True or False"),
        ("fira_adamw", {"weight_norm": True}, r"residual='fira' on the direction is not built \(use residual='none'\)"),
        (
            "gradnorm_lorp",
            {"rank": "auto", "state_budget": 10**6},
            r"weight_norm=True is not supported with rank='auto'",
        ),
        ("galore_adafactor", {"weight_norm": True}, r"the adafactor rule has none \(use one of \('adam', 'adam8bit'\)"),
        ("racs", {"weight_norm": True}, r"the racs rule has none"),
    ],
)
def test_refused_combinations_say_why(preset: str, group: dict, message: str) -> None:  # type: ignore[type-arg]
    params = make_params([(16, 8)])
    kwargs = {"lr": 1e-2}
    with pytest.raises(ValueError, match=message):
        gradproj.PRESETS[preset]([{"params": params, "rank": 4, **group}], **kwargs)


def test_fsdp_and_the_fast_path_are_refused_with_the_reason() -> None:
    assert not METHODS["gradnorm_lorp"].supports_fsdp and "gradnorm_lorp" not in gradproj.optim.registry.fsdp_capable()
    w = nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match="weight_norm=True steps the direction and the magnitude of one matrix"):
        gradproj.GradNormLoRP([{"params": [w], "rank": 2}], lr=1e-2, foreach=True)
