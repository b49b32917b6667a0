"""Stable-SPAM's gradient policy (:mod:`gradproj.optim.spikes`): the float64 twin step by step on every
Adam-style preset, pytorch_optimizer.StableSPAM where the algorithms coincide, resume, layer-wise
stepping, the clip and reset it reports, and its bad input."""

from __future__ import annotations

import io
import zlib

import pytest
import torch
from torch import nn

import gradproj
from conftest import PRESET_SPECS, build, exact_twin, grad_stream, make_params
from gradproj.optim.reference import ReferenceOptimizer
from gradproj.optim.spikes import SPIKE_DEFAULTS, police, policy_totals
from gradproj.projection.bases import derive_seed
from test_reference_twins import step_beside

SHAPES = [(48, 24), (24, 40)]
STEPS, GAP, RANK, RESET = 12, 4, 6, 5
POLICY = {"spike_policy": "stable_spam", "spam_reset_gap": RESET}
#: the presets whose groups have an Adam-style eps (Adafactor, with a pair of them, is refused)
POLICED = [p for p in PRESET_SPECS if p != "galore_adafactor" and exact_twin(p)]


def spiky_stream(params: list[torch.Tensor], steps: int) -> list[list[torch.Tensor]]:
    """Low-rank gradients with an entry 50x too large every third step and a whole matrix 20x on step 7."""
    stream = grad_stream(params, steps)
    for t, grads in enumerate(stream):
        for i, g in enumerate(grads):
            if t % 3 == 1:
                g.view(-1)[(7 * t + i) % g.numel()] *= 50
            if t == 7:
                g.mul_(20)
    return stream


