"""Quality over several seeds: mean and spread per method, whether our best method's lead over the
best peer is larger than the seeds' spread (the only kind of "better" the benchmarks claim), and the
state-perplexity Pareto frontier.

Records are grouped by method and learning-rate pair; each method is shown at the pair with the best mean
(a multi-seed run uses one pair per method, from ``--lr-from``). The seed is each record's ``config.seed``.

Example:
    >>> def rec(method, seed, ppl):
    ...     return {"method": method, "val_ppl": ppl, "diverged": False, "lr_matrix": 0.01, "lr_other": 0.03,
    ...             "state_bytes": 2**20, "config": {"seed": seed}}
    >>> records = [rec("alice", s, p) for s, p in enumerate((90.0, 91.0, 92.0))]
    >>> records += [rec("galore-torch", s, p) for s, p in enumerate((100.0, 101.0, 99.0))]
    >>> print(verdict(records))  # doctest: +ELLIPSIS
    alice leads the best peer, galore-torch, by 9.0% of its mean perplexity (91.00 vs 100.00, 3 vs 3 seeds); ...
    >>> verdict(records).endswith("the gap (7.00 between the closest seeds) exceeds the spread of either method.")
    True
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from .tables import is_external, is_peer


def _by_method(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each method's records at its learning-rate pair with the best mean perplexity (diverged runs: inf)."""
    groups: dict[tuple[str, float, float], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["method"], r["lr_matrix"], r["lr_other"])].append(r)
    best: dict[str, list[dict[str, Any]]] = {}
    for (method, _, _), runs in groups.items():
        if method not in best or _mean(runs) < _mean(best[method]):
            best[method] = runs
    return best


def _ppls(runs: list[dict[str, Any]]) -> list[float]:
    return [float("inf") if r["diverged"] else r["val_ppl"] for r in runs]


def _mean(runs: list[dict[str, Any]]) -> float:
    return statistics.fmean(_ppls(runs))


def seeds_table(records: list[dict[str, Any]]) -> str:
    """Markdown: per method, its seeds, mean and range of held-out perplexity, the mean's ratio to the
    best peer's, optimizer state, and the median step time with its ratio to AdamW's (same run)."""
    methods = _by_method(records)
    peers = [runs for name, runs in methods.items() if is_peer(name)]
    best_peer = min((_mean(runs) for runs in peers), default=None)
    adamw = methods.get("adamw")
    adamw_step = statistics.median(r["step_seconds_median"] for r in adamw) if adamw else None
    lines = [
        "| method | seeds | val ppl, mean | min - max | vs best peer | lr (matrices / rest) | state MiB | step ms "
        "| vs AdamW |",
        "|---|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    for name, runs in sorted(methods.items(), key=lambda item: _mean(item[1])):
        ppls, first = _ppls(runs), runs[0]
        steps = [r["step_seconds_median"] for r in runs if r.get("step_seconds_median") is not None]
        step = statistics.median(steps) if steps else None
        label = f"{name} (peer)" if is_peer(name) else name
        lines.append(
            f"| {label} | {len(runs)} | {statistics.fmean(ppls):.2f} | {min(ppls):.2f} - {max(ppls):.2f} | "
            f"{'n/a' if best_peer is None else f'{statistics.fmean(ppls) / best_peer:.3f}'} | "
            f"{first['lr_matrix']:g} / {first['lr_other']:g} | {first['state_bytes'] / 2**20:.2f} | "
            f"{'n/a' if step is None else f'{1000 * step:.1f}'} | "
            f"{'n/a' if step is None or not adamw_step else f'{step / adamw_step:.2f}'} |"
        )
    return "\n".join(lines)


def verdict(records: list[dict[str, Any]]) -> str:
    """One sentence: our best method against the best peer, and whether the gap exceeds the seeds' spread."""
    methods = _by_method(records)
    ours = {n: r for n, r in methods.items() if not is_external(n)}
    peers = {n: r for n, r in methods.items() if is_peer(n)}
    if not ours or not peers:
        return "no comparison: the records need one of our methods and one peer"
    best, peer = min(ours, key=lambda n: _mean(ours[n])), min(peers, key=lambda n: _mean(peers[n]))
    a, b = _ppls(ours[best]), _ppls(peers[peer])
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    lead = 100 * (1 - mean_a / mean_b)
    counts = f"{mean_a:.2f} vs {mean_b:.2f}, {len(a)} vs {len(b)} seeds"
    if mean_a < mean_b:
        head = f"{best} leads the best peer, {peer}, by {lead:.1f}% of its mean perplexity ({counts})"
        gap = min(b) - max(a)
    else:
        head = f"the best peer, {peer}, leads {best} by {-lead:.1f}% of our mean perplexity ({counts})"
        gap = min(a) - max(b)
    if len(a) < 2 or len(b) < 2:
        return f"{head}; one seed each: no claim either way."
    if gap > 0:
        return f"{head}; the gap ({gap:.2f} between the closest seeds) exceeds the spread of either method."
    return f"{head}; the seeds overlap, so neither is better at this budget."


def _dominated(a: tuple[float, float], others: list[tuple[float, float]]) -> bool:
    """Whether some other (state, perplexity) point is no worse in both and better in one."""
    return any(s <= a[0] and p <= a[1] and (s, p) != a for s, p in others)


def pareto_table(records: list[dict[str, Any]]) -> str:
    """Markdown, by optimizer state: each method at its best rates, its mean perplexity over seeds, and whether
    it is on the state-perplexity Pareto frontier (no other method has both less state and lower mean
    perplexity). A method whose range overlaps a dominating one's is marked so: the frontier there is within
    the seeds' spread.

    >>> def rec(method, seed, ppl, mib):
    ...     return {"method": method, "val_ppl": ppl, "diverged": False, "lr_matrix": 0.01, "lr_other": 0.03,
    ...             "state_bytes": mib * 2**20, "config": {"seed": seed}}
    >>> records = [rec("adamw", s, 100.0 + s, 40) for s in range(2)] + [rec("alice", s, 105.0, 24) for s in range(2)]
    >>> records += [rec("racs", s, 104.0 + 9 * s, 30) for s in range(2)]
    >>> print(pareto_table(records).splitlines()[3])   # more state than Alice and worse: dominated, within spread
    | racs | 2 | 30.00 | 108.50 | 104.00 - 113.00 | no (alice; overlapping seeds) |
    """
    methods = _by_method(records)
    points = {name: (runs[0]["state_bytes"] / 2**20, _mean(runs)) for name, runs in methods.items()}
    lines = [
        "| method | seeds | state MiB | val ppl, mean | min - max | on the frontier |",
        "|---|---:|---:|---:|---|---|",
    ]
    for name, (state, ppl) in sorted(points.items(), key=lambda item: item[1]):
        runs = methods[name]
        ppls = _ppls(runs)
        others = {n: p for n, p in points.items() if n != name}
        over = [n for n, p in others.items() if _dominated((state, ppl), [p])]
        if not over:
            frontier = "yes"
        else:
            best = min(over, key=lambda n: points[n][1])
            overlap = min(ppls) <= max(_ppls(methods[best]))
            frontier = f"no ({best}{'; overlapping seeds' if overlap else ''})"
        label = f"{name} (peer)" if is_peer(name) else name
        lines.append(
            f"| {label} | {len(runs)} | {state:.2f} | {ppl:.2f} | {min(ppls):.2f} - {max(ppls):.2f} | {frontier} |"
        )
    return "\n".join(lines)
