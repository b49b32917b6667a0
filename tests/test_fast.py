"""The batched fast path (``foreach``) against the per-parameter step, and staggered refreshes."""

from __future__ import annotations

import io
import shutil
import zlib

import pytest
import torch

import gradproj
from conftest import grad_stream, make_params
from gradproj.optim import step as step_module
from gradproj.optim.component import refresh_phases
from gradproj.optim.reference import ReferenceOptimizer
from gradproj.projection.bases import derive_seed

# tall (right side), wide (left side), square, and a vector for the full-rank group
SHAPES = [(48, 24), (24, 40), (24, 24), (24,)]


def _groups(params: list[torch.Tensor], **options: object) -> list[dict[str, object]]:
    return [{"params": params[:3], "rank": 6, "update_proj_gap": 4, **options}, {"params": params[3:]}]


def _pair(dtype: torch.dtype, preset: str = "galore_adamw", **options: object):  # type: ignore[no-untyped-def]
    fast, loop = make_params(SHAPES, dtype), make_params(SHAPES, dtype)
    kwargs = {"lr": 1e-2, "weight_decay": 0.1}
    cls = gradproj.PRESETS[preset]
    return (
        (fast, cls(_groups(fast, **options), foreach=True, **kwargs)),
        (loop, cls(_groups(loop, **options), foreach=False, **kwargs)),
    )