@pytest.mark.usefixtures("engine_path")
@pytest.mark.parametrize("preset", POLICED)
@pytest.mark.parametrize("on_refresh", ["keep", "rotate"])
def test_policy_matches_the_twin_step_for_step(preset: str, on_refresh: str) -> None:
    spec = PRESET_SPECS[preset]
    dtype = torch.float32 if spec["rule"] == "adam8bit" else torch.float64
    shapes = [(80, 64), (64, 96)] if spec["rule"] == "adam8bit" else SHAPES
    names = [f"layer{i}.weight" for i in range(len(shapes))]
    group = {"rank": RANK, "update_proj_gap": GAP, "on_refresh": on_refresh, "weight_decay": 0.01}
    params = make_params(shapes, dtype)
    twin_params = [p.detach().clone() for p in params]
    opt = build(preset, params, names, **group, **POLICY)
    seeds = [derive_seed(0, zlib.crc32(n.encode())) for n in names]
    twin = ReferenceOptimizer(
        twin_params, rule=spec["rule"], residual=spec["residual"], lr=spec["kwargs"]["lr"], seeds=seeds,
        **{**spec["twin"], **group, **POLICY},
    )  # fmt: skip
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    step_beside(opt, twin, params, spiky_stream(params, STEPS), tol)
    assert all(opt.state[p]["spam_resets"] == STEPS // RESET for p in params)


@pytest.mark.usefixtures("engine_path")
@pytest.mark.parametrize("preset", ["galore_adamw", "galore_adamw8bit"])
def test_full_rank_groups_match_the_twin(preset: str) -> None:
    spec = PRESET_SPECS[preset]
    dtype = torch.float32 if spec["rule"] == "adam8bit" else torch.float64
    params = make_params([(80, 64), (7,)], dtype)
    twin_params = [p.detach().clone() for p in params]
    opt = build(preset, params, weight_decay=0.05, **POLICY)
    twin = ReferenceOptimizer(twin_params, rule=spec["rule"], residual="none", lr=1e-2, weight_decay=0.05, **POLICY)
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    step_beside(opt, twin, params, spiky_stream(params, STEPS), tol)


@pytest.mark.parametrize(("dtype", "foreach", "tol"), [(torch.float64, False, 1e-12), (torch.float32, None, 1e-6)])
def test_adamw_with_the_policy_matches_pytorch_optimizer_stable_spam(
    dtype: torch.dtype, foreach: bool | None, tol: float
) -> None:
    """Where the algorithms coincide (AdamW on every tensor, no cosine decay of beta1): the same weights
    and moments step for step; the peer's ``update_proj_gap`` is our ``spam_reset_gap``."""
    peer_module = pytest.importorskip("pytorch_optimizer")
    params = make_params([(48, 24), (24,)], dtype)
    peer_params = [p.detach().clone().requires_grad_() for p in params]
    ours = gradproj.GaLoreAdamW(
        params, lr=3e-3, eps=1e-8, weight_decay=0.1, foreach=foreach, spike_policy="stable_spam", spam_reset_gap=RESET
    )
    peer = peer_module.StableSPAM(peer_params, lr=3e-3, eps=1e-8, weight_decay=0.1, update_proj_gap=RESET)
    for t, grads in enumerate(spiky_stream(params, STEPS)):
        for a, b, g in zip(params, peer_params, grads, strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        peer.step()
        for i, (a, b) in enumerate(zip(params, peer_params, strict=True)):
            torch.testing.assert_close(a, b.detach(), rtol=tol, atol=tol, msg=f"step {t}: weight {i}")
            mine, theirs = ours.state[a], peer.state[b]
            torch.testing.assert_close(mine["exp_avg"], theirs["exp_avg"], rtol=tol, atol=tol)
            for key, their_key in (("spam_max", "m_max_t"), ("spam_norm", "m_norm_t"), ("spam_norm_sq", "v_norm_t")):
                torch.testing.assert_close(mine[key], theirs[their_key], rtol=tol, atol=tol, msg=key)


def test_a_spike_is_clipped_onto_the_threshold_and_counted() -> None:
    state, group = {}, {**SPIKE_DEFAULTS, **POLICY, "eps": 0.0}
    for _ in range(20):
        police(torch.full((4, 4), 1.0), state, group)
    spiky = torch.full((4, 4), 1.0)
    spiky[2, 3] = 1000.0
    clipped_before = float(state["spam_clipped"])
    police(spiky, state, group)
    theta, t = group["spam_theta"], state["spam_step"]
    threshold = float(state["spam_max"]) / (1 - theta**t)
    assert 1.0 < threshold < 100  # the maxima's mean, far below the spike
    ratio = float(spiky[2, 3] / spiky[0, 0])  # the spike sits on the threshold, the rest untouched
    assert ratio == pytest.approx(threshold, rel=1e-6)
    # AdaGN: the norm becomes the norms' bias-corrected mean over their RMS, about 1 whatever the gradient's size
    assert 0.5 < float(spiky.norm()) < 1.5
    assert float(state["spam_clipped"]) == clipped_before + 1


def test_the_moments_reset_every_gap_and_bias_correction_restarts() -> None:
    params = make_params([(12, 8)])
    opt = gradproj.GaLoreAdamW(params, lr=1e-2, spike_policy="stable_spam", spam_reset_gap=4)
    for t, grads in enumerate(grad_stream(params, 9), start=1):
        params[0].grad = grads[0]
        opt.step()
        expected = t if t < 4 else (t - 4) % 4 + 1  # steps 4 and 8 start the moments afresh
        assert opt.state[params[0]]["moment_step"] == expected, t
    assert opt.state[params[0]]["spam_resets"] == 2
    assert policy_totals(opt.state.values())["resets"] == 2


def test_a_resumed_run_continues_in_lockstep() -> None:
    def run(opt: gradproj.ProjectedOptimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> None:
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()

    def make(ps: list[torch.nn.Parameter]) -> gradproj.ProjectedOptimizer:
        groups = [{"params": ps[:1], "rank": 8, "update_proj_gap": 3}, {"params": ps[1:]}]
        return gradproj.GaLoreAdamW8bit(groups, lr=1e-2, **POLICY)

    straight, first = make_params([(80, 64), (64,)], torch.float32), make_params([(80, 64), (64,)], torch.float32)
    stream = spiky_stream(straight, 11)
    run(make(straight), straight, stream)
    opt = make(first)
    run(opt, first, stream[:6])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = make(first)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    run(resumed, first, stream[6:])
    for a, b in zip(straight, first, strict=True):
        assert torch.equal(a, b)
    assert resumed.state[first[0]]["spam_step"] == 11


def test_layerwise_stepping_equals_the_standard_step() -> None:
    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 6)).double()

    def optimizer(m: nn.Module) -> gradproj.ProjectedOptimizer:
        groups = gradproj.param_groups(m, target_modules=["0", "2"], rank=3, update_proj_gap=3)
        return gradproj.FiraAdamW(groups, lr=1e-2, spike_policy="stable_spam", spam_reset_gap=4)

    standard, layerwise = model(), model()
    plain_opt, stepper = optimizer(standard), gradproj.attach_layerwise(optimizer(layerwise))
    for step in range(9):
        g = torch.Generator().manual_seed(step)
        x, y = (
            torch.randn(16, 12, generator=g, dtype=torch.float64),
            torch.randn(16, 6, generator=g, dtype=torch.float64),
        )
        (standard(x) - y).square().mean().backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        (layerwise(x) - y).square().mean().backward()
        stepper.optimizer.step()
    for a, b in zip(standard.parameters(), layerwise.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    assert all(s["spam_resets"] == 2 for s in stepper.optimizer.state.values())


def test_the_constructor_keyword_reaches_every_group() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    groups = gradproj.param_groups(model, target_modules=["0"], rank=2)
    opt = gradproj.Alice(groups, spike_policy="stable_spam", spam_theta=0.99)
    assert [g["spike_policy"] for g in opt.param_groups] == ["stable_spam"] * len(opt.param_groups)
    assert all(g["spam_theta"] == 0.99 and g["spam_reset_gap"] == 1000 for g in opt.param_groups)
    assert "spike_policy" not in gradproj.GaLoreAdamW(model.parameters()).param_groups[0]  # none: no new keys


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"spike_policy": "spam"}, r"spike_policy='spam' is not valid; expected one of \('none', 'stable_spam'\)"),
        ({**POLICY, "spam_gamma1": 1.0}, r"spam_gamma1=1.0 is not valid; expected a number in \[0, 1\)"),
        ({**POLICY, "spam_theta": -0.1}, r"spam_theta=-0.1 is not valid"),
        ({**POLICY, "spam_reset_gap": -1}, r"spam_reset_gap=-1 is not valid; expected an integer >= 0"),
        ({**POLICY, "spam_reset_gap": 2.5}, r"spam_reset_gap=2.5 is not valid"),
    ],
)
def test_bad_policy_options_name_the_value(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gradproj.GaLoreAdamW(make_params([(4, 4)]), **options)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):  # per group as well
        gradproj.GaLoreAdamW([{"params": make_params([(4, 4)]), **options}])


