"""Adaptive refresh (``update_proj_gap="auto"``): the engine against the float64 twin on both engine
paths, the schedule's bounds, one read of the signal per check step, resume in lockstep mid-decision,
layer-wise stepping, and bad input."""

from __future__ import annotations

import io
import itertools
import math
import zlib
from typing import Any

import pytest
import torch

import gradproj
from conftest import PAIRS, PRESET_SPECS, build, exact_twin, make_params
from gradproj.optim import adaptive
from gradproj.optim.reference import ReferenceOptimizer
from gradproj.projection.bases import derive_seed

pytestmark = pytest.mark.usefixtures("engine_path")

SHAPES = [(48, 24), (24, 40)]
NAMES = ["layer0.weight", "layer1.weight"]
RANK, STEPS = 4, 40
AUTO = {"update_proj_gap": "auto", "min_gap": 3, "max_gap": 14, "check_every": 2, "energy_threshold": 0.9}
#: every preset x projector whose basis can go stale (the identity projector keeps all of G)
AUTO_PAIRS = [(preset, projector) for preset, projector in PAIRS if projector != "identity" and exact_twin(preset)]


def drifting_stream(
    shapes: list[tuple[int, int]], steps: int, seed: int = 3, dtype: torch.dtype = torch.float64
) -> list[list[torch.Tensor]]:
    """Rank-3 gradients whose subspaces turn a little every step (and jump at step 20), plus noise: the
    kept share decays between refreshes, at a pace the threshold is crossed at."""
    gen = torch.Generator().manual_seed(seed)
    frames = []
    for m, n in shapes:
        u, v = torch.randn(m, 3, generator=gen, dtype=dtype), torch.randn(n, 3, generator=gen, dtype=dtype)
        du, dv = torch.randn(m, 3, generator=gen, dtype=dtype), torch.randn(n, 3, generator=gen, dtype=dtype)
        frames.append((u, v, du, dv))
    out = []
    for t in range(steps):
        grads = []
        for (u, v, du, dv), (m, n) in zip(frames, shapes, strict=True):
            turn = 0.08 * t + (1.5 if t >= 20 else 0.0)
            left, right = u + turn * du, v + turn * dv  # (m, 3), (n, 3)
            noise = 0.05 * torch.randn(m, n, generator=gen, dtype=dtype)
            grads.append(left @ right.T + noise)
        out.append(grads)
    return out


def run_both(preset: str, projector: str, on_refresh: str = "keep") -> tuple[list[list[int]], list[list[int]]]:
    """Step the engine and its twin on the drifting stream; return each one's refresh steps per matrix
    (asserting the weights agree at every step). 8-bit states are float32 by construction: that twin runs
    in float32, on matrices big enough to quantize."""
    spec = PRESET_SPECS[preset]
    eight_bit = spec["rule"] == "adam8bit"
    dtype, tol = (torch.float32, 2e-5) if eight_bit else (torch.float64, 1e-9)
    shapes = [(80, 64), (64, 96)] if eight_bit else SHAPES
    params = make_params(shapes, dtype)
    twin_params = [p.detach().clone() for p in params]
    group = {"rank": RANK, "projector": projector, "on_refresh": on_refresh, **AUTO}
    opt = build(preset, params, NAMES, **group)
    seeds = [derive_seed(0, zlib.crc32(n.encode())) for n in NAMES]
    twin = ReferenceOptimizer(
        twin_params, rule=spec["rule"], residual=spec["residual"], lr=spec["kwargs"].get("lr"), seeds=seeds,
        **{**spec["twin"], **group},
    )  # fmt: skip
    ours: list[list[int]] = [[] for _ in params]
    theirs: list[list[int]] = [[] for _ in params]
    for t, grads in enumerate(drifting_stream(shapes, STEPS, dtype=dtype)):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        twin.step(grads)
        for i, p in enumerate(params):
            if opt.state[p]["last_refresh"] == t:
                ours[i].append(t)
            if twin.state[i]["last"] == t:
                theirs[i].append(t)
            torch.testing.assert_close(p.detach(), twin.params[i], rtol=tol, atol=tol, msg=f"step {t}: weight {i}")
    return ours, theirs


@pytest.mark.parametrize(("preset", "projector"), AUTO_PAIRS)
def test_adaptive_refresh_matches_the_twin(preset: str, projector: str) -> None:
    ours, theirs = run_both(preset, projector)
    assert ours == theirs
    if projector in ("svd", "rsvd", "eigh", "dct"):  # bases fitted to G: the signal, not max_gap, set the pace
        gaps = [b - a for steps in ours for a, b in itertools.pairwise(steps)]
        assert any(gap < AUTO["max_gap"] for gap in gaps), ours


