"""Layer-wise (in-backward) updates: same maths as the standard step, accumulation in low rank,
clipping with the previous step's norm, resume, memory, and the failure modes."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import gradproj
from gradproj.layerwise import NORM_KEY

PRESETS = {
    "galore": (gradproj.GaLoreAdamW, {"scale": 0.25}),
    "galore-rsvd-rotate": (gradproj.GaLoreAdamW, {"projector": "rsvd", "on_refresh": "rotate"}),
    "galore-random": (gradproj.GaLoreAdamW, {"projector": "random"}),
    "galore-adafactor": (gradproj.GaLoreAdafactor, {"relative_step": False}),
    "fira": (gradproj.FiraAdamW, {"scale": 0.25}),
    "apollo": (gradproj.APOLLOAdamW, {}),
    "alice": (gradproj.Alice, {}),
    "alice0": (gradproj.Alice0, {"leading_basis": 1}),
    "racs": (gradproj.RACS, {}),
    "gradnorm_lorp": (gradproj.GradNormLoRP, {}),
    "muon": (gradproj.Muon, {}),
    "subspace_muon": (gradproj.SubspaceMuon, {}),
    "scale": (gradproj.SCALE, {"momentum": 0.9}),
}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 10), nn.LayerNorm(10), nn.Linear(10, 6)).double()


def make_optimizer(model: nn.Module, preset: str) -> gradproj.ProjectedOptimizer:
    cls, options = PRESETS[preset]
    groups = gradproj.param_groups(model, target_modules=["0", "2"], rank=3, update_proj_gap=3)
    return cls(groups, lr=1e-2, **options)


def batch(step: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(size, 12, generator=g, dtype=torch.float64), torch.randn(
        size, 6, generator=g, dtype=torch.float64
    )


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).square().mean()


def run_standard(
    model: nn.Module, opt: torch.optim.Optimizer, steps: int, accum: int = 1, clip: float = 0.0
) -> list[float]:
    norms = []
    for step in range(steps):
        x, y = batch(step)
        for xs, ys in zip(x.chunk(accum), y.chunk(accum), strict=True):
            (loss_of(model, xs, ys) / accum).backward()
        params = [p for g in opt.param_groups for p in g["params"]]
        norms.append(float(nn.utils.clip_grad_norm_(params, clip if clip else math.inf)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return norms


def run_layerwise(model: nn.Module, stepper: gradproj.LayerwiseStepper, steps: int, start: int = 0) -> list[float]:
    norms = []
    accum = stepper.grad_accum
    for step in range(start, start + steps):
        x, y = batch(step)
        for xs, ys in zip(x.chunk(accum), y.chunk(accum), strict=True):
            (loss_of(model, xs, ys) / accum).backward()
        stepper.optimizer.step()  # a no-op under layer-wise updates: must not step twice
        norms.append(stepper.grad_norm)
    return norms


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_layerwise_equals_standard_step_for_step(preset: str) -> None:
    reference, layerwise = make_model(), make_model()
    run_standard(reference, make_optimizer(reference, preset), steps=7)
    stepper = gradproj.attach_layerwise(make_optimizer(layerwise, preset))
    run_layerwise(layerwise, stepper, steps=7)
    for a, b in zip(reference.parameters(), layerwise.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    assert all(p.grad is None for p in layerwise.parameters())


@pytest.mark.parametrize(
    "preset", ["galore", "galore-rsvd-rotate", "fira", "apollo", "alice", "racs", "gradnorm_lorp", "subspace_muon"]
)
@pytest.mark.parametrize("accum", [2, 4])
def test_k_micro_batches_equal_one_batch_of_k_times_b(preset: str, accum: int) -> None:
    """7 steps with gap 3 cross two refreshes: refresh steps accumulate full, others low rank."""
    big, small = make_model(), make_model()
    run_standard(big, make_optimizer(big, preset), steps=7, accum=1)
    stepper = gradproj.attach_layerwise(make_optimizer(small, preset), grad_accum=accum)
    run_layerwise(small, stepper, steps=7)
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)


def test_accumulation_keeps_low_rank_gradients_between_refreshes() -> None:
    model = make_model()
    opt = make_optimizer(model, "galore")
    stepper = gradproj.attach_layerwise(opt, grad_accum=2)
    run_layerwise(model, stepper, steps=1)  # step 0 is a refresh
    x, y = batch(1)
    loss_of(model, x[:8], y[:8]).backward()  # first micro-batch of step 1 (not a refresh)
    tall = model[0].weight  # 24 x 12 -> right side, low rank 24 x 3
    assert tall.grad is None and stepper._low[tall].shape == (24, 3)
    assert model[4].weight.grad is not None  # not projected: full accumulation as usual
    stepper.discard()
    assert not stepper._low and model[4].weight.grad is None and stepper.micro_batch == 0


def test_clipping_uses_the_previous_and_the_running_norm() -> None:
    """Replay the documented rule by hand on a standard run: each gradient, in the order the
    hooks see them, is scaled by min(1, c / max(previous step's norm, running norm so far))."""
    reference, layerwise = make_model(), make_model()
    ref_opt = make_optimizer(reference, "galore")
    order: list[torch.Tensor] = []
    for p in reference.parameters():
        p.register_post_accumulate_grad_hook(order.append)
    stepper = gradproj.attach_layerwise(make_optimizer(layerwise, "galore"), max_grad_norm=0.05)
    norms = run_layerwise(layerwise, stepper, steps=3)
    previous = 0.0
    for step in range(3):
        order.clear()
        x, y = batch(step)
        loss_of(reference, x, y).backward()
        running = 0.0
        for p in order:
            running += float(p.grad.norm()) ** 2
            p.grad.mul_(min(1.0, 0.05 / (max(previous, running**0.5) + 1e-6)))
        assert running**0.5 == pytest.approx(norms[step], rel=1e-12)  # reported norm = the real global norm
        previous = running**0.5
        ref_opt.step()
        ref_opt.zero_grad()
    assert min(norms) > 0.05  # clipping was active, so the comparison means something
    for a, b in zip(reference.parameters(), layerwise.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_resume_continues_exactly_with_the_saved_norm() -> None:
    straight = make_model()
    run_layerwise(straight, gradproj.attach_layerwise(make_optimizer(straight, "fira"), max_grad_norm=0.05), steps=6)
    first = make_model()
    opt = make_optimizer(first, "fira")
    run_layerwise(first, gradproj.attach_layerwise(opt, max_grad_norm=0.05), steps=3)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert NORM_KEY in saved["opt"]["gradproj"]
    resumed = make_model(seed=1)
    resumed.load_state_dict(saved["model"])
    opt2 = make_optimizer(resumed, "fira")
    opt2.load_state_dict(saved["opt"])
    run_layerwise(resumed, gradproj.attach_layerwise(opt2, max_grad_norm=0.05), steps=3, start=3)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_peak_gradient_memory_is_about_one_layer() -> None:
    """Count the gradient elements alive whenever a gradient arrives (an independent hook)."""

    def peak_live_gradients(layerwise: bool) -> int:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(8)])
        peak = [0]

        def watch(_: torch.Tensor) -> None:
            peak[0] = max(peak[0], sum(p.grad.numel() for p in model.parameters() if p.grad is not None))

        for p in model.parameters():
            p.register_post_accumulate_grad_hook(watch)  # runs before the stepper's hook
        opt = gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=8), lr=1e-3)
        if layerwise:
            gradproj.attach_layerwise(opt)
        model(torch.randn(4, 64)).sum().backward()
        if layerwise:  # the stepper's own account agrees with the independent count
            assert opt.layerwise.peak_gradient_bytes == peak[0] * 4
        return peak[0]

    assert peak_live_gradients(False) == 8 * 64 * 64
    assert peak_live_gradients(True) == 64 * 64  # the stepper frees each gradient before the next arrives