def test_a_projected_gradient_is_refused_under_the_policy() -> None:
    params = make_params([(12, 8)])
    opt = gradproj.GaLoreAdamW([{"params": params, "rank": 2}], lr=1e-2, **POLICY)
    assert opt.needs_full_gradient(params[0])
    low, grad = torch.zeros(2, 8, dtype=torch.float64), torch.ones(12, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs its full gradient this step"):
        opt.step_parameter(params[0], low=low)
    with pytest.raises(ValueError, match="has a gradient policy; pass its full gradient, not low"):
        opt.step_parameter(params[0], grad, low=low)
    assert opt.state[params[0]] == {}  # nothing changed


def test_relative_step_adafactor_is_refused() -> None:
    with pytest.raises(ValueError, match="spike_policy='stable_spam' needs an Adam-style group"):
        gradproj.GaLoreAdafactor(make_params([(4, 4)]), spike_policy="stable_spam")


def test_the_planned_state_counts_the_policy_statistics() -> None:
    from gradproj.optim.groups import state_bytes
    from gradproj.train.logs import optimizer_state_bytes

    model = nn.Sequential(nn.Linear(64, 80), nn.LayerNorm(80))
    groups = gradproj.param_groups(model, target_modules=["0"], rank=8)
    opt = gradproj.GaLoreAdamW8bit(groups, lr=1e-2, spike_policy="stable_spam")
    model(torch.randn(4, 64)).square().mean().backward()
    opt.step()
    planned = sum(state_bytes(p, g, opt.rule.name) for g in opt.param_groups for p in g["params"])
    assert planned == optimizer_state_bytes(opt)
    assert policy_totals(opt.state.values())["clipped"] >= 0


def test_the_spec_builds_the_policy_and_refuses_what_cannot_run_it() -> None:
    from gradproj.optim.build import OptimizerSpec, build_optimizer

    model = nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 16))
    adamw = build_optimizer(model, OptimizerSpec(name="adamw", spike_policy="stable_spam", target_modules="1"))
    assert isinstance(adamw, gradproj.ProjectedOptimizer)  # the engine's AdamW: torch's reads gradients as they are
    assert all(g["spike_policy"] == "stable_spam" and g["eps"] == 1e-8 for g in adamw.param_groups)
    variant = build_optimizer(model, OptimizerSpec(name="galore_adamw8bit+stable_spam", rank=4, target_modules="1"))
    assert all(g["spike_policy"] == "stable_spam" for g in variant.param_groups)
    with pytest.raises(ValueError, match="--spike-policy stable_spam needs one of gradproj's optimizers"):
        build_optimizer(model, OptimizerSpec(name="galore-torch", spike_policy="stable_spam", target_modules="1"))
    with pytest.raises(ValueError, match=r"--spam-reset-gap set.* add --spike-policy stable_spam"):
        OptimizerSpec(spam_reset_gap=10)
    with pytest.raises(ValueError, match=r"spam_theta=1.0 is not valid; expected a number in \[0, 1\)"):
        OptimizerSpec(spike_policy="stable_spam", spam_theta=1.0)


