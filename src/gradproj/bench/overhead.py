"""The cost of sampling training dynamics: the same GaLore trainer run with and without
:class:`gradproj.dynamics.Dynamics` (``--dynamics-every``), alternated, compared by mean step time
(sampled steps are a fraction of all steps, so the median would hide them)."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..train.config import PretrainConfig
from .methods import get_method
from .quality import prepare_data, run


def overhead(
    cfg: PretrainConfig, every: int = 10, repeats: int = 3, method: str = "galore_adamw"
) -> list[dict[str, Any]]:
    """Alternate ``repeats`` trainer runs without and with dynamics; the best mean step time of each
    (the least disturbed by other work on the machine) and their ratio. Both runs train alike (the
    probe draws no random numbers); a sampled step takes the per-parameter step instead of the fast
    path (:mod:`gradproj.optim.fast`), which rounds differently, so the final losses agree to rounding:
    ``loss_gap`` is their relative difference (0 when the fast path is off)."""
    with tempfile.TemporaryDirectory(prefix="gradproj-overhead-") as out:
        return _overhead(cfg, every, repeats, method, Path(out))


def _overhead(cfg: PretrainConfig, every: int, repeats: int, method: str, out: Path) -> list[dict[str, Any]]:
    chosen = get_method(method)
    data = prepare_data(cfg)
    off, on = replace(cfg, dynamics_every=0), replace(cfg, dynamics_every=every)
    means: dict[int, list[float]] = {0: [], every: []}
    losses: dict[int, float] = {}
    rows = 0
    for _ in range(repeats):
        for config in (off, on):
            record = run(chosen, 1e-2, 3e-2, data, config, out)
            means[config.dynamics_every].append(record["step_seconds_mean"])
            losses[config.dynamics_every] = record["val_loss"]
            rows = max(rows, record["dynamics_samples"])
    base, probed = min(means[0]), min(means[every])
    return [
        {
            "benchmark": "dynamics_overhead",
            "method": method,
            "every": every,
            "step_seconds_mean_off": base,
            "step_seconds_mean_on": probed,
            "overhead": probed / base - 1,
            "all_means_off": means[0],
            "all_means_on": means[every],
            "rows_per_run": rows,
            "loss_gap": abs(losses[every] - losses[0]) / abs(losses[0]),
            "config": asdict(cfg),
        }
    ]
