"""Energy-allocated ranks within a state budget (``rank="auto"``): the greedy allocation, the engine
against its float64 twin on both engine paths (every on_refresh policy, svd and rsvd, GaLore and Fira,
fixed and adaptive gaps), the budget held at every step, resume in lockstep across rank changes, the
planner, and bad input."""

from __future__ import annotations

import io
import zlib
from typing import Any

import pytest
import torch

import gradproj
from conftest import PRESET_SPECS, build, make_params
from gradproj.optim.groups import group_state_bytes, rank_bytes
from gradproj.optim.ranks import allocate, allocate_due, demand, parse_budget
from gradproj.optim.reference import ReferenceOptimizer
from gradproj.projection.bases import derive_seed
from gradproj.train.logs import optimizer_state_bytes

SHAPES = [(48, 24), (24, 40), (32, 32)]
NAMES = ["layer0.weight", "layer1.weight", "layer2.weight"]
STEPS = 30
#: a budget between rank 1 and the cap everywhere, so that the allocation binds and differs per matrix
BUDGET = 6000


def _stream(shapes: list[tuple[int, int]] = SHAPES, dtype: torch.dtype = torch.float64) -> list[list[torch.Tensor]]:
    """Gradients of rank 1, 3 and 5 (matrices 0, 1, 2) whose subspaces drift, then of rank 5, 2 and 1 from
    step 12 on, plus noise, each matrix at its own energy scale (the shares are relative: scale must not
    matter): the ranks the budget allows change across matrices and over time."""
    gen = torch.Generator().manual_seed(5)
    ranks_before, ranks_after = [1, 3, 5], [5, 2, 1]
    factors = [
        (torch.randn(m, 5, generator=gen, dtype=dtype), torch.randn(n, 5, generator=gen, dtype=dtype),
         torch.randn(m, 5, generator=gen, dtype=dtype), torch.randn(n, 5, generator=gen, dtype=dtype))
        for m, n in shapes
    ]  # fmt: skip
    weights = torch.tensor([1.0, 0.8, 0.6, 0.5, 0.4], dtype=dtype)  # (5,): the directions' strengths
    out = []
    for t in range(STEPS):
        grads = []
        for i, ((u, v, du, dv), (m, n)) in enumerate(zip(factors, shapes, strict=True)):
            k = ranks_before[i] if t < 12 else ranks_after[i]
            left, right = (u + 0.05 * t * du)[:, :k], (v + 0.05 * t * dv)[:, :k]  # (m, k), (n, k)
            noise = 0.02 * torch.randn(m, n, generator=gen, dtype=dtype)
            grads.append((1 + 4 * i) * ((left * weights[:k]) @ right.T + noise))
        out.append(grads)
    return out


def _auto(**options: Any) -> dict[str, Any]:
    return {"rank": "auto", "state_budget": BUDGET, "max_rank": 8, "energy_target": 0.95, **options}


def test_allocate_takes_the_largest_share_per_byte_first_up_to_each_demand() -> None:
    shares = [torch.tensor([0.5, 0.3, 0.1, 0.05]), torch.tensor([0.9, 0.05, 0.04, 0.01])]
    # unlimited budget: each matrix stops at its demand for the target
    assert allocate(shares, [10, 10], [0, 0], 10**6, 0.9) == [3, 1]
    assert demand(shares[0], 0.9) == 3 and demand(shares[1], 0.99) == 4
    # a cheaper matrix gets its units first at equal shares; the budget stops both
    assert allocate([torch.tensor([0.5, 0.2, 0.2]), torch.tensor([0.5, 0.2, 0.2])], [20, 10], [0, 0], 50, 1.0) == [1, 3]
    # a unit that does not fit is skipped, a cheaper later one still taken
    assert allocate([torch.tensor([0.5, 0.4]), torch.tensor([0.5, 0.1])], [30, 5], [0, 0], 40, 1.0) == [1, 2]
    with pytest.raises(ValueError, match="below 20"):
        allocate(shares, [10, 10], [0, 0], 19, 0.9)


def test_allocate_due_keeps_what_the_others_hold() -> None:
    shares = [torch.tensor([0.4, 0.3, 0.2]), torch.tensor([0.4, 0.3, 0.2])]
    # matrix 1 holds rank 3 (its target under this budget is 2): matrix 0 gets only what is left
    assert allocate_due(shares, [10, 10], [0, 0], 40, 1.0, held=[None, 3]) == [1, 3]
    assert allocate_due(shares, [10, 10], [0, 0], 40, 1.0, held=[None, 2]) == [2, 2]


