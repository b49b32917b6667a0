"""COSMOS beyond the generic contract: Nesterov's momentum and every basis side against the float64 twin,
the tracked basis finding the gradient's leading subspace, the options it refuses, and FSDP2's refusal."""

from __future__ import annotations

import pytest
import torch

import gradproj
from conftest import build, grad_stream, make_params
from gradproj.optim.reference import ReferenceOptimizer
from gradproj.optim.registry import METHODS
from gradproj.optim.validate import sharding_blocker
from gradproj.rules import make_rule
from gradproj.rules.cosmos import newton_schulz
from test_reference_twins import step_beside

# no engine_path: COSMOS's matrices never take the fast path (its rule has no batched kernel), so every run is the loop

SHAPES = [(48, 24), (24, 40)]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_every_side_and_momentum_match_the_twin(proj_type: str, nesterov: bool) -> None:
    group = {
        "rank": 6,
        "update_proj_gap": 4,
        "proj_type": proj_type,
        "nesterov": nesterov,
        "muon_scale": 0.3,
        "weight_decay": 0.01,
    }
    params = make_params(SHAPES)
    twin_params = [p.detach().clone() for p in params]
    opt = build("cosmos", params, [f"w{i}" for i in range(len(params))], **group)
    twin = ReferenceOptimizer(
        twin_params, rule="cosmos", residual="none", lr=1e-2, projector="identity", scale=1.0, betas=(0.9, 0.95),
        track_beta=0.95, eps=1e-8, **group,
    )  # fmt: skip
    step_beside(opt, twin, params, grad_stream(params, 10), 1e-10)


def test_nesterov_changes_the_step() -> None:
    """The option is read: after the first step (where both momenta equal G) the trajectories part."""
    runs = []
    for nesterov in (False, True):
        params = make_params(SHAPES)
        opt = build("cosmos", params, rank=6, nesterov=nesterov)
        for grads in grad_stream(params, 3):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
        runs.append(params[0].detach().clone())
    assert not torch.allclose(runs[0], runs[1], rtol=0, atol=1e-6)


def test_the_tracked_basis_finds_the_leading_subspace() -> None:
    """Gradients whose columns share a rank-3 covariance plus noise: after some steps the basis spans it."""
    gen = torch.Generator().manual_seed(0)
    truth = torch.linalg.qr(torch.randn(40, 3, generator=gen, dtype=torch.float64)).Q  # 40 x 3
    weight = torch.nn.Parameter(torch.zeros(40, 64, dtype=torch.float64))
    opt = gradproj.COSMOS([{"params": [weight], "rank": 3, "proj_type": "left"}], lr=1e-3)
    for _ in range(30):
        signal = truth @ (torch.randn(3, 64, generator=gen, dtype=torch.float64) * 5)  # 40 x 64
        weight.grad = signal + 0.3 * torch.randn(40, 64, generator=gen, dtype=torch.float64)
        opt.step()
    basis = opt.state[weight]["cosmos_basis"]  # 40 x 3
    cosines = torch.linalg.svdvals(truth.T @ basis)  # of the principal angles
    assert basis.shape == (40, 3) and float(cosines.min()) > 0.99


def test_newton_schulz_orthogonalizes_both_orientations() -> None:
    for shape in ((30, 8), (8, 30)):
        x = torch.randn(shape, dtype=torch.float64)
        s = torch.linalg.svdvals(newton_schulz(x))
        assert s.shape == (8,) and float(s.min()) > 0.6 and float(s.max()) < 1.25  # Muon's band around 1
        u, _, vh = torch.linalg.svd(x, full_matrices=False)
        assert float(torch.nn.functional.cosine_similarity((u @ vh).flatten(), newton_schulz(x).flatten(), 0)) > 0.95


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"projector": "rsvd"}, "projector='rsvd' would project G first"),
        ({"rank": "auto", "state_budget": 10**6}, "rank='auto' is not supported"),
        ({"proj_type": "full"}, "proj_type='full' projects both sides"),
        ({"residual": "fira"}, "residual='fira' would add a second one"),
        ({"muon_scale": -0.1}, "muon_scale=-0.1"),
        ({"nesterov": "yes"}, "nesterov='yes' is not valid; expected True or False"),
        ({"track_beta": 1.0}, "track_beta=1.0"),
        ({"update_proj_gap": "auto"}, "update_proj_gap='auto' does not apply"),
        ({"switching": True}, "switching=True does not apply"),
    ],
)
def test_bad_options_name_the_value(options: dict, message: str) -> None:  # type: ignore[type-arg]
    params = make_params(SHAPES)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        gradproj.COSMOS([{"params": params, "rank": 6, **options}])


def test_fsdp2_refusal_says_what_the_rule_reads() -> None:
    group = {**gradproj.COSMOS.projection_defaults(), "rank": 6}
    reason = sharding_blocker(group, make_rule("cosmos"))
    assert reason is not None and "Newton-Schulz" in reason
    assert not METHODS["cosmos"].supports_fsdp


def test_state_is_the_moment_basis_covariance_and_projected_second_moment() -> None:
    weight = torch.nn.Parameter(torch.randn(48, 24, dtype=torch.float32))
    opt = gradproj.COSMOS([{"params": [weight], "rank": 6}])
    weight.grad = torch.randn_like(weight)
    opt.step()
    state = opt.state[weight]
    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    assert shapes == {"exp_avg": (48, 24), "cosmos_basis": (24, 6), "tracked_cov": (6, 6), "exp_avg_sq": (48, 6)}
    group = opt.param_groups[0]
    nbytes = sum(4 * torch.Size(s).numel() for s in shapes.values())
    assert make_rule("cosmos").state_bytes((48, 24), torch.float32, group) == nbytes
