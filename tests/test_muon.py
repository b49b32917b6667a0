"""The Muon family: our muon rule equals torch.optim.Muon bit for bit (AdamW on the rest equal to torch's fused
AdamW), the 8-bit buffer follows the float one at a quarter of its bytes, SCALE's rule is the released code's
formula with momentum only where asked, the trainer's split gives SCALE's head and embedding their groups, and
bad options are refused naming the value."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradproj
from gradproj.optim.build import OptimizerSpec, build_optimizer
from gradproj.optim.registry import fsdp_capable
from gradproj.rules import make_rule
from gradproj.rules.colnorm import ColumnNorm
from gradproj.rules.muon import lr_ratio


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 48), nn.LayerNorm(48), nn.Linear(48, 8))


def _matrices(model: nn.Module) -> list[nn.Parameter]:
    return [model[0].weight, model[2].weight]  # one tall (48 x 16) and one wide (8 x 48) matrix


def _rest(model: nn.Module) -> list[nn.Parameter]:
    return [model[0].bias, model[1].weight, model[1].bias, model[2].bias]


def _train(models: list[nn.Module], optimizers: list[list[torch.optim.Optimizer]], steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(32, 16)
        for model, opts in zip(models, optimizers, strict=True):
            model.zero_grad()
            model(x).square().mean().backward()
            for opt in opts:
                opt.step()


@pytest.mark.parametrize("adjust_lr_fn", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_equals_torch_muon_with_adamw_on_the_rest_bit_for_bit(adjust_lr_fn: str, nesterov: bool) -> None:
    theirs, ours = _model(), _model()
    torch_muon = torch.optim.Muon(
        _matrices(theirs), lr=1e-2, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn
    )
    torch_adamw = torch.optim.AdamW(_rest(theirs), lr=3e-3, weight_decay=0.1, fused=True)
    groups = [{"params": _matrices(ours), "rank": 4}, {"params": _rest(ours), "lr": 3e-3}]
    options = {"momentum": 0.9, "nesterov": nesterov, "adjust_lr_fn": adjust_lr_fn, "ns_dtype": "bfloat16"}
    muon = gradproj.Muon(groups, lr=1e-2, weight_decay=0.1, **options)
    torch.manual_seed(1)
    _train([theirs, ours], [[torch_muon, torch_adamw], [muon]], steps=15)
    for a, b in zip(theirs.parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b)
    for p, q in zip(_matrices(ours), _matrices(theirs), strict=True):  # torch's state key, torch's values
        assert torch.equal(muon.state[p]["momentum_buffer"], torch_muon.state[q]["momentum_buffer"])


def test_the_step_size_is_torchs_adjusted_rate() -> None:
    assert lr_ratio("match_rms_adamw", (48, 16)) == pytest.approx(0.2 * 48**0.5)
    assert lr_ratio("original", (48, 16)) == pytest.approx(3**0.5)
    assert lr_ratio("original", (16, 48)) == 1.0


def test_float32_iterations_follow_the_bf16_ones_closely_and_differ() -> None:
    """The default runs the iterations in the step's dtype: not torch's bits, the same update within bf16's error."""
    runs = []
    for dtype in (None, "bfloat16"):
        model = _model()
        opt = gradproj.Muon([{"params": _matrices(model), "rank": 4}], lr=1e-2, ns_dtype=dtype)
        torch.manual_seed(1)
        _train([model], [[opt]], steps=3)
        runs.append(model[0].weight.detach().clone())
    assert not torch.equal(runs[0], runs[1])
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=3e-3 * 3)  # three steps of lr 0.01 x ~1% error


def test_8bit_buffer_follows_the_float_one_at_a_quarter_of_the_bytes() -> None:
    shape, weights = (96, 64), []
    for rule_name in ("muon", "muon8bit"):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(shape))
        opt = gradproj.Muon([{"params": [w], "rank": 4, "rule": rule_name}], lr=1e-2)
        for _ in range(5):
            w.grad = torch.randn(shape)
            opt.step()
        weights.append(w.detach().clone())
        state = opt.state[w]
        held = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
        assert held == make_rule(rule_name).state_bytes(shape, torch.float32)
    assert make_rule("muon8bit").state_bytes(shape, torch.float32) < 0.27 * make_rule("muon").state_bytes(
        shape, torch.float32
    )
    assert not torch.equal(weights[0], weights[1])
    torch.testing.assert_close(weights[1], weights[0], rtol=0, atol=5 * 1e-2 * 0.05)  # 5 steps, 5% of a step


def test_colnorm_is_the_released_formula_with_momentum_only_where_asked() -> None:
    torch.manual_seed(0)
    rule, grads = ColumnNorm(), [torch.randn(6, 5, dtype=torch.float64) for _ in range(3)]
    for momentum, dim in ((0.0, 1), (0.9, 1), (0.0, 0)):
        state: dict = {}
        rule.init_state(state, (6, 5), grads[0])
        m = torch.zeros(6, 5, dtype=torch.float64)
        for g in grads:
            u, step = rule.direction(g, state, {"lr": 0.1, "momentum": momentum, "norm_dim": dim}, None)
            m = m.lerp(g, 1 - momentum) if momentum else g
            expected = m / torch.sqrt(torch.mean(torch.square(m), dim=dim, keepdim=True)).clamp_min(1e-8)
            torch.testing.assert_close(u, expected, rtol=1e-14, atol=1e-14)
            assert step == 0.1
        assert ("momentum_buffer" in state) == (momentum > 0)
        assert rule.state_bytes((6, 5), torch.float64, {"momentum": momentum}) == (240 if momentum else 0)


