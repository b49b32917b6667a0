"""docs/TRAINING.md's table of causal-LM fine-tuning (``scripts/sft_bbc.py``): held-out exact match and
response loss per method and learning rate, mean and spread over seeds, against the model before
fine-tuning and the majority answer."""

from __future__ import annotations

import statistics
from typing import Any


def sft_table(records: list[dict[str, Any]]) -> str:
    """One row per (method, learning rate): mean exact match (min..max over seeds) and response loss."""
    rows = [
        "| method | lr (matrices / rest) | seeds | held-out exact match | response loss | optimizer state |",
        "|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, Any, Any], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], r.get("lr"), r.get("other_lr")), []).append(r)
    for (method, lr, other), runs in groups.items():
        match = [r["exact_match"] for r in runs]
        spread = f" ({min(match):.3f}..{max(match):.3f})" if len(runs) > 1 else ""
        rate = f"{lr:.0e} / {other:.0e}" if lr is not None else "-"
        state = f"{runs[0]['optimizer_state_bytes'] / 2**20:.1f} MiB" if "optimizer_state_bytes" in runs[0] else "-"
        rows.append(
            f"| {method} | {rate} | {len(runs)} | {statistics.mean(match):.3f}{spread} | "
            f"{statistics.mean(r['loss'] for r in runs):.3f} | {state} |"
        )
    majority = records[0]["majority_share"]
    rows.append(f"| always the commonest label | - | - | {majority:.3f} | - | - |")
    return "\n".join(rows)
