"""Adaptive refresh and rank against the fixed schedule: each method's fixed gaps and its ``+auto``
variants side by side, over seeds, with the refreshes (SVDs) and state each one used, and whether the
best adaptive variant beats the best fixed gap by more than the seeds' spread.

A record's schedule is its variant's own ``update_proj_gap`` and ``rank`` (``options``) or the run's
(``config.optim``). The best fixed gap is the one with the lowest mean over its seeds; a claim needs at
least two seeds on both sides.

Example:
    >>> def rec(method, gap, seed, ppl, refreshes, options=None):
    ...     return {"method": method, "val_ppl": ppl, "diverged": False, "refreshes": refreshes,
    ...             "state_bytes": 2**20, "options": options or {},
    ...             "config": {"seed": seed, "optim": {"update_proj_gap": gap, "rank": 64}}}
    >>> records = [rec("galore_adamw", 50, s, p, 336) for s, p in enumerate((78.0, 77.5, 78.4))]
    >>> records += [rec("galore_adamw+auto", 50, s, p, 330, {"update_proj_gap": "auto"})
    ...             for s, p in enumerate((75.0, 75.5, 74.9))]
    >>> print(adaptive_verdict(records))  # doctest: +ELLIPSIS
    galore_adamw+auto (gap auto, rank 64) against galore_adamw at its best fixed gap (50): -3.6% mean perplexity ...
    >>> adaptive_verdict(records).endswith("the gap (2.00 between the closest seeds) exceeds the spread.")
    True
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from ..optim.registry import get_method


def _schedule(r: dict[str, Any]) -> tuple[str, str]:
    """``(gap, rank)`` of a record, as text."""
    optim, options = r.get("config", {}).get("optim", {}), r.get("options") or {}
    gap, rank = options.get("update_proj_gap", optim.get("update_proj_gap")), options.get("rank", optim.get("rank"))
    return str(gap), str(rank)


def _base(method: str) -> str:
    try:
        return get_method(method).variant_of or method
    except ValueError:
        return method


def _rows(records: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], list[dict[str, Any]]]:
    """Records by (base method, method, gap, rank), each at its learning-rate pair with the most seeds
    (the rates a multi-seed run took from its sweep), then the best mean."""
    by_rates: dict[tuple[str, str, str, str], dict[tuple[float, float], list[dict[str, Any]]]] = defaultdict(dict)
    for r in records:
        rates = (r.get("lr_matrix", 0.0), r.get("lr_other", 0.0))
        by_rates[(_base(r["method"]), r["method"], *_schedule(r))].setdefault(rates, []).append(r)
    return {
        key: min(runs.values(), key=lambda x: (-len(x), statistics.fmean(_ppls(x)))) for key, runs in by_rates.items()
    }


def _ppls(runs: list[dict[str, Any]]) -> list[float]:
    return [float("inf") if r["diverged"] else float(r["val_ppl"]) for r in runs]


def _seconds(runs: list[dict[str, Any]]) -> str:
    """Mean seconds the runs spent refreshing (their SVDs), or n/a where a record did not time them."""
    seconds = [r.get("refresh_seconds") for r in runs]
    return "n/a" if None in seconds else f"{statistics.fmean(float(x) for x in seconds if x is not None):.2f}"


def _paired(adaptive: list[dict[str, Any]], fixed: list[dict[str, Any]]) -> str:
    """The change seed by seed (the same data order and initial weights on both sides), or "" if no seed
    is on both sides."""
    by_seed = {r.get("config", {}).get("seed"): r for r in fixed}
    pairs = [(r, by_seed[seed]) for r in adaptive if (seed := r.get("config", {}).get("seed")) in by_seed]
    if not pairs:
        return ""
    pairs.sort(key=lambda pair: pair[0]["config"]["seed"])
    changes = ", ".join(f"{100 * (_ppls([a])[0] / _ppls([f])[0] - 1):+.1f}%" for a, f in pairs)
    seeds = ", ".join(str(a["config"]["seed"]) for a, _ in pairs)
    return f"; seed by seed {changes} (seeds {seeds})"


def _fixed(key: tuple[str, str, str, str]) -> bool:
    return key[0] == key[1] and key[2] != "auto" and key[3] != "auto"


def adaptive_table(records: list[dict[str, Any]]) -> str:
    """Markdown: per method and schedule, its seeds, mean and range of held-out perplexity, the mean's
    ratio to the method's best fixed gap, the mean refreshes and seconds spent in them, and the optimizer state."""
    rows = _rows(records)
    best: dict[str, float] = {}
    for key, runs in rows.items():
        if _fixed(key):
            mean = statistics.fmean(_ppls(runs))
            best[key[0]] = min(best.get(key[0], mean), mean)
    lines = [
        "| method | gap | rank | lr (matrices / rest) | seeds | val ppl, mean | min - max | vs best fixed gap "
        "| refreshes | refresh s | state MiB |",
        "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for key, runs in sorted(rows.items(), key=lambda item: (item[0][0], statistics.fmean(_ppls(item[1])))):
        ppls = _ppls(runs)
        mean, reference = statistics.fmean(ppls), best.get(key[0])
        refreshes = statistics.fmean(r.get("refreshes") or 0 for r in runs)
        lines.append(
            f"| {key[1]} | {key[2]} | {key[3]} | {runs[0].get('lr_matrix', 0):g} / {runs[0].get('lr_other', 0):g} "
            f"| {len(runs)} | {mean:.2f} | {min(ppls):.2f} - {max(ppls):.2f} | "
            f"{'n/a' if reference is None else f'{mean / reference:.3f}'} | {refreshes:.0f} | {_seconds(runs)} | "
            f"{statistics.fmean(r['state_bytes'] for r in runs) / 2**20:.2f} |"
        )
    return "\n".join(lines)


def adaptive_verdict(records: list[dict[str, Any]]) -> str:
    """Per method: its best adaptive variant against its best fixed gap (mean perplexity, the gap between
    the closest seeds, refreshes and state)."""
    rows = _rows(records)
    sentences = []
    for base in dict.fromkeys(key[0] for key in rows):
        fixed = {k: v for k, v in rows.items() if k[0] == base and _fixed(k)}
        adaptive = {k: v for k, v in rows.items() if k[0] == base and not _fixed(k)}
        if not fixed or not adaptive:
            continue
        f_key = min(fixed, key=lambda k: statistics.fmean(_ppls(fixed[k])))
        a_key = min(adaptive, key=lambda k: statistics.fmean(_ppls(adaptive[k])))
        a, b = _ppls(adaptive[a_key]), _ppls(fixed[f_key])
        change = 100 * (statistics.fmean(a) / statistics.fmean(b) - 1)
        refreshes = [
            statistics.fmean(r.get("refreshes") or 0 for r in runs) for runs in (adaptive[a_key], fixed[f_key])
        ]
        state = [statistics.fmean(r["state_bytes"] for r in runs) / 2**20 for runs in (adaptive[a_key], fixed[f_key])]
        head = (
            f"{a_key[1]} (gap {a_key[2]}, rank {a_key[3]}) against {base} at its best fixed gap ({f_key[2]}): "
            f"{change:+.1f}% mean perplexity ({statistics.fmean(a):.2f} vs {statistics.fmean(b):.2f}, "
            f"{len(a)} vs {len(b)} seeds), {refreshes[0]:.0f} vs {refreshes[1]:.0f} refreshes "
            f"({_seconds(adaptive[a_key])} vs {_seconds(fixed[f_key])} s), "
            f"{state[0]:.2f} vs {state[1]:.2f} MiB of state{_paired(adaptive[a_key], fixed[f_key])}"
        )
        if len(a) < 2 or len(b) < 2:
            sentences.append(f"{head}; too few seeds for a claim.")
            continue
        gap = min(b) - max(a) if change < 0 else min(a) - max(b)
        if gap > 0:
            sentences.append(f"{head}; the gap ({gap:.2f} between the closest seeds) exceeds the spread.")
        else:
            sentences.append(f"{head}; the seeds overlap.")
    return "\n\n".join(sentences) or "no comparison: the records need a fixed gap and an adaptive variant"