def test_accumulation_holds_low_rank_sums_not_full_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(8)])
    opt = gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=8, update_proj_gap=10), lr=1e-3)
    stepper = gradproj.attach_layerwise(opt, grad_accum=4)
    for step in range(2):
        stepper.peak_gradient_bytes = 0
        for _ in range(4):
            model(torch.randn(4, 64)).sum().backward()
        if step == 0:  # a refresh: full gradients accumulate, as in standard training
            assert stepper.peak_gradient_bytes == 8 * 64 * 64 * 4
        else:  # between refreshes: at most the eight 64 x 8 sums plus the one 64 x 64 gradient in hand
            assert stepper.peak_gradient_bytes == (8 * 64 * 8 + 64 * 64) * 4


def test_nonfinite_gradient_skips_that_parameter_only() -> None:
    model = make_model()
    stepper = gradproj.attach_layerwise(make_optimizer(model, "galore"))
    before = [p.detach().clone() for p in model.parameters()]
    model[4].weight.register_hook(lambda g: g * math.nan)
    x, y = batch(0)
    loss_of(model, x, y).backward()
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert not changed[-2]  # the head's weight (second to last parameter) did not move
    assert changed[-1] and changed[0]  # its bias and the first layer did
    assert stepper.skipped_parameters == 1


