"""Benchmark records (JSON lines) to Markdown: the side-by-side table, the hardware and versions line,
and the record helpers every table module shares (the generated blocks of ``docs/BENCHMARKS.md``:
:mod:`gradproj.bench.blocks`).

Example:
    >>> records = [
    ...     {"method": "adamw", "val_loss": 4.0, "val_ppl": 54.6, "diverged": False, "lr_matrix": 1e-3,
    ...      "lr_other": 1e-2, "state_bytes": 2**21},
    ...     {"method": "galore_adamw", "val_loss": 4.1, "val_ppl": 60.3, "diverged": False, "lr_matrix": 1e-2,
    ...      "lr_other": 1e-2, "state_bytes": 2**20},
    ... ]
    >>> print(table(records).splitlines()[-1])
    | galore_adamw | 60.30 | 1.104 | 0.01 / 0.01 | 1.00 | 0.500 | n/a | n/a | n/a | n/a |
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..optim.registry import METHODS
from .timing import refresh_target

#: The record file inside a bench's output folder (beside its run folders).
RECORDS = "records.jsonl"


def read_records(paths: list[Path]) -> list[dict[str, Any]]:
    """Every record in the given JSON-lines files or bench folders (their ``records.jsonl``); a
    missing one is a one-line error."""
    files = [path / RECORDS if path.is_dir() else path for path in paths]
    for path in files:
        if not path.exists():
            raise SystemExit(f"gradproj: {path} does not exist")
    return [json.loads(line) for path in files for line in path.read_text().splitlines() if line.strip()]


def write_records(records: list[dict[str, Any]], path: Path) -> None:
    """Append records to a JSON-lines file (created with its folder if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def best_per_method(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The record with the lowest validation loss for each method, in first-seen order."""
    best: dict[str, dict[str, Any]] = {}
    for record in records:
        current = best.get(record["method"])
        if current is None or (
            not record["diverged"] and (current["diverged"] or record["val_loss"] < current["val_loss"])
        ):
            best[record["method"]] = record
    return list(best.values())


def best_learning_rates(records: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Each method's best (matrix, rest) learning rates in a sweep's records."""
    return {r["method"]: (r["lr_matrix"], r["lr_other"]) for r in best_per_method(records) if not r["diverged"]}


def is_peer(method: str) -> bool:
    """Whether a record's method is another package's (peers, LoRA); unknown names are not."""
    return method in METHODS and METHODS[method].peer


def is_external(method: str) -> bool:
    """Whether a record's method is not gradproj's engine (torch's AdamW, peers, LoRA)."""
    return method in METHODS and METHODS[method].external


def _ratio(value: float | None, reference: float | None, digits: int = 3) -> str:
    if value is None or not reference or not math.isfinite(value):
        return "n/a"
    return f"{value / reference:.{digits}f}"


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}" if value >= 2**24 else f"{value / 2**20:.2f}"


def _refresh(r: dict[str, Any]) -> str:
    method = METHODS.get(r["method"])
    if r.get("refreshes") is None or (method is not None and refresh_target(method) is None):
        return "n/a"
    return f"{r['refresh_seconds']:.2f} ({r['refreshes']})"


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: per method (its best run), validation perplexity, learning rates, optimizer state,
    peak memory, median step time and time in basis refreshes, each with its ratio to AdamW (to the
    first method's run when the records hold no AdamW; the header names it)."""
    rows = best_per_method(records)
    adamw = next((r for r in rows if r["method"] == "adamw"), rows[0])
    versus = "vs AdamW" if adamw["method"] == "adamw" else f"vs {adamw['method']}"
    lines = [
        f"| method | val ppl | {versus} | lr (matrices / rest) | state MiB | {versus} | peak memory MiB "
        f"| step ms | {versus} | refresh s (calls) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["diverged"], r["val_loss"])):
        step = r.get("step_seconds_median")
        name = f"{r['method']} (peer)" if is_peer(r["method"]) else r["method"]
        lines.append(
            f"| {name} | {r['val_ppl']:.2f} | {_ratio(r['val_ppl'], adamw['val_ppl'])} | "
            f"{r['lr_matrix']:g} / {r['lr_other']:g} | {_mib(r['state_bytes'])} | "
            f"{_ratio(r['state_bytes'], adamw['state_bytes'])} | {_mib(r.get('peak_memory_bytes'))} | "
            f"{'n/a' if step is None else f'{1000 * step:.1f}'} | "
            f"{_ratio(step, adamw.get('step_seconds_median'), 2)} | {_refresh(r)} |"
        )
    return "\n".join(lines)


def environment_line(records: list[dict[str, Any]]) -> str:
    """Hardware and versions of the records (the first record's; all runs of one command share them)."""
    versions = records[0].get("versions", {})
    device = versions.get("device") or records[0].get("device", "?")
    parts = [f"{name} {value}" for name, value in versions.items() if name != "device" and value != "missing"]
    return f"Device: {device}. Versions: {', '.join(parts)}."


def overhead_table(records: list[dict[str, Any]]) -> str:
    """Markdown of ``gradproj bench overhead`` records: mean step time without and with dynamics."""
    lines = [
        "| device | model | sampled every | step ms, off | step ms, on | overhead |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['config']['device']} | {r['config']['model']} | {r['every']} | "
            f"{1000 * r['step_seconds_mean_off']:.2f} | {1000 * r['step_seconds_mean_on']:.2f} | "
            f"{100 * r['overhead']:+.1f}% |"
        )
    return "\n".join(lines)