def _run_both(preset: str, **options: Any) -> tuple[gradproj.ProjectedOptimizer, list[list[int]]]:
    """Step the engine and its twin; assert equal ranks and weights (1e-9) at every step; return the
    optimizer and the ranks over time."""
    spec = PRESET_SPECS[preset]
    params = make_params(SHAPES, torch.float64)
    twin_params = [p.detach().clone() for p in params]
    group = _auto(**options)
    opt = build(preset, params, NAMES, **group)
    seeds = [derive_seed(0, zlib.crc32(n.encode())) for n in NAMES]
    twin = ReferenceOptimizer(
        twin_params, rule=spec["rule"], residual=spec["residual"], lr=spec["kwargs"].get("lr"), seeds=seeds,
        **{**spec["twin"], **group},
    )  # fmt: skip
    ranks = []
    for t, grads in enumerate(_stream()):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        twin.step(grads)
        ranks.append([opt.state[p]["rank"] for p in params])
        assert ranks[-1] == [s["rank"] for s in twin.state], f"step {t}"
        for p, q in zip(params, twin_params, strict=True):
            torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-9, msg=f"step {t}")
        assert optimizer_state_bytes(opt) <= BUDGET
    return opt, ranks


@pytest.mark.usefixtures("engine_path")
@pytest.mark.parametrize("on_refresh", ["keep", "reset", "rotate"])
@pytest.mark.parametrize("projector", ["svd", "rsvd"])
def test_engine_matches_its_twin_and_holds_the_budget(projector: str, on_refresh: str) -> None:
    _, ranks = _run_both("galore_adamw", projector=projector, on_refresh=on_refresh, update_proj_gap=4)
    assert len({tuple(r) for r in ranks}) > 1, "the ranks never changed: the test would not see a resize"
    assert len({r for row in ranks for r in row}) > 1, "every matrix took the same rank"


@pytest.mark.usefixtures("engine_path")
@pytest.mark.parametrize("preset", ["galore_adamw", "fira_adamw"])
def test_adaptive_refresh_and_rank_together_match_the_twin(preset: str) -> None:
    adaptive = {"update_proj_gap": "auto", "min_gap": 3, "max_gap": 14, "check_every": 2, "energy_threshold": 0.9}
    opt, ranks = _run_both(preset, **adaptive)
    steps = [[opt.state[p]["last_refresh"] for p in group["params"]] for group in opt.param_groups]
    assert len(set(steps[0])) > 1, "every matrix refreshed on the same step: the due-only pass went unused"
    assert len({tuple(r) for r in ranks}) > 1, "the ranks never changed"


def test_a_budget_that_fits_the_cap_everywhere_is_fixed_rank_galore() -> None:
    """At a target of 1 and room for every cap, each matrix takes its cap: the same run as a fixed rank."""
    params, fixed = make_params(SHAPES, torch.float64), make_params(SHAPES, torch.float64)
    auto = build("galore_adamw", params, NAMES, **_auto(state_budget=10**7, max_rank=4, energy_target=1.0))
    plain = build("galore_adamw", fixed, NAMES, rank=4)
    for grads in _stream():
        for p, q, g in zip(params, fixed, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        auto.step()
        plain.step()
    for p, q in zip(params, fixed, strict=True):
        assert auto.state[p]["rank"] == 4
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)


def test_resume_across_rank_changes_is_bit_exact() -> None:
    stream = _stream()
    params = make_params(SHAPES, torch.float64)
    straight = build("galore_adamw", params, NAMES, **_auto(update_proj_gap=4))
    half = STEPS // 2 + 1  # after the refresh at step 16 changed some ranks
    saved = None
    for t, grads in enumerate(stream):
        if t == half:
            buffer = io.BytesIO()
            torch.save({"weights": [p.detach().clone() for p in params], "opt": straight.state_dict()}, buffer)
            saved = buffer.getvalue()
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        straight.step()
    assert saved is not None
    loaded = torch.load(io.BytesIO(saved), weights_only=True)
    resumed_params = [torch.nn.Parameter(w) for w in loaded["weights"]]
    resumed = build("galore_adamw", resumed_params, NAMES, **_auto(update_proj_gap=4))
    resumed.load_state_dict(loaded["opt"])
    for grads in stream[half:]:
        for p, g in zip(resumed_params, grads, strict=True):
            p.grad = g.clone()
        resumed.step()
    for p, q in zip(params, resumed_params, strict=True):
        assert torch.equal(p.detach(), q.detach())
        assert straight.state[p]["rank"] == resumed.state[q]["rank"]


def test_the_planner_counts_the_budget_and_the_real_state_stays_within_it() -> None:
    params = make_params(SHAPES, torch.float32)
    opt = build("galore_adamw", params, NAMES, **_auto())
    group = opt.param_groups[0]
    assert group_state_bytes(group) == BUDGET
    roomy = {**group, "state_budget": 10**9}
    at_cap = sum(b + per * min(8, *p.shape) for p in params for b, per in [rank_bytes(p, group)])
    assert group_state_bytes(roomy) == at_cap
    for grads in _stream(dtype=torch.float32)[:5]:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    base_and_per = [rank_bytes(p, group) for p in params]
    held = sum(b + per * opt.state[p]["rank"] for p, (b, per) in zip(params, base_and_per, strict=True))
    assert optimizer_state_bytes(opt) == held <= BUDGET  # the cost model is the real state, byte for byte