def test_bad_input_and_detach() -> None:
    model = make_model()
    with pytest.raises(TypeError, match="gradproj optimizer"):
        gradproj.attach_layerwise(torch.optim.AdamW(model.parameters()))  # type: ignore[arg-type]
    opt = make_optimizer(model, "galore")
    with pytest.raises(ValueError, match="grad_accum=0"):
        gradproj.attach_layerwise(opt, grad_accum=0)
    with pytest.raises(ValueError, match="max_grad_norm=-1"):
        gradproj.attach_layerwise(opt, max_grad_norm=-1)
    stepper = gradproj.attach_layerwise(opt)
    with pytest.raises(RuntimeError, match="already steps layer-wise"):
        gradproj.attach_layerwise(opt)
    stepper.detach()
    x, y = batch(0)
    loss_of(model, x, y).backward()
    assert model[0].weight.grad is not None  # no hook stepped it
    before = model[0].weight.detach().clone()
    opt.step()  # the ordinary step again
    assert not torch.equal(before, model[0].weight)


def test_step_parameter_follows_the_live_groups_after_load_state_dict() -> None:
    """torch's load_state_dict rebuilds the group dicts; a scheduler then edits the new ones."""
    model = make_model()
    opt = make_optimizer(model, "galore")
    opt.load_state_dict(opt.state_dict())
    for group in opt.param_groups:
        group["lr"] = 0.0  # what a scheduler would write
    gradproj.attach_layerwise(opt)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(0)
    loss_of(model, x, y).backward()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_loading_a_state_dict_keeps_layerwise_stepping_attached() -> None:
    """torch's load_state_dict ends in __setstate__, which a copy goes through too; a load must not detach the
    stepper (the backward after it steps every parameter, and step() stays a no-op)."""
    model = make_model()
    opt = make_optimizer(model, "galore")
    stepper = gradproj.attach_layerwise(opt)
    opt.load_state_dict(opt.state_dict())
    assert opt.layerwise is stepper
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(0)
    loss_of(model, x, y).backward()
    assert not any(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    moved = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(m, p) for m, p in zip(moved, model.parameters(), strict=True))


def test_eight_bit_states_accumulate_in_low_rank_too() -> None:
    """8-bit quantization needs float32 weights; equality is to float32 rounding."""
    pytest.importorskip("bitsandbytes")

    def build() -> tuple[nn.Module, gradproj.ProjectedOptimizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 300), nn.Tanh(), nn.Linear(300, 6))
        groups = gradproj.param_groups(model, target_modules=["0", "2"], rank=3, update_proj_gap=3)
        return model, gradproj.GaLoreAdamW8bit(groups, lr=1e-2)

    (big, big_opt), (small, small_opt) = build(), build()
    gradproj.attach_layerwise(small_opt, grad_accum=2)
    for step in range(7):
        x, y = (t.float() for t in batch(step))
        loss_of(big, x, y).backward()
        big_opt.step()
        big_opt.zero_grad()
        for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True):
            (loss_of(small, xs, ys) / 2).backward()
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
