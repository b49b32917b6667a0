"""The memory promise, measured: bf16 weights against float32 on the same run (``bench precision``),
and the planner against the trainer over models, dtypes, checkpointing and layer-wise
(``bench memory``). Both train through the one trainer; records feed ``docs/`` tables.

Example:
    >>> rows = [{"method": "adamw", "dtype": "fp32", "bf16_update": None, "val_ppl": 50.0, "weights": 4},
    ...         {"method": "adamw", "dtype": "bf16", "bf16_update": "nearest", "val_ppl": 55.0, "weights": 2}]
    >>> print(precision_table(rows).splitlines()[-1])
    | adamw | bf16, nearest | 55.00 | 1.100 | 0.50 | 0.00 |
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..optim.precision import BF16_UPDATES
from ..train.config import PretrainConfig
from ..train.logs import environment
from ..train.memory_check import FIELDS

#: (dtype, bf16_update) of a precision comparison: float32, then every bf16 write-back
VARIANTS: tuple[tuple[str, str | None], ...] = (("fp32", None), *(("bf16", mode) for mode in BF16_UPDATES))


def _train(config: PretrainConfig) -> dict[str, Any]:
    from ..train import pretrain

    started = time.perf_counter()
    summary = pretrain(config).summary
    return {"summary": summary, "wall_s": time.perf_counter() - started}


def precision_runs(base: PretrainConfig, methods: list[str], out: Path) -> list[dict[str, Any]]:
    """Each method in float32 and in bf16 with each write-back, same seed and batches."""
    records = []
    for method in methods:
        for dtype, mode in VARIANTS:
            name = f"{method}-{dtype}" + (f"-{mode}" if mode else "")
            config = replace(base, optim=replace(base.optim, name=method), dtype=dtype, bf16_update=mode)
            result = _train(replace(config, out=str(out / name)))
            summary = result["summary"]
            records.append(
                {
                    "kind": "precision",
                    "method": method,
                    "dtype": dtype,
                    "bf16_update": mode,
                    "model": base.model,
                    "steps": base.steps,
                    "seed": base.seed,
                    "val_loss": summary["eval"]["loss"],
                    "val_ppl": summary["eval"]["ppl"],
                    "weights": summary["memory"]["measured"].get("weights"),
                    "optimizer_state": summary["memory"]["measured"].get("optimizer_state"),
                    "seconds": result["wall_s"],
                    "versions": environment(base.device),
                }
            )
    return records


def precision_table(records: list[dict[str, Any]]) -> str:
    """Held-out perplexity of each variant and its ratio to the same method in float32."""
    lines = [
        "| method | weights | held-out ppl | vs fp32 | weight bytes vs fp32 | optimizer state MiB |",
        "|---|---|---|---|---|---|",
    ]
    fp32 = {r["method"]: r for r in records if r["dtype"] == "fp32"}
    for r in records:
        ref = fp32.get(r["method"], r)
        label = r["dtype"] + (f", {r['bf16_update']}" if r.get("bf16_update") else "")
        lines.append(
            f"| {r['method']} | {label} | {r['val_ppl']:.2f} | {r['val_ppl'] / ref['val_ppl']:.3f} | "
            f"{r['weights'] / ref['weights']:.2f} | {r.get('optimizer_state', 0) / 2**20:.2f} |"
        )
    return "\n".join(lines)


def memory_matrix(base: PretrainConfig, models: list[str], out: Path) -> list[dict[str, Any]]:
    """Planned against measured for each model in fp32 and bf16, with and without checkpointing and
    layer-wise: two steps each (the second, with optimizer state, is measured)."""
    records = []
    for model in models:
        for dtype in ("fp32", "bf16"):
            for checkpointing in (False, True):
                for layerwise in (False, True):
                    config = replace(
                        base, model=model, dtype=dtype, activation_checkpointing=checkpointing, layerwise=layerwise
                    )
                    name = f"{model}-{dtype}-{'ckpt' if checkpointing else 'full'}-{'lw' if layerwise else 'std'}"
                    result = _train(replace(config, out=str(out / name)))
                    memory = result["summary"]["memory"]
                    records.append(
                        {
                            "kind": "memory",
                            "model": model,
                            "dtype": dtype,
                            "checkpointing": checkpointing,
                            "layerwise": layerwise,
                            "optimizer": base.optim.name,
                            "batch": base.batch_size,
                            "seq_len": base.seq_len,
                            "planned": memory["planned"],
                            "measured": memory["measured"],
                            "device": memory["device"],
                            "versions": environment(base.device),
                        }
                    )
    return records


def memory_table(records: list[dict[str, Any]]) -> str:
    """Measured MiB and planned/measured per field, one row per run."""
    head = "| model | weights | checkpointing | layer-wise | " + " | ".join(
        f"{key.replace('_', ' ')} MiB (plan/meas.)" for key in FIELDS
    )
    lines = [head + " |", "|---|---|---|---|" + "---|" * len(FIELDS)]
    for r in records:
        cells = []
        for key in FIELDS:
            seen, plan = r["measured"].get(key), r["planned"].get(key)
            ratio = f" ({plan / seen:.3f})" if seen and plan is not None else ""
            cells.append(f"{(seen or 0) / 2**20:.1f}{ratio}")
        flags = f"| {r['model']} | {r['dtype']} | {'yes' if r['checkpointing'] else 'no'} | "
        lines.append(flags + f"{'yes' if r['layerwise'] else 'no'} | " + " | ".join(cells) + " |")
    worst = {
        key: max(abs(r["planned"][key] / r["measured"][key] - 1) for r in records if r["measured"].get(key))
        for key in FIELDS
        if any(r["planned"].get(key) is not None for r in records)
    }
    summary = ", ".join(f"{key.replace('_', ' ')} {value:.1%}" for key, value in worst.items())
    return "\n".join([*lines, "", f"Largest |planned / measured - 1| over these runs: {summary}."])