def test_scale_gives_the_head_and_the_embedding_their_own_groups() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    opt = build_optimizer(model, OptimizerSpec(name="scale", lr=1e-3, other_lr=3e-2, rank=4))
    by_name = {name: g for g in opt.param_groups for name in g.get("param_names", ())}
    head, embedding = by_name["lm_head.weight"], by_name["model.embed_tokens.weight"]
    assert head["rule"] == embedding["rule"] == "colnorm" and head["lr"] == embedding["lr"] == 1e-3
    assert (head["momentum"], head["norm_dim"]) == (0.9, 1)
    assert (embedding["momentum"], embedding["norm_dim"]) == (0.0, 0)
    blocks = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert (blocks["momentum"], blocks["norm_dim"], blocks["lr"]) == (0.0, 1, 1e-3)
    norms = by_name["model.norm.weight"]
    assert "rank" not in norms and norms["lr"] == 3e-2  # AdamW on the norms
    model(torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    opt.step()
    held = {name: sorted(k for k, v in opt.state[p].items() if isinstance(v, torch.Tensor))
            for g in opt.param_groups for name, p in zip(g["param_names"], g["params"], strict=True)}  # fmt: skip
    assert held["lm_head.weight"] == ["momentum_buffer"]  # the head alone keeps momentum
    assert held["model.embed_tokens.weight"] == held["model.layers.0.self_attn.q_proj.weight"] == []


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("momentum", 1.0, r"momentum=1\.0 is not valid; expected a number in \[0, 1\)"),
        ("adjust_lr_fn", "spectral", "adjust_lr_fn='spectral' is not valid; expected one of match_rms_adamw, original"),
        ("ns_steps", 0, "ns_steps=0 is not valid; expected an integer >= 1"),
        ("ns_dtype", "int8", "ns_dtype='int8' is not valid; expected one of bfloat16"),
        ("norm_dim", 2, "norm_dim=2 is not valid; expected one of 0, 1"),
    ],
)
def test_bad_options_are_refused_naming_the_value(option: str, value: object, message: str) -> None:
    w = nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=message):
        gradproj.Muon([{"params": [w], "rank": 2, option: value}])


def test_the_family_steps_fsdp2_so_the_fsdp_suites_run_it() -> None:
    """tests/fsdp_worker.py and tests/test_fsdp_trainer.py take every FSDP-capable method from the registry: these
    must be among them (Muon's momentum is orthogonalized whole on one rank, SCALE's scaling is row-local or
    all-reduced), or those suites would silently skip them."""
    assert {"muon", "muon8bit", "subspace_muon", "scale"} <= set(fsdp_capable())


def test_the_trainer_builds_torchs_muon_and_ours_on_the_same_matrices_at_the_same_rates() -> None:
    """The bench's peer (torch.optim.Muon on the targeted matrices, AdamW on the rest) and our muon method from one
    spec: the same parameter split and rates, and runs that stay together (torch's AdamW kernel on the rest is its
    for-each one, ours the fused one: not bitwise, within 1e-5 after 5 steps)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gradproj.optim.external import Joined

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    models, optimizers = [], []
    for name in ("muon-torch", "muon"):
        torch.manual_seed(0)
        models.append(LlamaForCausalLM(config))
        optimizers.append(build_optimizer(models[-1], OptimizerSpec(name=name, lr=1e-2, other_lr=3e-2, rank=4)))
    peer, ours = optimizers
    assert isinstance(peer, Joined) and isinstance(peer.optimizers[0], torch.optim.Muon)
    assert [len(g["params"]) for g in peer.param_groups] == [len(g["params"]) for g in ours.param_groups] == [7, 5]
    assert sorted(g["lr"] for g in peer.param_groups) == sorted(g["lr"] for g in ours.param_groups)
    assert peer.optimizers[0].param_groups[0]["adjust_lr_fn"] == ours.param_groups[0]["adjust_lr_fn"]
    for _ in range(5):
        ids = torch.randint(0, 64, (2, 8))
        for model, opt in zip(models, optimizers, strict=True):
            model.zero_grad()
            model(ids, labels=ids).loss.backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_the_muon_peer_takes_the_momentum_and_iterations_given() -> None:
    model = _model()
    spec = OptimizerSpec(name="muon-torch", momentum=0.8, ns_steps=3, target_modules=["0", "2"], rank=4)
    peer = build_optimizer(model, spec).optimizers[0]  # type: ignore[attr-defined]
    group = peer.param_groups[0]
    assert (group["momentum"], group["ns_steps"], group["adjust_lr_fn"]) == (0.8, 3, "match_rms_adamw")
    default = build_optimizer(_model(), OptimizerSpec(name="muon-torch", target_modules=["0", "2"], rank=4))
    assert default.optimizers[0].param_groups[0]["momentum"] == 0.95  # type: ignore[attr-defined]  # torch's