@pytest.mark.parametrize("on_refresh", ["reset", "rotate"])
def test_adaptive_refresh_carries_the_moments_like_the_twin(on_refresh: str) -> None:
    ours, theirs = run_both("galore_adamw", "svd", on_refresh)
    assert ours == theirs


def test_refreshes_are_never_sooner_than_min_gap_nor_later_than_max_gap() -> None:
    params = make_params(SHAPES)
    opt = build("galore_adamw", params, NAMES, rank=RANK, **AUTO)
    stream = drifting_stream(SHAPES, STEPS)
    refreshes: list[list[int]] = [[] for _ in params]
    for t, grads in enumerate(stream):
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        for i, p in enumerate(params):
            if opt.state[p]["last_refresh"] == t:
                refreshes[i].append(t)
    for i, steps in enumerate(refreshes):
        gaps = [b - a for a, b in itertools.pairwise(steps)]
        assert all(AUTO["min_gap"] <= gap <= AUTO["max_gap"] for gap in gaps), (i, steps)
        assert STEPS - 1 - steps[-1] < AUTO["max_gap"]
        assert opt.state[params[i]]["refreshes"] == len(steps)
    # the jump at step 20 turns every basis away at once: each matrix refreshes within min_gap + check_every
    assert all(any(20 <= s <= 20 + AUTO["min_gap"] + AUTO["check_every"] for s in steps) for steps in refreshes)


def test_a_gradient_that_stays_in_the_basis_refreshes_at_max_gap_only() -> None:
    params = make_params([(24, 16)])
    opt = build("galore_adamw", params, ["w"], rank=RANK, **AUTO)
    fixed = torch.randn(24, 3, dtype=torch.float64) @ torch.randn(3, 16, dtype=torch.float64)  # rank 3 <= RANK
    steps = []
    for t in range(30):
        params[0].grad = fixed * (1 + 0.01 * t)
        opt.step()
        if opt.state[params[0]]["last_refresh"] == t:
            steps.append(t)
    assert steps == [0, 14, 28]


