"""Run logs: every row to ``metrics.jsonl``, per-kind CSV (``train.csv``, ``eval.csv``) and
TensorBoard events; metric names carry their units. A resumed run first drops rows written after
its checkpoint, so the logs read as one uninterrupted run.

Example:
    >>> import tempfile
    >>> run = Path(tempfile.mkdtemp())
    >>> log = RunLogger(run, tensorboard=False)
    >>> log.write("train", 1, {"loss": 2.5}); log.close()
    >>> (run / "train.csv").read_text().splitlines()
    ['step,loss', '1,2.5']
"""

from __future__ import annotations

import csv
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


def environment(device: str = "cpu") -> dict[str, str]:
    """Package versions and the device, recorded with every run and benchmark."""
    import gradproj

    out = {"python": platform.python_version(), "torch": torch.__version__, "gradproj": gradproj.__version__}
    if device.startswith("cuda") and torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name(torch.device(device))
    else:
        out["device"] = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    peers = ("bitsandbytes", "torchao", "peft", "galore-torch", "fira", "apollo-torch")
    for name in ("transformers", "tokenizers", "safetensors", *peers):
        try:
            out[name] = metadata.version(name)  # installed metadata: importing peers is slow and noisy
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor an optimizer holds in its state (what a checkpoint stores), including
    tensors inside peers' projector objects."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in _tensors(state))


def basis_refreshes(optimizer: torch.optim.Optimizer) -> dict[str, int] | None:
    """How many basis refreshes (SVDs, or the projector's equivalent) gradproj's projected matrices did,
    and over how many matrices; None for optimizers that keep no such count (torch's, the peers')."""
    counts = [int(s["refreshes"]) for s in optimizer.state.values() if isinstance(s, dict) and "refreshes" in s]
    return {"refreshes": sum(counts), "matrices": len(counts)} if counts else None


def gradient_policy(optimizer: torch.optim.Optimizer) -> dict[str, int] | None:
    """The gradient policy's running totals: entries clipped, moment resets and the tensors it polices (one
    device transfer); None for an optimizer without one (:mod:`gradproj.optim.spikes`)."""
    from ..optim.spikes import policy_totals

    states = [s for s in optimizer.state.values() if "spam_step" in s]
    return {**policy_totals(states), "tensors": len(states)} if states else None


def allocated_ranks(optimizer: torch.optim.Optimizer, reference_rank: int | None) -> dict[str, Any] | None:
    """``rank="auto"``: the ranks the matrices hold at the end (min, mean, max), the bytes of state they hold,
    the budget, and what the same matrices would hold at the fixed ``reference_rank``; None without it."""
    from ..optim.groups import state_bytes
    from ..optim.ranks import auto_rank

    groups = [g for g in optimizer.param_groups if "rank" in g and auto_rank(g)]
    states = [optimizer.state[p] for g in groups for p in g["params"] if optimizer.state.get(p)]
    if not states:
        return None
    ranks = [int(s["rank"]) for s in states]
    rule = getattr(getattr(optimizer, "rule", None), "name", "adam")
    fixed = None
    if reference_rank is not None:
        fixed = sum(state_bytes(p, {**g, "rank": reference_rank}, rule) for g in groups for p in g["params"])
    return {
        "matrices": len(ranks),
        "min": min(ranks),
        "mean": sum(ranks) / len(ranks),
        "max": max(ranks),
        "state_bytes": sum(t.numel() * t.element_size() for s in states for t in _tensors(s)),
        "state_budget": sum(int(g["state_budget"]) for g in groups),
        "reference_rank": reference_rank,
        "fixed_state_bytes": fixed,
    }


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
            # a tensor subclass (torchao's 8-bit states): count the tensors it is made of
            names, _ = value.__tensor_flatten__()
            return [t for name in names for t in _tensors(getattr(value, name))]
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return [t for v in getattr(value, "__dict__", {}).values() for t in _tensors(v)]  # peers' projector objects


_DYNAMICS_SCALARS = (
    "energy",
    "energy_before",
    "overlap",
    "stable_rank",
    "update_ratio",
    "grad_norm_ratio",
    "scale_mean",
    "residual_norm",
)


class RunLogger:
    """Appends metric rows for one run folder."""

    def __init__(
        self, run_dir: Path, *, tensorboard: bool = True, resume_step: int | None = None, enabled: bool = True
    ) -> None:
        self.run_dir, self.enabled = Path(run_dir), enabled  # disabled: ranks other than 0 write nothing
        self.writer: Any = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional; CSV/JSONL always work
                pass
            else:
                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step)

    def write(self, kind: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        with (self.run_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps({"kind": kind, **row}) + "\n")
        path = self.run_dir / f"{kind}.csv"
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"{kind}/{name}", value, step)

    def write_dynamics(self, rows: list[dict[str, Any]]) -> None:
        """Rows of :class:`gradproj.dynamics.Dynamics` to ``dynamics.jsonl``; per-layer values and spikes
        also to TensorBoard (``dynamics/<quantity>/<layer>``)."""
        if not self.enabled or not rows:
            return
        with (self.run_dir / "dynamics.jsonl").open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        if self.writer is None:
            return
        for row in rows:
            if row["kind"] == "layer":
                for name in _DYNAMICS_SCALARS:
                    if name in row:
                        self.writer.add_scalar(f"dynamics/{name}/{row['layer']}", row[name], row["step"])
            elif row["kind"] == "spike":
                self.writer.add_scalar("dynamics/grad_norm_spike", row["grad_norm"], row["step"])

    def _truncate_after(self, step: int) -> None:
        for name in ("metrics.jsonl", "dynamics.jsonl"):
            path = self.run_dir / name
            if path.exists():
                rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
                path.write_text("".join(r + "\n" for r in rows))
        for csv_path in self.run_dir.glob("*.csv"):
            lines = csv_path.read_text().splitlines()
            kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) <= step]
            csv_path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
