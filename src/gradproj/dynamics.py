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
    this layer's gradient norm and its ratio to the running mean of its earlier samples; a ratio far
    above 1 is a spike. The global norm (every step) is checked the same way; spikes are rows of their own.
``scale_mean`` / ``scale_min`` / ``scale_max``
    Fira's and APOLLO's scaling factors ``phi`` (per channel or per tensor).

Each layer is sampled at its refreshes and every ``every`` steps. A sample costs four norms (one
kernel each, no device sync); a refresh adds the overlap's ``r x r`` product and five power
iterations. Rows are plain dicts, drained by the trainer into ``dynamics.jsonl`` and TensorBoard.

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

from __future__ import annotations

import math
import zlib
from collections import deque
from typing import Any

import torch
from torch import Tensor

from .optim.engine import ProjectedOptimizer
from .optim.residual import scaling_factor


def _wide(x: Tensor) -> Tensor:
    """float32 for half-precision tensors (sums of squares overflow or round badly), else unchanged."""
    return x if x.dtype == torch.float64 else x.float()


def _norm(x: Tensor) -> Tensor:
    """The Frobenius norm in float32 or wider, as one kernel (no cast of a half-precision tensor)."""
    return torch.linalg.vector_norm(x, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


def captured_energy(low: Tensor, grad: Tensor) -> Tensor:
    """``||down(G)||^2 / ||G||^2`` for an orthonormal basis, as a 0-d tensor (no device sync)."""
    return _wide(low).pow(2).sum() / _wide(grad).pow(2).sum().clamp_min(1e-30)


def basis_overlap(old: tuple[Tensor | None, Tensor | None], new: tuple[Tensor | None, Tensor | None]) -> Tensor:
    """``||Q_old^T Q_new||_F^2 / r`` averaged over the projected sides (1: same subspace)."""
    values = []
    for side, (a, b) in enumerate(zip(old, new, strict=True)):
        if a is None or b is None:
            continue
        a, b = (_wide(a), _wide(b)) if side == 0 else (_wide(a).T, _wide(b).T)  # columns span the subspace
        values.append((a.T @ b).pow(2).sum() / min(a.shape[1], b.shape[1]))
    return torch.stack(values).mean() if values else torch.tensor(math.nan)


def materialize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace 0-d tensors in rows by floats with one transfer per device (one sync, not one per value)."""
    slots = [(row, key) for row in rows for key, value in row.items() if isinstance(value, Tensor)]
    by_device: dict[torch.device, list[tuple[dict[str, Any], str]]] = {}
    for row, key in slots:
        by_device.setdefault(row[key].device, []).append((row, key))
    for items in by_device.values():
        values = torch.stack([row[key].double() for row, key in items]).tolist()
        for (row, key), value in zip(items, values, strict=True):
            row[key] = value
    return rows


class Dynamics:
    """Samples per-layer dynamics of a :class:`ProjectedOptimizer` (and global gradient-norm spikes of any
    optimizer). Attach it once; read rows with :meth:`drain`.

    Args:
        optimizer: the optimizer to watch; per-layer rows need a gradproj optimizer.
        every: sample each projected layer every ``every`` steps (and at every refresh).
        spike_factor: a gradient norm above ``spike_factor`` x its running mean is a spike.
        window: steps in the global gradient norm's running mean.
        energy: False where the gradient the optimizer sees is already projected (low-rank DDP
            communication), so its captured energy would read 1 by construction.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        every: int = 10,
        spike_factor: float = 3.0,
        window: int = 50,
        energy: bool = True,
    ) -> None:
        if every < 1:
            raise ValueError(f"every={every} is not valid; expected an integer >= 1")
        if spike_factor <= 1:
            raise ValueError(f"spike_factor={spike_factor} is not valid; expected a number > 1")
        self.optimizer, self.every, self.spike_factor, self.energy = optimizer, every, spike_factor, energy
        self.step: int | None = None  # the trainer's step number, if it sets one (else the optimizer's)
        self.rows: list[dict[str, Any]] = []
        self._norms: deque[float] = deque(maxlen=window)
        self._layer_norms: dict[str, float] = {}
        self._starts: dict[str, Tensor] = {}
        self._energy_sum, self._energy_count, self._spikes = 0.0, 0, 0
        self._refreshes: dict[str, dict[str, Tensor]] = {}
        if isinstance(optimizer, ProjectedOptimizer):
            optimizer.probe = self

    def detach(self) -> None:
        """Stop sampling (the optimizer no longer calls this probe)."""
        if getattr(self.optimizer, "probe", None) is self:
            self.optimizer.probe = None  # type: ignore[attr-defined]

    def drain(self) -> list[dict[str, Any]]:
        """The rows collected since the last call (plain numbers), with spike rows after the global norms."""
        rows, self.rows = self.rows, []
        out = []
        for row in materialize(rows):
            out.append(row)
            if row["kind"] == "layer":
                self._finish(row)
            spike = self._judge(row) if row["kind"] == "grad_norm" else None
            if spike is not None:
                out.append(spike)
        for row in out:
            self._count(row)
        return out

    def _step(self, engine_step: int) -> int:
        return self.step if self.step is not None else engine_step + 1

    # -- called by the engine ----------------------------------------------------------------
    def wants(self, engine_step: int) -> bool:
        """Whether a layer at optimizer step ``engine_step`` (0-based) is sampled."""
        return engine_step % self.every == 0

    def refreshed(self, name: str, grad: Tensor, old: tuple[Any, Any], new: tuple[Any, Any], low_old: Any) -> None:
        """A basis was recomputed from ``grad``; ``low_old`` is ``down(grad)`` in the old basis (or None)."""
        row: dict[str, Tensor] = {"stable_rank": self._stable_rank(name, grad)}
        if old[0] is not None or old[1] is not None:
            row["overlap"] = basis_overlap(old, new)
            if low_old is not None and self.energy:
                row["energy_before"] = captured_energy(low_old, grad)
        self._refreshes[name] = row

    def sampled(
        self,
        name: str,
        engine_step: int,
        weight: Tensor,
        grad: Tensor | None,
        low: Tensor,
        u: Tensor,
        update: Tensor,
        step_size: float,
        group: dict[str, Any],
        side: str,
    ) -> None:
        """One layer's sample; the weight is about to move by ``-step_size * update``.

        Only a few norms are taken here (one kernel each, kept as 0-d tensors: no device sync inside
        the step); ratios, energies and running means are formed from them in :meth:`drain`.
        """
        row: dict[str, Any] = {"kind": "layer", "step": self._step(engine_step), "layer": name}
        refresh = self._refreshes.pop(name, None)
        row["refresh"] = refresh is not None
        row.update(refresh or {})
        row.update(_update=_norm(update), _weight=_norm(weight), _step_size=abs(float(step_size)))
        if grad is not None:
            row["grad_norm"] = _norm(grad)
            if self.energy:
                row["_low"] = _norm(low)
        if group.get("residual", "none") != "none" and grad is not None:
            phi = _wide(scaling_factor(tuple(grad.shape), low, u, side, group))
            low_phi, high_phi = torch.aminmax(phi)
            row.update(scale_mean=phi.mean(), scale_min=low_phi, scale_max=high_phi)
        self.rows.append(row)

    def _finish(self, row: dict[str, Any]) -> None:
        """Turn a drained layer row's raw norms into the reported ratios (plain floats)."""
        update, weight, step_size = row.pop("_update"), row.pop("_weight"), row.pop("_step_size")
        row["update_ratio"] = step_size * update / max(weight, 1e-12)
        low = row.pop("_low", None)
        if low is not None:
            row["energy"] = (low / row["grad_norm"]) ** 2 if row["grad_norm"] > 0 else 1.0
        if "grad_norm" in row:
            previous = self._layer_norms.get(row["layer"])
            if previous is not None:
                row["grad_norm_ratio"] = row["grad_norm"] / max(previous, 1e-30)
            self._track_layer_norm(row["layer"], row["grad_norm"])

    def _stable_rank(self, name: str, grad: Tensor, iterations: int = 5) -> Tensor:
        """``||G||_F^2 / sigma_max^2``, sigma_max by power iteration from a start fixed by the layer's name
        (a private generator: sampling never moves the training RNG, so runs and resumes stay exact)."""
        g = _wide(grad)
        g = g if g.shape[0] >= g.shape[1] else g.T  # iterate in the smaller dimension
        v = self._starts.get(name)
        if v is None or v.device != g.device or v.shape[0] != g.shape[1]:  # made once: no copy per sample
            start = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            v = self._starts[name] = torch.randn(g.shape[1], generator=start, dtype=g.dtype).to(g.device)
        for _ in range(iterations):
            v = g.T @ (g @ v)
            v = v / v.norm().clamp_min(1e-30)
        return g.pow(2).sum() / (g @ v).pow(2).sum().clamp_min(1e-30)

    def _track_layer_norm(self, name: str, norm: float) -> None:
        previous = self._layer_norms.get(name)
        self._layer_norms[name] = norm if previous is None else 0.8 * previous + 0.2 * norm

    def summary(self) -> dict[str, float | int]:
        """Totals over every drained row: layer samples, their mean captured energy, spikes."""
        mean = self._energy_sum / self._energy_count if self._energy_count else math.nan
        return {"samples": self._energy_count, "mean_energy": mean, "spikes": self._spikes}

    def _count(self, row: dict[str, Any]) -> None:
        if row["kind"] == "spike":
            self._spikes += 1
        elif row["kind"] == "layer" and "energy" in row:
            self._energy_sum += row["energy"]
            self._energy_count += 1

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Rebuild the running means from a resumed run's earlier rows (``dynamics.jsonl`` up to the
        checkpoint), so that spikes and ratios after a resume are those of an uninterrupted run."""
        for row in rows:
            self._count(row)
            if row["kind"] == "grad_norm":
                self._norms.append(row["grad_norm"])
            elif row["kind"] == "layer" and "grad_norm" in row:
                self._track_layer_norm(row["layer"], row["grad_norm"])

    # -- called by the training loop ----------------------------------------------------------
    def observe_grad_norm(self, step: int, norm: float | Tensor) -> None:
        """Record the global gradient norm of ``step`` (a tensor is read at :meth:`drain`, so this adds no
        device sync to the step). Spikes are judged in order when the rows are drained."""
        self.rows.append({"kind": "grad_norm", "step": step, "grad_norm": norm})

    def _judge(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """Fill a global-norm row's running mean; return a spike row if the norm is one."""
        norm = row["grad_norm"]
        if not math.isfinite(norm):  # kept out of the running mean; JSON has no NaN, so a string
            row.update(kind="spike", grad_norm=str(norm), running_mean=None)
            return None
        mean = sum(self._norms) / len(self._norms) if self._norms else None
        row["running_mean"] = mean
        self._norms.append(norm)
        if mean is None or len(self._norms) <= 10 or norm <= self.spike_factor * mean:
            return None
        return {"kind": "spike", "step": row["step"], "grad_norm": norm, "running_mean": mean, "ratio": norm / mean}