def test_one_read_of_the_signal_per_check_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine reads every matrix's check in one transfer at the next step; the step never reads one
    on its own (which would be a host sync per matrix)."""
    reads: list[int] = []
    lazy: list[int] = []
    batched = adaptive.read_checks

    def engine_read(pending: Any) -> None:
        pending = list(pending)
        reads.append(sum(1 for s, _ in pending if s.get("energy_unread")))
        batched(pending)

    monkeypatch.setattr(adaptive, "read_checks", engine_read)  # what the schedule's plan calls, once a step
    monkeypatch.setattr(adaptive, "read_one", lambda state, group: lazy.append(1) or batched([(state, group)]))
    params = make_params(SHAPES)
    opt = build("galore_adamw", params, NAMES, rank=RANK, **AUTO)
    for grads in drifting_stream(SHAPES, 12):
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
    assert not lazy
    # checks at steps t with (t + 1) % 2 == 0 once min_gap is near; read at t + 1, both matrices at once
    assert {count for count in reads} <= {0, len(params)}
    assert sum(1 for count in reads if count) >= 3


def test_resume_mid_decision_continues_in_lockstep() -> None:
    """A checkpoint taken right after a check step (its share not read yet) resumes to the same run."""
    stream = drifting_stream(SHAPES, STEPS)

    def run(params: list[torch.nn.Parameter], opt: Any, grads_list: list[list[torch.Tensor]]) -> None:
        for grads in grads_list:
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()

    params = make_params(SHAPES)
    opt = build("fira_adamw", params, NAMES, rank=RANK, **AUTO)
    run(params, opt, stream)
    resumed_params = make_params(SHAPES)
    first = build("fira_adamw", resumed_params, NAMES, rank=RANK, **AUTO)
    cut = 0
    while cut < 5 or not first.state[resumed_params[0]]["energy_unread"]:  # stop right after a check step
        run(resumed_params, first, stream[cut : cut + 1])
        cut += 1
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = build("fira_adamw", resumed_params, NAMES, rank=RANK, **AUTO)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    run(resumed_params, second, stream[cut:])
    for a, b in zip(params, resumed_params, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        assert opt.state[a]["refreshes"] == second.state[b]["refreshes"]


def test_layerwise_stepping_refreshes_on_the_same_steps() -> None:
    model_a, model_b = (torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 6)).double()
                        for _ in range(2))  # fmt: skip
    model_b.load_state_dict(model_a.state_dict())

    def optimizer(model: torch.nn.Module) -> gradproj.ProjectedOptimizer:
        groups = gradproj.param_groups(model, target_modules=["0", "2"], rank=3, **AUTO)
        return gradproj.GaLoreAdamW(groups, lr=1e-2)

    standard, stepper = optimizer(model_a), gradproj.attach_layerwise(optimizer(model_b), grad_accum=2)
    gen = torch.Generator().manual_seed(0)
    for t in range(30):
        x = torch.randn(16, 12, generator=gen, dtype=torch.float64) * (1 + math.sin(t / 3))
        y = torch.randn(16, 6, generator=gen, dtype=torch.float64)
        (model_a(x) - y).square().mean().backward()
        standard.step()
        standard.zero_grad()
        for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True):
            ((model_b(xs) - ys).square().mean() / 2).backward()
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
    weight_a, weight_b = model_a[0].weight, model_b[0].weight
    assert standard.state[weight_a]["refreshes"] == stepper.optimizer.state[weight_b]["refreshes"] > 30 // 14


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_gap": 50, "max_gap": 10}, "min_gap=50 > max_gap=10"),
        ({"energy_threshold": 1.0}, r"energy_threshold=1.0 is not valid; expected a number in \(0, 1\)"),
        ({"energy_threshold": 0}, r"energy_threshold=0 is not valid"),
        ({"check_every": 0}, "check_every=0 is not valid; expected an integer >= 1"),
        ({"min_gap": 0}, "min_gap=0 is not valid"),
        (
            {"update_proj_gap": "sometimes"},
            "update_proj_gap='sometimes' is not valid; expected an integer >= 1 or 'auto'",
        ),
        ({"refresh_offset": "staggered"}, "refresh_offset='staggered' applies to a fixed update_proj_gap"),
        ({"projector": "identity"}, "projector='identity' keeps all of G"),
    ],
)
def test_bad_adaptive_options_name_the_value(options: dict[str, Any], message: str) -> None:
    params = make_params(SHAPES)
    with pytest.raises(ValueError, match=message):
        gradproj.GaLoreAdamW([{"params": params, "rank": RANK, **{**AUTO, **options}}], lr=1e-2)


def test_the_trainer_spec_builds_auto_for_ours_and_refuses_peers() -> None:
    from gradproj.optim.build import OptimizerSpec, build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 16))
    spec = OptimizerSpec(rank=4, update_proj_gap="auto", min_gap=5, energy_threshold=0.5, target_modules="all-linear")
    group = build_optimizer(model, spec).param_groups[0]
    assert (group["update_proj_gap"], group["min_gap"], group["energy_threshold"]) == ("auto", 5, 0.5)
    assert group["max_gap"] == adaptive.ADAPTIVE_DEFAULTS["max_gap"]  # not given: the engine's default
    variant = build_optimizer(model, OptimizerSpec(name="galore_adamw+auto", rank=4, target_modules="all-linear"))
    assert variant.param_groups[0]["update_proj_gap"] == "auto"
    with pytest.raises(ValueError, match=r"--update-proj-gap auto needs one of gradproj's optimizers"):
        build_optimizer(model, OptimizerSpec(name="galore-torch", update_proj_gap="auto"))
    with pytest.raises(ValueError, match=r"min_gap=900 > max_gap=200"):
        OptimizerSpec(update_proj_gap="auto", min_gap=900)


def test_the_command_line_takes_auto_and_names_a_bad_gap(capsys: pytest.CaptureFixture[str]) -> None:
    from gradproj.cli import build_parser

    args = build_parser().parse_args(["pretrain", "--update-proj-gap", "auto", "--max-gap", "300"])
    assert (args.__dict__["optim.update_proj_gap"], args.__dict__["optim.max_gap"]) == ("auto", 300)
    assert build_parser().parse_args(["pretrain", "--update-proj-gap", "50"]).__dict__["optim.update_proj_gap"] == 50
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", "--update-proj-gap", "often"])
    assert (
        "argument --update-proj-gap: 'often' is not valid; expected an integer >= 1 or 'auto'"
        in capsys.readouterr().err
    )


def test_hugging_face_optim_args_take_auto_and_name_a_bad_gap() -> None:
    from gradproj.integrations.hf import parse_optim_args

    assert parse_optim_args("update_proj_gap=auto, max_gap=400") == {"update_proj_gap": "auto", "max_gap": 400}
    assert parse_optim_args("update_proj_gap=100") == {"update_proj_gap": 100}
    with pytest.raises(ValueError, match=r"optim_args update_proj_gap: 'often' is not valid; expected an integer >= 1"):
        parse_optim_args("update_proj_gap=often")