def test_bad_input_names_the_value_and_the_valid_range() -> None:
    params = make_params(SHAPES, torch.float32)
    least = sum(b + per for b, per in (rank_bytes(p, {**gradproj.GaLoreAdamW.projection_defaults(), **_auto()})
                                       for p in params))  # fmt: skip
    with pytest.raises(ValueError, match=f"state_budget=100 bytes is smaller than rank 1 everywhere.*>= {least}"):
        build("galore_adamw", params, NAMES, **_auto(state_budget=100))
    with pytest.raises(ValueError, match="needs the bytes of optimizer state"):
        build("galore_adamw", params, NAMES, rank="auto")
    with pytest.raises(ValueError, match=r"rank='x' is not valid; expected an integer >= 1 or 'auto'"):
        build("galore_adamw", params, NAMES, rank="x")
    with pytest.raises(ValueError, match=r"energy_target=1.5 is not valid; expected a number in \(0, 1\]"):
        build("galore_adamw", params, NAMES, **_auto(energy_target=1.5))
    with pytest.raises(ValueError, match="projector='dct' has no such order"):
        build("galore_adamw", params, NAMES, **_auto(projector="dct"))
    with pytest.raises(ValueError, match="the adafactor rule is not supported"):
        build("galore_adafactor", params, NAMES, **_auto())
    with pytest.raises(ValueError, match="layer-wise"):
        gradproj.attach_layerwise(build("galore_adamw", params, NAMES, **_auto()))
    with pytest.raises(ValueError, match="state_budget '12 apples' is not valid"):
        parse_budget("12 apples")


def test_spec_and_trainer_resolve_the_budget_against_the_fixed_rank() -> None:
    from dataclasses import replace

    from gradproj.optim.build import OptimizerSpec, _groups, budget_bytes, build_optimizer
    from gradproj.train.config import PretrainConfig

    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 32))
    spec = OptimizerSpec(name="galore_adamw", rank="auto", state_budget="0.5x", target_modules="all-linear")
    # the trainer names the rank it would have used; the fraction is of the method's state there
    resolved = PretrainConfig(optim=spec).optimizer_spec(default_rank=8)
    assert resolved.state_budget == "0.5x@8" and resolved.rank == "auto"
    group = _groups(model, resolved, summary=False, names=False)[0]
    fixed = budget_bytes(replace(resolved, state_budget="1x@8"), group)
    assert group["state_budget"] == fixed // 2
    fixed_opt = build_optimizer(model, replace(resolved, rank=8, state_budget=None))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    fixed_opt.step()
    matrices = {id(p) for p in group["params"]}
    held = sum(t.numel() * t.element_size() for p, s in fixed_opt.state.items() if id(p) in matrices
               for t in s.values() if isinstance(t, torch.Tensor))  # fmt: skip
    assert fixed == held  # "1x" is exactly what the fixed rank holds
    # the variant takes the state of --rank by default
    variant = OptimizerSpec(name="galore_adamw+auto_rank", rank=8, target_modules="all-linear")
    assert variant.resolved_rank == "auto" and variant.budget == "1x@8"
    with pytest.raises(ValueError, match="rank auto needs --state-budget"):
        OptimizerSpec(name="galore_adamw", rank="auto")
    with pytest.raises(ValueError, match="state_budget '3 apples' is not valid"):
        OptimizerSpec(name="galore_adamw", rank="auto", state_budget="3 apples")
    with pytest.raises(ValueError, match="--rank auto needs one of gradproj's optimizers"):
        build_optimizer(model, OptimizerSpec(name="galore-torch", rank="auto", state_budget="1MB"))


def test_cli_takes_rank_auto_and_refuses_a_bad_budget(capsys: pytest.CaptureFixture[str]) -> None:
    from gradproj.cli import main

    def exit_code(argv: list[str]) -> int:
        try:
            return int(main(argv) or 0)
        except SystemExit as stop:  # argparse's own errors
            return int(stop.code or 0)

    assert exit_code(["pretrain", "--rank", "auto", "--state-budget", "lots", "--steps", "1"]) != 0
    assert "state_budget 'lots' is not valid" in capsys.readouterr().err
    assert exit_code(["pretrain", "--rank", "sixty", "--steps", "1"]) != 0
    assert "'sixty' is not valid; expected an integer >= 1 or 'auto'" in capsys.readouterr().err


def test_the_memory_planner_plans_the_budget_and_the_baselines_at_the_reference_rank() -> None:
    from dataclasses import replace

    from gradproj.memory import Setup, meta_model
    from gradproj.memory import optimizer_state_bytes as planned
    from gradproj.optim.build import OptimizerSpec, _groups
    from gradproj.optim.groups import state_bytes

    spec = OptimizerSpec(rank="auto", state_budget="0.5x@8")
    setup = Setup(model="llama-tiny", optimizer="galore_adamw", optim=spec)
    model = meta_model(setup)
    matrices = _groups(model, replace(spec, rank=8, state_budget=None), summary=False, names=False)[0]
    at_8 = sum(state_bytes(p, {**gradproj.GaLoreAdamW.projection_defaults(), **matrices}) for p in matrices["params"])
    fixed = planned(model, setup, "galore_adamw+loop")  # a baseline: planned at the budget's rank, 8
    rest = fixed - at_8  # embeddings, norms and head: the same in both
    assert rest > 0
    assert planned(model, setup, "galore_adamw") == rest + at_8 // 2