def test_the_trainer_logs_and_reports_clips_and_resets(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from gradproj.optim.build import OptimizerSpec
    from gradproj.report import load_run
    from gradproj.report_schedule import policy_events, policy_figure
    from gradproj.train import PretrainConfig, pretrain
    from gradproj.train.text import prepare_pretrain_data

    spec = OptimizerSpec(name="galore_adamw", spike_policy="stable_spam", spam_reset_gap=4)
    cfg = PretrainConfig(model="llama-tiny", batch_size=4, seq_len=32, eval_tokens=2048, progress=False,
                         tensorboard=False, steps=10, log_every=2, optim=spec, out=str(tmp_path))  # fmt: skip
    pretrain(cfg, data=prepare_pretrain_data(None, None, 4096, 32))
    summary = json.loads((tmp_path / "summary.json").read_text())["gradient_policy"]
    assert summary["resets"] == 2 * summary["tensors"] and summary["clipped"] > 0  # steps 4 and 8, every tensor
    steps, clipped, resets = policy_events(load_run(tmp_path))
    assert steps == [2, 4, 6, 8, 10] and sum(clipped) == summary["clipped"] and resets == [4, 8]
    assert policy_figure(load_run(tmp_path)) is not None


def test_the_sweep_table_counts_divergence_and_judges_the_best_rate() -> None:
    from gradproj.bench.policy import policy_table, policy_verdict

    def rec(method: str, lr: float, seed: int, ppl: float, nonfinite: bool = False) -> dict[str, object]:
        return {"method": method, "lr_matrix": lr, "val_ppl": ppl, "unigram_ppl": 500.0, "diverged": nonfinite,
                "step_seconds_median": 0.05, "config": {"seed": seed}}  # fmt: skip

    base, variant = "galore_adamw8bit", "galore_adamw8bit+stable_spam"
    records = [rec(base, 0.01, s, 80.0 + s) for s in range(3)]
    records += [rec(base, 0.08, 0, float("nan"), nonfinite=True)] + [rec(base, 0.08, s, 600.0) for s in (1, 2)]
    records += [rec(variant, 0.01, s, 90.0 + s) for s in range(3)] + [rec(variant, 0.08, s, 99.0) for s in range(3)]
    verdict = policy_verdict(records)
    assert verdict.startswith(f"{variant} diverged at no rate of 2 where {base} diverged at 1 (0.08)")
    assert "91.00 vs 81.00 (+12.3% of the mean), worse, beyond the seeds' spread (2.00)" in verdict
    single = policy_verdict([r for r in records if r["config"]["seed"] == 1])  # type: ignore[index]
    assert "91.00 vs 81.00 (+12.3% of the mean), one seed: no spread to judge the gap by." in single
    rows = policy_table(records).splitlines()
    assert f"| 0.08 | {base} | 3 | 3 | - | - | 50 |" in rows  # non-finite or above the unigram model: diverged
    assert f"| 0.08 | {variant} | 3 | 0 | 99.00 | 99.00 - 99.00 | 50 |" in rows
