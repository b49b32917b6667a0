"""The fast path's fused pieces on their own, against their formulas: ``lift_into`` is ``keep * W + alpha * up(u)``
for every kind of basis, ``limited`` is ``phi`` over the growth limiter's divisor of ``x * phi`` (and records the
limited norm as the limiter does), ``decay_only`` decays and nothing else."""

from __future__ import annotations

import pytest
import torch

from gradproj.optim.fused_update import decay_only, lift_into, limited
from gradproj.rules.limiter import limit_growth

M, N, R = 10, 7, 3


def _orthonormal(rows: int, cols: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64)).Q


@pytest.mark.parametrize("side", ["left", "right", "full", "none"])
def test_lift_into_is_decay_plus_the_lifted_direction(side: str) -> None:
    torch.manual_seed(0)
    left = _orthonormal(M, R) if side in ("left", "full") else None
    right = _orthonormal(N, R).T if side in ("right", "full") else None
    shape = {"left": (R, N), "right": (M, R), "full": (R, R), "none": (M, N)}[side]
    u, weight = torch.randn(shape, dtype=torch.float64), torch.randn(M, N, dtype=torch.float64)
    lifted = u if left is None else left @ u
    lifted = lifted if right is None else lifted @ right
    expected = 0.9 * weight - 0.5 * lifted
    lift_into(weight, u, (left, right), keep=0.9, alpha=-0.5)
    assert torch.allclose(weight, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("side", ["left", "right"])
def test_limited_is_phi_over_the_limiters_divisor(side: str) -> None:
    torch.manual_seed(1)
    phi = torch.rand(N, dtype=torch.float64) if side == "left" else torch.rand(M, 1, dtype=torch.float64)
    fused, formula = {}, {}
    for scale in (1.0, 3.0):  # the second call grows the norm past the limit: the divisor is not 1
        x = scale * torch.randn(M, N, dtype=torch.float64)
        w = limited(x, phi, side, fused, {"growth_limit": 1.01})
        reference = limit_growth(x * phi, formula, 1.01)  # the for-loop's limiter on the product itself
        assert torch.allclose(x * w, reference, rtol=1e-12, atol=0)
        assert torch.allclose(fused["residual_norm"], formula["residual_norm"], rtol=1e-12, atol=0)


def test_decay_only_decays_and_leaves_a_weight_without_decay_untouched() -> None:
    weight = torch.randn(M, N, dtype=torch.float64)
    kept = weight.clone()
    decay_only(weight, 1.0)
    assert torch.equal(weight, kept)
    decay_only(weight, 0.5)
    assert torch.equal(weight, kept * 0.5)
