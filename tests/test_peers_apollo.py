"""Our APOLLO equals apollo-torch step for step once the two use the same projection matrix.

apollo-torch projects with a Gaussian matrix, entries N(0, 1/r), drawn from its own seed sequence; we
project with an orthonormal basis and rescale ``||R||`` by ``sqrt(d / r)`` (docs/ALGORITHMS.md). Given
apollo-torch's matrix times ``sqrt(r / d)`` as our basis and ``eps = 0`` (so that Adam's direction does
not see the basis' scale), every other part of the algorithm (channel and tensor scaling, how ``scale``
enters, the limiter, the schedule of refreshes) must coincide.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import gradproj
from conftest import grad_stream, make_params
from gradproj.projection import projectors
from gradproj.projection.bases import derive_seed

apollo_torch = pytest.importorskip("apollo_torch")
from apollo_torch.random_projector import next_seed, stable_randn  # noqa: E402

GAP, RANK = 3, 4
SHAPES = [(40, 24), (24, 56)]  # tall (right basis) and wide (left basis)


def _their_basis(index: int, refresh: int, shape: tuple[int, int], side: str) -> torch.Tensor:
    """apollo-torch's projection matrix of the ``index``-th parameter (1-based) at its ``refresh``-th refresh."""
    seed = index
    for _ in range(refresh):
        seed = next_seed(seed)
    m, n = shape
    size = (m, RANK) if side == "left" else (RANK, n)
    # drawn in float32 (apollo-torch computes non-float32 weights in float32), then cast
    return (stable_randn(size, seed=seed, dtype=torch.float32) / math.sqrt(RANK)).double()


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_apollo_matches_apollo_torch_given_the_same_projection(
    scale_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = make_params(SHAPES)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    # our seed of an unnamed parameter follows its place; apollo-torch numbers parameters from 1
    index = {derive_seed(0, zlib.crc32(f"param_groups[0].params[{j}]".encode())): j + 1 for j in range(len(ours))}

    def materialize(self, state, layout):  # type: ignore[no-untyped-def]
        if int(state.get("last_refresh", -1)) < 0:
            return None, None
        basis = _their_basis(
            index[int(state["proj_seed"])], int(state["last_refresh"]) // GAP, layout.shape, layout.side
        )
        d = layout.shape[0] if layout.side == "left" else layout.shape[1]
        basis = basis * math.sqrt(RANK / d)  # our R is then sqrt(r/d) R_jl, which our phi undoes
        return (basis, None) if layout.side == "left" else (None, basis)

    monkeypatch.setattr(projectors.RandomProjector, "materialize", materialize)
    group = {"rank": RANK, "update_proj_gap": GAP, "scale": 0.5, "scale_type": scale_type}
    opt = gradproj.APOLLOAdamW([{"params": ours, **group}], lr=1e-2, eps=0.0)
    ref = apollo_torch.APOLLOAdamW(
        [{"params": theirs, "proj": "random", "proj_type": "std", **group}], lr=1e-2, eps=0.0
    )
    for grads in grad_stream(ours, 2 * GAP + 2):  # across two refreshes
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-9)
