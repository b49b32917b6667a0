"""The probe: :class:`Dynamics` samples each projected layer through the engine's
:class:`~gradproj.optim.step.StepProbe` hooks and the trainer's global gradient norms, and turns them
into rows (see :mod:`gradproj.dynamics` for what each quantity means)."""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
from torch import Tensor

from ..optim.engine import ProjectedOptimizer
from .metrics import Bases, basis_overlap, captured_energy, materialize, norm, stable_rank, wide
from .spikes import SpikeDetector


class Dynamics:
    """Samples per-layer dynamics of a :class:`ProjectedOptimizer` (and global gradient-norm spikes of any
    optimizer). Attach it once; read rows with :meth:`drain`; save :meth:`state_dict` with a checkpoint.

    Args:
        optimizer: the optimizer to watch; per-layer rows need a gradproj optimizer.
        every: sample each projected layer every ``every`` steps (and at every refresh).
        spike_factor: a global gradient norm above ``spike_factor`` x its running mean is a spike.
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
        self.optimizer, self.every, self.energy = optimizer, every, energy
        self.spikes = SpikeDetector(factor=spike_factor, window=window)
        self.step: int | None = None  # the trainer's step number, if it sets one (else the optimizer's)
        self.rows: list[dict[str, Any]] = []
        self._starts: dict[str, Tensor] = {}
        self._refreshes: dict[str, dict[str, Tensor | int]] = {}
        self._energy_sum, self._energy_count, self._spike_count = 0.0, 0, 0
        if isinstance(optimizer, ProjectedOptimizer):
            optimizer.probe = self

    def detach(self) -> None:
        """Stop sampling (the optimizer no longer calls this probe)."""
        if isinstance(self.optimizer, ProjectedOptimizer) and self.optimizer.probe is self:
            self.optimizer.probe = None

    # -- called by the engine ----------------------------------------------------------------
    def wants(self, engine_step: int) -> bool:
        """Whether a layer at optimizer step ``engine_step`` (0-based) is sampled."""
        return engine_step % self.every == 0

    def refreshed(self, name: str, grad: Tensor, old: Bases, new: Bases, low_old: Tensor | None) -> None:
        """A basis was recomputed from ``grad``; ``low_old`` is ``down(grad)`` in the old basis (or None)."""
        row: dict[str, Tensor | int] = {"stable_rank": stable_rank(grad, self._start(name, grad))}
        row["rank"] = new[0].shape[1] if new[0] is not None else new[1].shape[0] if new[1] is not None else 0
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
        update: Tensor,
        step_size: float,
        phi: Tensor | None,
        residual_norm: Tensor | None = None,
    ) -> None:
        """One layer's sample; the weight is about to move by ``-step_size * update``. ``phi`` is Fira's,
        APOLLO's or Alice's per-channel scaling factor as the step computed it (None for GaLore);
        ``residual_norm`` the norm of the residual term after the growth limiter (Fira, APOLLO, Alice's
        compensation), reported as ``residual_norm``.

        Only a few norms are taken here (one kernel each, kept as 0-d tensors: no device sync inside
        the step); ratios, energies and averages are formed from them in :meth:`drain`.
        """
        row: dict[str, Any] = {"kind": "layer", "step": self._step(engine_step), "layer": name}
        refresh = self._refreshes.pop(name, None)
        row["refresh"] = refresh is not None
        row.update(refresh or {})
        row.update(_update=norm(update), _weight=norm(weight), _step_size=abs(float(step_size)))
        if grad is not None:
            row["grad_norm"] = norm(grad)
            if self.energy:
                row["_low"] = norm(low)
        if residual_norm is not None:
            row["residual_norm"] = residual_norm
        if phi is not None:
            phi = wide(phi)
            low_phi, high_phi = torch.aminmax(phi)
            row.update(scale_mean=phi.mean(), scale_min=low_phi, scale_max=high_phi)
        self.rows.append(row)

    # -- called by the training loop ----------------------------------------------------------
    def observe_grad_norm(self, step: int, grad_norm: float | Tensor) -> None:
        """Record the global gradient norm of ``step`` (a tensor is read at :meth:`drain`, so this adds no
        device sync to the step). Spikes are judged in order when the rows are drained."""
        self.rows.append({"kind": "grad_norm", "step": step, "grad_norm": grad_norm})

    def drain(self) -> list[dict[str, Any]]:
        """The rows collected since the last call (plain numbers), with spike rows after the global norms."""
        rows, self.rows = self.rows, []
        out = []
        for row in materialize(rows):
            out.append(row)
            if row["kind"] == "layer":
                self._finish(row)
            elif row["kind"] == "grad_norm":
                spike = self._judge(row)
                if spike is not None:
                    out.append(spike)
        for row in out:
            self._count(row)
        return out

    def summary(self) -> dict[str, float | int]:
        """Totals over every drained row (of this run and, after a resume, the run it continues)."""
        mean = self._energy_sum / self._energy_count if self._energy_count else math.nan
        return {"samples": self._energy_count, "mean_energy": mean, "spikes": self._spike_count}

    def state_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, numbers) for a checkpoint; drain first (undrained rows are not in it)."""
        if self.rows:
            raise RuntimeError("drain() the dynamics rows before saving their state")
        totals = {"energy_sum": self._energy_sum, "energy_count": self._energy_count, "spikes": self._spike_count}
        return {"spikes": self.spikes.state_dict(), "totals": totals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spikes.load_state_dict(state["spikes"])
        totals = state["totals"]
        self._energy_sum, self._energy_count = float(totals["energy_sum"]), int(totals["energy_count"])
        self._spike_count = int(totals["spikes"])

    # -- internals ------------------------------------------------------------------------------
    def _step(self, engine_step: int) -> int:
        return self.step if self.step is not None else engine_step + 1

    def _start(self, name: str, grad: Tensor) -> Tensor:
        """The power iteration's start, fixed by the layer's name (a private generator: sampling never moves
        the training RNG, so runs and resumes stay exact); made once per layer, not per sample."""
        size = min(grad.shape)
        dtype = wide(grad).dtype
        v = self._starts.get(name)
        if v is None or v.device != grad.device or v.shape[0] != size or v.dtype != dtype:
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            v = self._starts[name] = torch.randn(size, generator=generator, dtype=dtype).to(grad.device)
        return v

    def _finish(self, row: dict[str, Any]) -> None:
        """Turn a drained layer row's raw norms into the reported ratios (plain floats)."""
        update, weight, step_size = row.pop("_update"), row.pop("_weight"), row.pop("_step_size")
        row["update_ratio"] = step_size * update / max(weight, 1e-12)
        low = row.pop("_low", None)
        if low is not None:
            row["energy"] = (low / row["grad_norm"]) ** 2 if row["grad_norm"] > 0 else 1.0
        if "grad_norm" in row:
            ratio = self.spikes.layer_ratio(row["layer"], row["grad_norm"])
            if ratio is not None:
                row["grad_norm_ratio"] = ratio

    def _judge(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """Fill a global-norm row's running mean; return a spike row if the norm is one."""
        grad_norm = row["grad_norm"]
        if not math.isfinite(grad_norm):  # JSON has no NaN, so a string; kept out of the running mean
            row.update(kind="spike", grad_norm=str(grad_norm), running_mean=None)
            return None
        row["running_mean"] = self.spikes.running_mean()
        return self.spikes.judge(row["step"], grad_norm)

    def _count(self, row: dict[str, Any]) -> None:
        if row["kind"] == "spike":
            self._spike_count += 1
        elif row["kind"] == "layer" and "energy" in row:
            self._energy_sum += row["energy"]
            self._energy_count += 1
