"""Identities of the bases and projectors."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import build, grad_stream, make_params
from gradproj.projection import bases as B
from gradproj.projection.rotate import change_of_basis, rotate_first, rotate_second
from gradproj.projection.sides import project_down, project_up


def low_rank_plus_noise(m: int, n: int, rank: int, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, -1.5, rank)
    u = torch.linalg.qr(torch.randn(m, rank, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, rank, generator=gen)).Q
    return (u * spectrum) @ v.T + noise * torch.randn(m, n, generator=gen) / (m * n) ** 0.25


def captured_energy(g: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> float:
    return float(project_down(g, left, right).norm() ** 2 / g.norm() ** 2)


@pytest.mark.parametrize("projector", ["svd", "rsvd", "eigh", "dct", "random"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
@pytest.mark.parametrize("switching", [False, True])
def test_bases_are_orthonormal_and_fixed_within_the_gap(projector: str, proj_type: str, switching: bool) -> None:
    if (projector == "eigh" and proj_type == "full") or (switching and projector == "random"):
        pytest.skip("not a valid combination (test_errors checks that it raises)")
    params = make_params([(40, 24), (24, 40)])
    opt = build(
        "galore_adamw", params, rank=5, update_proj_gap=3, projector=projector, proj_type=proj_type, switching=switching
    )
    seen = []
    for grads in grad_stream(params, 5):
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        left, right = opt.bases(params[0])
        for basis, gram in ((left, lambda b: b.T @ b), (right, lambda b: b @ b.T)):
            if basis is not None:
                torch.testing.assert_close(gram(basis), torch.eye(5, dtype=basis.dtype), atol=1e-10, rtol=0)
        seen.append(torch.cat([b.flatten() for b in (left, right) if b is not None]))
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])  # steps 0-2 share a basis
    assert not torch.equal(seen[2], seen[3])  # refreshed at step 3


def test_svd_basis_captures_the_optimal_energy() -> None:
    g = low_rank_plus_noise(60, 40, 6).double()
    left, _ = B.svd_basis(g, 6, "left")
    s = torch.linalg.svdvals(g)
    assert captured_energy(g, left, None) == pytest.approx(float((s[:6] ** 2).sum() / (s**2).sum()), rel=1e-12)


def test_svd_runs_in_float32_for_bf16_and_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    g = low_rank_plus_noise(30, 20, 4).bfloat16()
    left, _ = B.svd_basis(g, 4, "left")
    assert left is not None and left.dtype == torch.float32

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise torch.linalg.LinAlgError("did not converge")

    exact, _ = B.svd_basis(g.float(), 4, "left")
    monkeypatch.setattr(torch.linalg, "svd", broken)
    with pytest.warns(RuntimeWarning, match="Gram-matrix"):
        fallback, _ = B.svd_basis(g.float(), 4, "left")
    assert fallback is not None and exact is not None and torch.isfinite(fallback).all()
    # same subspace: the projectors agree
    torch.testing.assert_close(fallback @ fallback.T, exact @ exact.T, atol=1e-4, rtol=0)


def test_rsvd_is_seeded_and_captures_99_percent_of_svd_energy() -> None:
    g = low_rank_plus_noise(512, 1376, 64)
    left_svd, _ = B.svd_basis(g, 128, "left")
    a, _ = B.rsvd_basis(g, 128, "left", seed=7)
    b, _ = B.rsvd_basis(g, 128, "left", seed=7)
    c, _ = B.rsvd_basis(g, 128, "left", seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert captured_energy(g, a, None) >= 0.99 * captured_energy(g, left_svd, None)


def test_dct_state_is_indices_only_and_the_matrix_is_shared() -> None:
    params = make_params([(64, 32), (64, 32)])
    opt = build("galore_adamw", params, rank=6, projector="dct", proj_type="left")
    for p, g in zip(params, grad_stream(params, 1)[0], strict=True):
        p.grad = g
    opt.step()
    state = opt.state[params[0]]
    assert state["index_left"].dtype == torch.int64 and state["index_left"].shape == (6,)
    tensors = {k for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert tensors == {"exp_avg", "exp_avg_sq", "index_left"}
    assert B.dct_matrix(64, torch.float64) is B.dct_matrix(64, torch.float64)
    d = B.dct_matrix(64, torch.float64)
    torch.testing.assert_close(d.T @ d, torch.eye(64, dtype=torch.float64))
    # the chosen columns are the best aligned ones
    scores = (d.T @ params[0].grad).norm(dim=1)
    assert set(state["index_left"].tolist()) == set(torch.topk(scores, 6).indices.tolist())


def test_random_state_is_a_seed_and_seeds_follow_names_or_places() -> None:
    """Seeds differ across the parameters of one optimizer; an unnamed parameter's seed depends only on
    its place, so separate optimizers that need distinct bases name their parameters."""
    params = make_params([(48, 32), (48, 32)])
    shared = build("apollo_adamw", params, rank=4)
    unnamed = [build("apollo_adamw", [p], rank=4) for p in make_params([(48, 32), (48, 32)])]
    named = [build("apollo_adamw", [p], [f"layer{i}"], rank=4) for i, p in enumerate(make_params([(48, 32)] * 2))]
    for opt in (shared, *unnamed, *named):
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in params:
        state = shared.state[p]
        tensors = {k for k, v in state.items() if isinstance(v, torch.Tensor)}
        assert tensors == {"exp_avg", "exp_avg_sq", "residual_norm"}  # moments and limiter: no basis
        assert isinstance(state["proj_seed"], int)

    def seeds(opts: list[torch.optim.Optimizer]) -> list[int]:
        return [o.state[p]["proj_seed"] for o in opts for p in o.param_groups[0]["params"]]  # type: ignore[index]

    assert len(set(seeds([shared]))) == 2
    assert seeds(unnamed) == [seeds([shared])[0]] * 2  # the same place, param_groups[0].params[0]
    assert len(set(seeds(named))) == 2


def test_rotate_maps_the_first_moment_exactly_inside_the_old_subspace() -> None:
    gen = torch.Generator().manual_seed(0)
    old = torch.linalg.qr(torch.randn(30, 5, generator=gen, dtype=torch.float64)).Q
    mix = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64)).Q
    new = old @ mix  # same subspace, another basis
    g = old @ torch.randn(5, 12, generator=gen, dtype=torch.float64)
    c_left, c_right = change_of_basis((old, None), (new, None))
    torch.testing.assert_close(rotate_first(old.T @ g, c_left, c_right), new.T @ g)
    v = torch.rand(5, 12, dtype=torch.float64)
    rotated = rotate_second(v, c_left, c_right)
    assert (rotated >= 0).all()
    torch.testing.assert_close(rotated.sum(), v.sum())  # (C o C) has unit column sums for orthogonal C


def test_up_is_the_adjoint_of_down() -> None:
    g = torch.randn(20, 12, dtype=torch.float64)
    left, right = B.svd_basis(g, 4, "full")
    low = torch.randn(4, 4, dtype=torch.float64)
    assert torch.dot(project_down(g, left, right).flatten(), low.flatten()).item() == pytest.approx(
        torch.dot(g.flatten(), project_up(low, left, right).flatten()).item()
    )


def test_warnings_are_not_emitted_in_normal_use() -> None:
    params = make_params([(32, 16)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = build("galore_adamw", params, rank=4)
        params[0].grad = torch.randn_like(params[0])
        opt.step()


def test_switching_keeps_the_leading_directions_and_draws_the_rest_from_the_complement() -> None:
    top = torch.linalg.qr(torch.randn(30, 8, dtype=torch.float64)).Q
    switched = B.switch_basis(top, 3, seed=7)
    torch.testing.assert_close(switched.T @ switched, torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(switched[:, :3], top[:, :3])  # the leading directions stay, in order
    torch.testing.assert_close(top.T @ switched[:, 3:], torch.zeros(8, 5, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(B.switch_basis(top, 3, seed=7), switched)  # seeded: a resumed run draws the same
    assert not torch.equal(B.switch_basis(top, 3, seed=8), switched)
    assert torch.equal(B.switch_basis(top, 8, seed=7), top)  # leading == rank: no switching


def test_switching_a_nearly_full_basis_draws_from_the_discarded_directions_too() -> None:
    top = torch.linalg.qr(torch.randn(10, 8, dtype=torch.float64)).Q  # complement: 2 columns, 6 needed
    switched = B.switch_basis(top, 2, seed=0)
    torch.testing.assert_close(switched.T @ switched, torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)


def test_switching_dct_indices_keeps_the_best_aligned_and_draws_unselected_ones() -> None:
    indices = torch.tensor([5, 2, 9, 0])
    switched = B.switch_indices(indices, 16, 2, seed=3)
    assert switched[:2].tolist() == [5, 2] and len(set(switched.tolist())) == 4
    assert not set(switched[2:].tolist()) & {5, 2, 9, 0}


def test_warm_started_eigenvectors_converge_to_the_exact_ones() -> None:
    g = low_rank_plus_noise(40, 60, 6).double()
    cov = B.covariance(g, "left")
    exact = B.top_eigenvectors(cov, 4)
    start = torch.linalg.qr(torch.randn(40, 4, dtype=torch.float64)).Q
    basis = start
    for _ in range(30):
        basis = B.top_eigenvectors(cov, 4, basis)
    torch.testing.assert_close(basis @ basis.T, exact @ exact.T, atol=1e-8, rtol=0)  # the same subspace
    assert captured_energy(g, B.top_eigenvectors(cov, 4, start), None) < captured_energy(g, exact, None)


def test_tracking_keeps_an_average_of_the_projected_covariance() -> None:
    params = make_params([(12, 30)])
    opt = build("alice", params, rank=4, update_proj_gap=100, leading_basis=4)
    grads = grad_stream(params, 3)
    expected = torch.zeros(4, 4, dtype=torch.float64)
    for (g,) in grads:
        params[0].grad = g
        opt.step()
        r = opt.bases(params[0])[0].T @ g  # 4 x 30
        expected = 0.999 * expected + 0.001 * r @ r.T
    torch.testing.assert_close(opt.state[params[0]]["tracked_cov"], expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("projector", ["svd", "rsvd", "eigh", "dct"])
@pytest.mark.parametrize("side", ["left", "right", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_entries_are_what_a_refresh_writes(projector: str, side: str, dtype: torch.dtype) -> None:
    # what other ranks allocate to receive a refresh computed on one rank (gradproj.optim.spread)
    from gradproj.projection.projectors import Layout, get_projector

    if projector == "eigh" and side == "full":
        pytest.skip("eigh bases are one-sided")
    proj = get_projector(projector)
    layout = Layout((24, 40), 5, side, dtype, torch.device("cpu"))
    group = {"oversample": 4, "power_iters": 1, "track_beta": 0.0, "switching": False}
    state: dict[str, object] = {"step": 0, "last_refresh": 0, "proj_seed": 1}
    proj.refresh(low_rank_plus_noise(24, 40, 8), state, layout, group)
    written = {k: (tuple(v.shape), v.dtype) for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert written == proj.fresh_entries(layout)
    assert get_projector("random").fresh_entries(layout) == {} and not get_projector("random").reads_gradient