def _step(params: list[torch.Tensor], opt: torch.optim.Optimizer, grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.step()


def _side_by_side(pair, steps: int, rtol: float, atol: float) -> None:  # type: ignore[no-untyped-def]
    """Step the fast and the for-loop optimizer of ``pair`` on the same gradients; the weights agree
    after every step, and the fast one trained."""
    (fast, a), (loop, b) = pair
    start = [p.detach().clone() for p in fast]
    for grads in grad_stream(fast, steps):
        _step(fast, a, grads)
        _step(loop, b, grads)
        for p, q in zip(fast, loop, strict=True):
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
    assert all((p - s).abs().max() > 1e-3 for p, s in zip(fast, start, strict=True))


def _same_moments(pair) -> None:  # type: ignore[no-untyped-def]
    (fast, a), (loop, b) = pair
    for p, q in zip(fast[:3], loop[:3], strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a.state[p][key], b.state[q][key]), key
        for key in ("residual_norm", "compensation_sq"):  # the limiter's and Alice's statistics
            if key in b.state[q]:
                torch.testing.assert_close(a.state[p][key], b.state[q][key], rtol=1e-12, atol=0)
        assert a.state[p]["step"] == b.state[q]["step"]


@pytest.mark.parametrize("projector", ["svd", "rsvd", "random", "dct", "identity"])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_fast_path_equals_the_loop_in_float64(projector: str, proj_type: str) -> None:
    """Across three refreshes: moments bit for bit, weights to float64 rounding (the fused addmm_)."""
    pair = _pair(torch.float64, projector=projector, proj_type=proj_type)
    _side_by_side(pair, 11, rtol=1e-12, atol=1e-14)
    _same_moments(pair)


#: every residual policy, on one-sided bases (the fused updates) and a two-sided one (the loop's combine)
POLICIES = [
    ("fira_adamw", {}),
    ("fira_adamw", {"scale_type": "tensor"}),
    ("fira_adamw", {"proj_type": "full"}),
    ("apollo_adamw", {}),
    ("apollo_adamw", {"rank": 1, "scale_type": "tensor"}),  # APOLLO-Mini
    ("alice0", {}),
]


@pytest.mark.parametrize("strategy", ["one by one", "listed"])
@pytest.mark.parametrize(("preset", "options"), [("galore_adamw", {}), *POLICIES])
def test_every_policy_on_either_strategy_equals_the_loop_in_float64(
    preset: str, options: dict[str, object], strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU's matrix-by-matrix order and the lists other devices take, across three refreshes."""
    if strategy == "listed":
        monkeypatch.setattr("gradproj.optim.fast.ONE_BY_ONE_DEVICES", ())
    pair = _pair(torch.float64, preset, **options)
    _side_by_side(pair, 11, rtol=1e-12, atol=1e-14)
    _same_moments(pair)
    (fast, a), _ = pair
    assert all(a._records[p].fast for p in fast)


@pytest.mark.parametrize(("preset", "options"), POLICIES[:4])
def test_fused_policies_equal_the_loop_in_float32(preset: str, options: dict[str, object]) -> None:
    _side_by_side(_pair(torch.float32, preset, **options), 9, rtol=1e-6, atol=1e-6)


def test_fast_path_equals_the_loop_in_float32_without_bias_correction() -> None:
    _side_by_side(_pair(torch.float32, bias_correction=False), 9, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("preset", ["galore_adamw", "fira_adamw", "apollo_adamw"])
def test_fast_path_takes_every_step_between_refreshes(preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With foreach=None the per-parameter projected step runs on refresh steps only."""
    calls: list[int] = []
    real = step_module.projected_step

    def counted(ctx, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(ctx.state.get("step", 0))
        return real(ctx, *args, **kwargs)

    monkeypatch.setattr("gradproj.optim.engine.projected_step", counted)
    params = make_params(SHAPES, torch.float32)
    opt = gradproj.PRESETS[preset](_groups(params), lr=1e-2)
    for grads in grad_stream(params, 9):
        _step(params, opt, grads)
    assert sorted(calls) == [0, 0, 0, 4, 4, 4, 8, 8, 8]  # 3 matrices refresh at steps 0, 4 and 8


@pytest.mark.parametrize(
    ("preset", "dtype", "reason"),
    [
        ("alice", torch.float32, "projector='eigh' with tracking observes every step's R"),
        ("galore_adamw8bit", torch.float32, "its rule 'adam8bit' has no batched step"),
        ("galore_adamw", torch.bfloat16, "it is torch.bfloat16"),
    ],
)
def test_foreach_true_names_the_parameter_and_why(preset: str, dtype: torch.dtype, reason: str) -> None:
    params = make_params(SHAPES, dtype)
    with pytest.raises(ValueError, match=rf"foreach=True cannot step param_groups\[0\]\.params\[0\]: {reason}"):
        gradproj.PRESETS[preset](_groups(params), foreach=True)
    opt = gradproj.PRESETS[preset](_groups(params), foreach=None)  # None falls back without a word
    assert not any(opt._records[p].fast for p in params[:3])


def test_a_group_refused_by_foreach_true_leaves_no_trace() -> None:
    """add_param_group on a live optimizer: the refused group's matrix is in none of the engine's tables
    (its record, refresh phase included, was made before the fast path refused it)."""
    kept, refused = make_params([(12, 8), (12, 8)], torch.float32)
    opt = gradproj.GaLoreAdamW([{"params": [kept], "rank": 2}], foreach=True)
    with pytest.raises(ValueError, match=r"foreach=True cannot step param_groups\[1\]\.params\[0\]"):
        opt.add_param_group({"params": [refused], "rank": 2, "projector": "eigh", "track_beta": 0.9})
    tables = [getattr(opt, name) for name in opt._DERIVED if isinstance(getattr(opt, name), dict)]
    assert len(opt.param_groups) == 1 and not opt.owns(refused)
    assert not any(refused in table for table in tables) and kept in opt._records


def test_foreach_must_be_none_true_or_false() -> None:
    with pytest.raises(ValueError, match=r"foreach='yes' is not valid"):
        gradproj.GaLoreAdamW(make_params(SHAPES), foreach="yes")  # type: ignore[arg-type]


# ------------------------------------------------------------------------- torch.compile
def test_compile_needs_the_fast_path() -> None:
    with pytest.raises(ValueError, match=r"compile=True compiles the fast path, which foreach=False never takes"):
        gradproj.GaLoreAdamW(_groups(make_params(SHAPES)), foreach=False, compile=True)
    with pytest.raises(ValueError, match=r"compile='yes' is not valid; expected one of \(False, True\)"):
        gradproj.GaLoreAdamW(_groups(make_params(SHAPES)), compile="yes")  # type: ignore[arg-type]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("preset", ["galore_adamw", "fira_adamw"])
def test_compiled_fast_path_equals_the_eager_one(preset: str) -> None:
    """One compile for the whole test (the same function, shape and dtype): a few float32 ulps apart."""
    shapes = [(24, 40)] * 3 + [(24,)]
    eager, compiled = make_params(shapes, torch.float32), make_params(shapes, torch.float32)
    cls, kwargs = gradproj.PRESETS[preset], {"lr": 1e-2, "weight_decay": 0.1}
    a = cls(_groups(eager), **kwargs)
    b = cls(_groups(compiled), compile=True, **kwargs)
    for grads in grad_stream(eager, 9):
        _step(eager, a, grads)
        _step(compiled, b, grads)
    for p, q, start in zip(eager, compiled, make_params(shapes, torch.float32), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        assert (p - start).abs().max() > 1e-3  # it trained
    for p, q in zip(eager[:3], compiled[:3], strict=True):
        torch.testing.assert_close(a.state[p]["exp_avg_sq"], b.state[q]["exp_avg_sq"], rtol=1e-6, atol=0)


# ------------------------------------------------------------------------- staggered refreshes
def test_staggered_phases_spread_the_refreshes_over_the_gap() -> None:
    assert refresh_phases("staggered", 3, 4) == [0, 1, 2]
    assert refresh_phases("staggered", 6, 4) == [0, 0, 1, 2, 2, 3]  # at most ceil(6/4) on one step
    assert refresh_phases(2, 3, 4) == [2, 2, 2]
    params = make_params(SHAPES)
    opt = gradproj.GaLoreAdamW(_groups(params, refresh_offset="staggered"), lr=1e-2)
    refreshed: list[list[int]] = []
    for grads in grad_stream(params, 10):
        before = [opt.state[p].get("last_refresh") for p in params[:3]]
        _step(params, opt, grads)
        refreshed.append([i for i, p in enumerate(params[:3]) if opt.state[p]["last_refresh"] != before[i]])
    # step 0: every matrix needs a first basis; then matrix j refreshes at j, j + 4, ...
    assert refreshed == [[0, 1, 2], [1], [2], [], [0], [1], [2], [], [0], [1]]


@pytest.mark.parametrize("offset", ["staggered", 3])
def test_staggered_engine_matches_the_twin(offset: object) -> None:
    params = make_params(SHAPES[:3])
    twin_params = [p.detach().clone() for p in params]
    names = [f"w{i}" for i in range(3)]
    group = {"rank": 6, "update_proj_gap": 4, "refresh_offset": offset, "on_refresh": "rotate"}
    opt = gradproj.GaLoreAdamW([{"params": list(zip(names, params, strict=True)), **group}], lr=1e-2)
    seeds = [derive_seed(0, zlib.crc32(n.encode())) for n in names]
    phases = refresh_phases(offset, 3, 4)  # type: ignore[arg-type]
    twin = ReferenceOptimizer(
        twin_params, rule="adam", residual="none", lr=1e-2, seeds=seeds, refresh_phases=phases, **group
    )
    for t, grads in enumerate(grad_stream(params, 10)):
        _step(params, opt, grads)
        twin.step(grads)
        for p, q in zip(params, twin.params, strict=True):
            torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-12, msg=f"step {t}")


def test_staggered_refreshes_resume_in_lockstep() -> None:
    params = make_params(SHAPES, torch.float32)
    opt = gradproj.GaLoreAdamW(_groups(params, refresh_offset="staggered"), lr=1e-2)
    stream = grad_stream(params, 9)
    for grads in stream[:2]:  # stop mid-gap: one matrix refreshed at step 1, the next due at step 2
        _step(params, opt, grads)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = gradproj.GaLoreAdamW(_groups(resumed_params, refresh_offset="staggered"), lr=1e-2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for grads in stream[2:]:
        _step(params, opt, grads)
        _step(resumed_params, resumed, grads)
        for a, b in zip(params, resumed_params, strict=True):
            assert torch.equal(a, b)
    assert [opt.state[p]["refresh_phase"] for p in params[:3]] == [0, 1, 2]


@pytest.mark.parametrize("offset", [4, -1, "later", True])
def test_refresh_offset_out_of_range_is_refused(offset: object) -> None:
    with pytest.raises(ValueError, match=r"refresh_offset=.* is not valid; expected 'staggered' or an int in \[0, "):
        gradproj.GaLoreAdamW(_groups(make_params(SHAPES), refresh_offset=offset))


def test_the_trainer_spec_staggers_ours_and_refuses_peers() -> None:
    from gradproj.optim.build import OptimizerSpec, build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 16))
    spec = OptimizerSpec(rank=4, update_proj_gap=10, refresh_offset="staggered", target_modules="all-linear")
    opt = build_optimizer(model, spec)
    assert opt.param_groups[0]["refresh_offset"] == "staggered"
    assert [opt._records[p].phase for p in opt.param_groups[0]["params"]] == [0, 5]
    aligned = build_optimizer(model, OptimizerSpec(rank=4, target_modules="all-linear"))
    assert aligned.param_groups[0]["refresh_offset"] == 0
    with pytest.raises(ValueError, match=r"--refresh-offset staggered needs one of gradproj's optimizers"):
        build_optimizer(model, OptimizerSpec(name="galore-torch", refresh_offset="staggered"))
    with pytest.raises(ValueError, match=r"refresh_offset='sometimes' is not valid; expected one of"):
        OptimizerSpec(refresh_offset="sometimes")


def test_the_for_loop_adamw_variant_refuses_bf16_weights() -> None:
    from gradproj.optim.build import OptimizerSpec, build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(16, 32)).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"--optimizer adamw\+loop is torch's AdamW with fixed kernel options"):
        build_optimizer(model, OptimizerSpec(name="adamw+loop", target_modules="all-linear"))
    fallback = build_optimizer(model, OptimizerSpec(name="adamw", target_modules="all-linear"))
    assert isinstance(fallback, gradproj.ProjectedOptimizer)
