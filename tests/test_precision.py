"""bf16 weights: the optimizer computes in float32 and rounds the result by ``bf16_update``
(nearest, stochastic, kahan); float32 moments; the state's bytes as planned; resume bit-exact."""

from __future__ import annotations

import io

import pytest
import torch

import gradproj
from gradproj.optim.build import OptimizerSpec, build_optimizer
from gradproj.optim.groups import state_bytes
from gradproj.optim.precision import COMPENSATION, stochastic_round
from gradproj.optim.registry import trainer_methods
from gradproj.train.logs import optimizer_state_bytes
from gradproj.train.models import build_causal_lm

VOCAB, SEQ = 256, 32


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour() -> None:
    torch.manual_seed(0)
    x = torch.randn(64).mul(3)
    lower = x.to(torch.bfloat16)  # nearest: one of the two neighbours
    draws = torch.stack(
        [stochastic_round(x.clone(), torch.Generator().manual_seed(s)).float() for s in range(2000)]
    )  # 2000 x 64
    ulp = (x.abs().log2().floor() - 7).exp2()  # bf16's spacing at |x|
    below, above = x - ulp, x + ulp
    assert bool(((draws >= below) & (draws <= above)).all())
    assert len({tuple(row.tolist()) for row in draws}) > 1  # it is random
    assert torch.allclose(draws.mean(0), x, atol=0, rtol=2e-3)  # the mean is x, not its nearest bf16
    assert not torch.allclose(lower.float(), x, atol=0, rtol=1e-4)  # (nearest alone would not be)
    exact = torch.tensor([1.0, -2.5, 0.0, 3.0 * 2**-20])
    assert torch.equal(stochastic_round(exact.clone(), torch.Generator()).float(), exact)  # representable: kept


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_causal_lm("llama-tiny", vocab_size=VOCAB, seq_len=SEQ).to(dtype)


def _steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_adamw_on_bf16_weights_is_torch_adamw_in_float32_rounded_to_nearest() -> None:
    model = _model(torch.bfloat16)
    ours = build_optimizer(model, OptimizerSpec(name="adamw"))
    assert isinstance(ours, gradproj.ProjectedOptimizer)  # torch's AdamW would keep bf16 moments
    shadow = [torch.nn.Parameter(p.detach().float()) for p in model.parameters()]
    groups = [{**g, "params": [shadow[i] for i in _indices(model, g)]} for g in ours.param_groups]
    reference = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")} for g in groups], eps=1e-8
    )
    for step in range(3):
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        for p, s in zip(model.parameters(), shadow, strict=True):
            s.data.copy_(p.detach().float())  # the reference starts each step from the bf16 weight
            s.grad = p.grad.float()
        ours.step()
        reference.step()
        for p, s in zip(model.parameters(), shadow, strict=True):
            assert torch.equal(p.detach(), s.detach().to(torch.bfloat16))
        ours.zero_grad(set_to_none=True)
    moments = {v.dtype for state in ours.state.values() for v in state.values() if isinstance(v, torch.Tensor)}
    assert moments == {torch.float32}


def _indices(model: torch.nn.Module, group: dict) -> list[int]:  # type: ignore[type-arg]
    ids = {id(p): i for i, p in enumerate(model.parameters())}
    return [ids[id(p)] for p in group["params"]]


@pytest.mark.parametrize("method", [m.name for m in trainer_methods()])
def test_state_bytes_of_bf16_weights_are_exact(method: str) -> None:
    mode = "kahan"  # float32 moments and the buffer (stochastic and nearest hold the moments alone)
    if "8bit" in method:
        pytest.importorskip("bitsandbytes")
    model = _model(torch.bfloat16)
    optimizer = build_optimizer(model, OptimizerSpec(name=method, rank=8), bf16_update=mode)
    _steps(model, optimizer, 2)
    rule = optimizer.rule.name  # type: ignore[attr-defined]
    planned = sum(state_bytes(p, g, rule) for g in optimizer.param_groups for p in g["params"])
    assert planned == optimizer_state_bytes(optimizer)
    buffers = [s for s in optimizer.state.values() if COMPENSATION in s]
    assert len(buffers) == (sum(1 for _ in model.parameters()) if mode == "kahan" else 0)


def test_small_updates_survive_with_kahan_and_stochastic_but_not_nearest() -> None:
    """lr 1e-4 on weights near 1: each step is about 1/40 of a bf16 ulp, so nearest rounding drops it."""
    moved = {}
    for mode in ("nearest", "stochastic", "kahan"):
        w = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        optimizer = gradproj.GaLoreAdamW([{"params": [w]}], lr=1e-4, bf16_update=mode)
        for _ in range(200):
            w.grad = torch.ones_like(w)
            optimizer.step()
        moved[mode] = 1 - float(w.detach().float().mean())
    assert moved["nearest"] == 0.0  # the paper's pure bf16: nothing moved
    for mode in ("stochastic", "kahan"):
        assert abs(moved[mode] - 200 * 1e-4) < 0.1 * 200 * 1e-4, (mode, moved)


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
def test_resume_is_bit_exact_and_layerwise_rounds_alike(mode: str) -> None:
    spec = OptimizerSpec(name="galore_adamw", rank=8, update_proj_gap=2)
    straight = _model(torch.bfloat16)
    _steps(straight, build_optimizer(straight, spec, bf16_update=mode), 4)

    first = _model(torch.bfloat16)
    optimizer = build_optimizer(first, spec, bf16_update=mode)
    _steps(first, optimizer, 2)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model(torch.bfloat16)
    resumed.load_state_dict(saved["model"])
    again = build_optimizer(resumed, spec, bf16_update=mode)
    again.load_state_dict(saved["optimizer"])
    _steps(resumed, again, 2, start=2)

    layered = _model(torch.bfloat16)
    stepped = build_optimizer(layered, spec, layerwise=True, bf16_update=mode)
    gradproj.attach_layerwise(stepped)  # type: ignore[arg-type]
    _steps(layered, stepped, 4)
    for a, b, c in zip(straight.parameters(), resumed.parameters(), layered.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_bf16_update_is_validated() -> None:
    w = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match=r"bf16_update='round' is not valid; expected one of \('nearest'"):
        gradproj.GaLoreAdamW([w], bf16_update="round")
    with pytest.raises(ValueError, match="needs one of gradproj's optimizers"):
        build_optimizer(_model(torch.bfloat16), OptimizerSpec(name="galore-torch"), bf16_update="kahan")
