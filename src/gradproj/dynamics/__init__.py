"""Training dynamics, per projected layer, measured cheaply while training.

Why low-rank training works, or fails, shows in a few numbers per layer:

``energy``
    ``||down(G)||^2 / ||G||^2``: the share of the gradient the current basis keeps. Right after a
    refresh with an SVD basis it is the largest any rank-``r`` basis can keep; between refreshes it
    decays as the gradient turns away from the basis. ``energy_before`` is the same for the old basis
    at the refresh step (how stale it had become).
``overlap``
    ``||Q_old^T Q_new||_F^2 / r`` at a refresh: 1 when the new basis spans the old subspace, ``r/m``
    for an unrelated random one. Low overlap means the subspace drifts and the moments (kept in the old
    coordinates) are stale; that is what ``on_refresh="rotate"`` addresses.
``stable_rank`` (at refreshes)
    ``||G||_F^2 / sigma_max(G)^2``: how many directions carry the gradient. Small stable ranks are
    why a small ``rank`` captures most of the energy. ``sigma_max`` comes from five power iterations,
    which can only underestimate it, so the value is an upper bound (within 1% in our tests).
``update_ratio``
    ``||step||_F / ||W||_F``: the relative size of the applied update (around 1e-3 is typical).
``grad_norm`` and ``grad_norm_ratio``
    this layer's gradient norm and its ratio to an exponential moving average of its earlier samples
    (weight 0.8 on the past); a ratio far above 1 is a spike. The global norm (every step) is compared
    with the mean of the previous 50 steps; spikes above 3x it are rows of their own.
``scale_mean`` / ``scale_min`` / ``scale_max``
    Fira's and APOLLO's scaling factors ``phi`` (per channel or per tensor); for Alice, the compensation's
    per-channel whitening ``sqrt(d - r) / sqrt(p)``.
``residual_norm``
    the norm of the residual term after the growth limiter (Fira's, APOLLO's, Alice's compensation).

Each layer is sampled at its refreshes and every ``every`` steps. A sample costs four norms (one
kernel each, no device sync); a refresh adds the overlap's ``r x r`` product and five power
iterations. Rows are plain dicts, drained by the trainer into ``dynamics.jsonl`` and TensorBoard.

The package is three parts: :mod:`~gradproj.dynamics.metrics` (pure functions on tensors),
:mod:`~gradproj.dynamics.spikes` (the spike detector and its averages, whose state the trainer saves in
each checkpoint, so a resumed run continues them exactly whatever its ``--out``) and
:mod:`~gradproj.dynamics.probe` (:class:`Dynamics`, fed by the engine one sample at a time).

Example:
    >>> import torch, gradproj
    >>> w = torch.nn.Parameter(torch.randn(16, 32))
    >>> opt = gradproj.GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 5}], lr=1e-2)
    >>> dyn = Dynamics(opt, every=5)
    >>> for _ in range(6):
    ...     w.grad = torch.randn(16, 32)
    ...     opt.step()
    >>> rows = [r for r in dyn.drain() if r["kind"] == "layer"]
    >>> [r["step"] for r in rows], "overlap" in rows[1], 0 < rows[0]["energy"] <= 1
    ([1, 6], True, True)
"""

from .metrics import basis_overlap, captured_energy, materialize, stable_rank
from .probe import Dynamics
from .spikes import SpikeDetector

__all__ = ["Dynamics", "SpikeDetector", "basis_overlap", "captured_energy", "materialize", "stable_rank"]
