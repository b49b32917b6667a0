"""docs/BENCHMARKS.md's WeLore tables (``scripts/welore_bench.py``): held-out perplexity after compression by
WeLore's non-uniform ranks and by one rank fraction at the same size, and continued pre-training of the
compressed model with only its low-rank components trained against full fine-tuning.

Example:
    >>> rows = [{"kind": "compress", "method": m, "ratio": 0.5, "kept": 0.5, "low_rank": 30, "matrices": 36,
    ...          "ppl_before": 50.0, "ppl_after": p} for m, p in (("welore", 60.0), ("uniform", 75.0))]
    >>> print(compression_table(rows).splitlines()[2])
    | 0.5 | welore | 30 of 36 | 0.500 | 50.00 | 60.00 | 1.200 | -15.00 |
"""

from __future__ import annotations

import statistics
from typing import Any


def compression_table(records: list[dict[str, Any]]) -> str:
    """One row per (ratio, method): low-rank components, parameters kept, perplexity before and after; the
    last column is the perplexity after compression minus uniform truncation's at the same ratio."""
    rows = [
        "| ratio | ranks | low-rank components | matrix parameters kept | ppl before | ppl after | after / before "
        "| minus uniform's |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    compress = [r for r in records if r.get("kind") == "compress"]
    uniform = {r["ratio"]: r for r in compress if r["method"] == "uniform"}
    for r in sorted(compress, key=lambda r: (r["ratio"], r["method"] != "welore")):
        base = uniform.get(r["ratio"])
        versus = "-" if base is None else f"{r['ppl_after'] - base['ppl_after']:+.2f}"
        rows.append(
            f"| {r['ratio']} | {r['method']} | {r['low_rank']} of {r['matrices']} | {r['kept']:.3f} | "
            f"{r['ppl_before']:.2f} | {r['ppl_after']:.2f} | {r['ppl_after'] / r['ppl_before']:.3f} | {versus} |"
        )
    return "\n".join(rows)


#: what each fine-tuning mode of ``scripts/welore_bench.py`` trains, in the table's order
MODES = {
    "full": "every weight",
    "matrices": "matrices and norms (embeddings, head frozen)",
    "lrc": "low-rank components and norms (--welore)",
    "lrc-factors": "low-rank components alone (norms frozen too)",
}


def finetune_table(records: list[dict[str, Any]]) -> str:
    """One row per (mode, learning rate): seeds, held-out loss (mean, range), its ratio to full fine-tuning's best
    mean, the mean exact match (where the task scores one), trainable parameters and optimizer state (and its
    share of full fine-tuning's)."""
    runs = [r for r in records if r.get("kind") == "finetune"]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["mode"], r["lr"]), []).append(r)
    means = {key: statistics.mean(r["loss"] for r in group) for key, group in groups.items()}
    full = min((m for (mode, _), m in means.items() if mode == "full"), default=None)
    full_state = max((r["optimizer_state_bytes"] for r in runs if r["mode"] == "full"), default=None)
    rows = [
        "| trained | lr | seeds | held-out loss, mean | min - max | vs full (best) | exact match | trainable "
        "| optimizer state MiB | vs full |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for (mode, lr), group in sorted(groups.items(), key=lambda item: (list(MODES).index(item[0][0]), item[0][1])):
        losses = [r["loss"] for r in group]
        matches = [r["exact_match"] for r in group if r.get("exact_match") is not None]
        state = group[0]["optimizer_state_bytes"]
        rows.append(
            f"| {MODES[mode]} | {lr:g} | {len(group)} | "
            f"{statistics.mean(losses):.4f} | {min(losses):.4f} - {max(losses):.4f} | "
            f"{'-' if full is None else f'{statistics.mean(losses) / full:.4f}'} | "
            f"{f'{statistics.mean(matches):.3f}' if matches else '-'} | {group[0]['trainable']:,} | "
            f"{state / 2**20:.2f} | {'-' if not full_state else f'{state / full_state:.3f}'} |"
        )
    return "\n".join(rows)
