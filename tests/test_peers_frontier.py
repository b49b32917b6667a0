"""Alice and RACS match pytorch_optimizer 4.1.0 where the algorithms coincide.

Where they differ on purpose (docs/ALGORITHMS.md): RACS's column scaling is the coupled fixed point
(scale-invariant) rather than the column mean of G^2; Alice's first basis is the exact eigenbasis (the
community code starts its subspace iteration from zeros), its refresh schedule is galore-torch's
(steps 0, K, 2K, ...), switching draws are seeded, and tall matrices are projected on their smaller side.
"""

from __future__ import annotations

import pytest
import torch

import gradproj

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")


def _unit_rows(g: torch.Tensor) -> torch.Tensor:
    """``g`` with every row's mean square 1: where RACS's two column scalings coincide."""
    return g / g.square().mean(dim=1, keepdim=True).sqrt()


def _gradients(shape: tuple[int, int], steps: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    return [
        torch.randn(m, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, n, generator=gen, dtype=torch.float64)
        + 0.1 * torch.randn(m, n, generator=gen, dtype=torch.float64)
        for _ in range(steps)
    ]


def _racs_pair(shape: tuple[int, int]):  # type: ignore[no-untyped-def]
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours, theirs = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt = gradproj.RACS([{"params": [ours], "rank": 1}], lr=0.1, weight_decay=0.01)
    peer = pytorch_optimizer.RACS([theirs], lr=0.1, beta=0.9, alpha=0.05, gamma=1.01, eps=1e-8, weight_decay=0.01)
    return ours, opt, theirs, peer


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_racs_matches_pytorch_optimizer_on_unit_row_gradients(shape: tuple[int, int]) -> None:
    ours, opt, theirs, peer = _racs_pair(shape)
    for g in _gradients(shape, 12):
        ours.grad, theirs.grad = _unit_rows(g), _unit_rows(g)
        opt.step()
        peer.step()
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(opt.state[ours]["row_sq"], peer.state[theirs]["s"], rtol=1e-10, atol=1e-12)


def test_racs_is_scale_invariant_where_pytorch_optimizer_is_not() -> None:
    """The coupled fixed point makes RACS's step independent of the gradient's scale, as Adam's is."""
    moved = {}
    for factor in (1.0, 0.05):
        ours, opt, theirs, peer = _racs_pair((12, 20))
        start = ours.detach().clone()
        for g in _gradients((12, 20), 5):
            ours.grad, theirs.grad = factor * g, factor * g
            opt.step()
            peer.step()
        moved[factor] = ((ours - start).norm().item(), (theirs - start).norm().item())
    assert moved[0.05][0] == pytest.approx(moved[1.0][0], rel=1e-4)  # ours: the same step (up to eps)
    assert moved[0.05][1] > 1.2 * moved[1.0][1]  # theirs: a 20x smaller gradient moves the weight further


def _inject(opt: gradproj.Alice, ours: torch.Tensor, peer, theirs: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    """Give the peer our state after our first step (its own first basis starts from zeros)."""
    s = opt.state[ours]
    peer.state[theirs].update(
        U=s["basis_left"].clone(),
        Q=s["tracked_cov"].clone(),
        m=s["exp_avg"].clone(),
        v=s["exp_avg_sq"].clone(),
        p=s["compensation_sq"].clone(),
        phi=s["residual_norm"].reshape(1).clone(),
    )
    peer.param_groups[0]["step"] = 0  # its counter then refreshes on our steps K, 2K, ...
    with torch.no_grad():
        theirs.copy_(ours)


@pytest.mark.parametrize("track_beta", [0.999, 0.0])
def test_alice_matches_pytorch_optimizer_after_the_first_basis(track_beta: float) -> None:
    shape, rank, gap = (10, 16), 4, 3  # wide: both project the rows; leading == rank: no random draw
    w = torch.randn(shape, dtype=torch.float64)
    ours, theirs = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    group = {"params": [ours], "rank": rank, "update_proj_gap": gap, "leading_basis": rank}
    preset = gradproj.Alice if track_beta > 0 else gradproj.Alice0
    opt = preset([group], lr=0.02, weight_decay=0.01)
    peer = pytorch_optimizer.Alice(
        [theirs], lr=0.02, betas=(0.9, 0.9, track_beta), alpha=0.3, alpha_c=0.4, update_interval=gap,
        rank=rank, leading_basis=rank, gamma=1.01, eps=1e-8, weight_decay=0.01,
    )  # fmt: skip
    grads = _gradients(shape, 3 * gap + 2)
    ours.grad = grads[0].clone()
    opt.step()
    if track_beta == 0:  # Alice-0 keeps no covariance; theirs still allocates one (all zeros)
        opt.state[ours]["tracked_cov"] = torch.zeros(rank, rank, dtype=torch.float64)
    _inject(opt, ours, peer, theirs)
    for g in grads[1:]:  # crosses refreshes at steps 3, 6 and 9
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        peer.step()
        # the peer's refresh runs its subspace iteration in float32
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
    basis, theirs_basis = opt.state[ours]["basis_left"], peer.state[theirs]["U"]
    # float32 subspace iteration, three refreshes deep: its least separated direction is about 5e-5 off
    # on some hosts' BLAS (a wrong basis would be off by O(1))
    torch.testing.assert_close(basis.abs(), theirs_basis.abs(), rtol=1e-4, atol=1e-4)


def test_a_peer_on_the_matrices_and_adamw_on_the_rest_report_all_their_state() -> None:
    from gradproj.optim.build import OptimizerSpec, build_optimizer
    from gradproj.train.logs import optimizer_state_bytes
    from gradproj.train.models import build_causal_lm

    model = build_causal_lm("llama-tiny", vocab_size=128, seq_len=16)
    opt = build_optimizer(model, OptimizerSpec(name="racs-pytorch-optimizer", rank=8))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    parts = [optimizer_state_bytes(o) for o in opt.optimizers]  # type: ignore[attr-defined]
    assert all(parts) and optimizer_state_bytes(opt) == sum(parts)
    assert isinstance(opt.optimizers[1], torch.optim.AdamW)  # type: ignore[attr-defined]
