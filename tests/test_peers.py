"""We match the public implementations where the algorithms coincide.

Differences we keep on purpose (docs/ALGORITHMS.md): eps placement in full-rank groups (torch's),
weight decay before the update (torch's), Fira's residual without the (1 - scale) leak.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import gradproj
from conftest import grad_stream, make_params

galore_torch = pytest.importorskip("galore_torch")
fira = pytest.importorskip("fira")

SHAPES = [(40, 24), (24, 56)]  # tall and wide


def _run(optimizer, params, grads_seq):  # type: ignore[no-untyped-def]
    for grads in grads_seq:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_galore_adamw_matches_galore_torch(proj_type: str) -> None:
    ours = make_params(SHAPES, torch.float32)
    theirs = make_params(SHAPES, torch.float32)
    group = {"rank": 6, "update_proj_gap": 7, "scale": 0.25, "proj_type": proj_type}
    # A tiny eps: galore-torch adds eps outside Adam's bias correction, torch inside; we follow
    # galore-torch in projected groups, so only rounding remains. proj_type="full" projects onto the
    # exact singular vectors of the same gradient, so the off-diagonal entries of the r x r gradient at
    # a refresh are rounding noise that Adam normalizes to O(1): there we compare at galore's eps.
    eps = 1e-6 if proj_type == "full" else 1e-12
    tol = 1e-4 if proj_type == "full" else 1e-6
    opt = gradproj.GaLoreAdamW([{"params": ours, **group}], lr=1e-2, eps=eps, weight_decay=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = galore_torch.GaLoreAdamW([{"params": theirs, **group}], lr=1e-2, eps=eps, weight_decay=0.0)
    grads = grad_stream(ours, 30)
    _run(opt, ours, grads)
    _run(ref, theirs, grads)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _fira_pair(scale: float, steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run ours and fira.FiraAdamW on the same gradients; return both parameter lists."""
    ours = make_params(SHAPES, torch.float32)
    theirs = make_params(SHAPES, torch.float32)
    opt = gradproj.FiraAdamW([{"params": ours, "rank": 6, "update_proj_gap": 7, "scale": scale}], lr=1e-2, eps=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        group = {"params": theirs, "rank": 6, "update_proj_gap": 7, "alpha": scale, "proj_type": "std"}
        ref = fira.FiraAdamW([group], lr=1e-2, eps=1e-12)
    grads = grad_stream(ours, steps)
    _run(opt, ours, grads)
    _run(ref, theirs, grads)
    return ours, theirs


def test_fira_matches_fira_at_scale_one() -> None:
    for a, b in zip(*_fira_pair(1.0, 30), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fira_differs_from_released_code_when_scale_is_not_one() -> None:
    """The released code leaks (1 - scale) P P^T G into the residual; we do not."""
    ours, theirs = _fira_pair(0.25, 3)
    assert max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True)) > 1e-4


@pytest.mark.parametrize("preset", ["galore_adamw", "fira_adamw", "apollo_adamw"])
@pytest.mark.parametrize("foreach", [False, None])
def test_group_without_rank_is_torch_adamw_bit_for_bit(preset: str, foreach: bool | None) -> None:
    """The per-parameter step is torch's for-loop AdamW; the fast path is its fused kernel."""
    shapes = [(40, 24), (24,), (5, 3, 2)]
    ours = make_params(shapes, torch.float32)
    theirs = make_params(shapes, torch.float32)
    opt = gradproj.PRESETS[preset](ours, lr=3e-3, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1, foreach=foreach)
    kernel = {"foreach": False} if foreach is False else {"fused": True}
    ref = torch.optim.AdamW(theirs, lr=3e-3, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1, **kernel)
    grads = grad_stream(ours, 20)
    _run(opt, ours, grads)
    _run(ref, theirs, grads)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
