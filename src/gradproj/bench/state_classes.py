"""Quality at equal memory: for each state budget a user brings (GaLore's, Muon's, AdamW's), the best of our
methods and the best peer that fit in it, with the seeds' spread; and, peer by peer, whether our best at no
more state than that peer's beats it by a margin (3% of its mean perplexity) larger than the seeds' spread.

Peers here are every optimizer that is not gradproj's engine: torch's own (AdamW, Muon) and other packages'.
Each method is taken at its learning-rate pair with the best mean (as in :mod:`gradproj.bench.seeds`).

Example:
    >>> def rec(method, seed, ppl, mib):
    ...     return {"method": method, "val_ppl": ppl, "diverged": False, "lr_matrix": 0.01, "lr_other": 0.03,
    ...             "state_bytes": mib * 2**20, "config": {"seed": seed}}
    >>> records = [rec("adamw", s, 100.0 + s, 40) for s in range(3)]
    >>> records += [rec("muon", s, 95.0 + s, 28) for s in range(3)]
    >>> lead_verdict(records).split("; ")[1]
    "beyond the seeds' spread (gap 3.00): a 3% lead, shown."
    >>> lead_verdict(records[:1] + records[3:4]).split("; ")[1]      # one seed each: no claim
    'one seed: no spread to compare with: no 3% claim.'
    >>> state_class_table(records).splitlines()[2].split(" | ")[2:5]
    ['muon (28.00 MiB)', '96.00 (95.00 - 97.00)', 'adamw (40.00 MiB)']
"""

from __future__ import annotations

import statistics
from typing import Any

from .seeds import _by_method, _ppls
from .tables import is_external

#: the state budgets the table reads, each the state of one method a user would otherwise run
ANCHORS = (("GaLore's", "galore_adamw"), ("Muon's", "muon-torch"), ("AdamW's", "adamw"))
MARGIN = 0.03  #: the lead the claim asks for, as a fraction of the peer's mean perplexity

Point = tuple[str, float, list[float]]  # method, state MiB, perplexities over seeds


def _points(records: list[dict[str, Any]]) -> list[Point]:
    return [(name, runs[0]["state_bytes"] / 2**20, _ppls(runs)) for name, runs in _by_method(records).items()]


def _best(points: list[Point], budget: float, external: bool) -> Point | None:
    """The lowest mean perplexity among ours (or the peers') with at most ``budget`` MiB of state."""
    fits = [p for p in points if p[1] <= budget + 1e-9 and is_external(p[0]) == external]
    return min(fits, key=lambda p: statistics.fmean(p[2]), default=None)


def _cell(point: Point | None) -> str:
    if point is None:
        return "none | n/a"
    name, state, ppls = point
    return f"{name} ({state:.2f} MiB) | {statistics.fmean(ppls):.2f} ({min(ppls):.2f} - {max(ppls):.2f})"


def state_class_table(records: list[dict[str, Any]]) -> str:
    """Markdown: per anchor's state, the best of ours and the best peer within it, and ours against the peer."""
    points = _points(records)
    lines = [
        "| state budget | MiB | best of ours | val ppl, mean (range) | best peer | val ppl, mean (range) "
        "| ours vs peer |",
        "|---|---:|---|---:|---|---:|---:|",
    ]
    for label, anchor in ANCHORS:
        budget = next((state for name, state, _ in points if name == anchor), None)
        if budget is None:
            continue
        ours, peer = _best(points, budget, external=False), _best(points, budget, external=True)
        ratio = (
            "n/a" if ours is None or peer is None else f"{statistics.fmean(ours[2]) / statistics.fmean(peer[2]):.3f}"
        )
        lines.append(f"| {label} ({anchor}) | {budget:.2f} | {_cell(ours)} | {_cell(peer)} | {ratio} |")
    return "\n".join(lines)


def lead_verdict(records: list[dict[str, Any]]) -> str:
    """One line per peer: our best at no more state than the peer's, its lead, and whether it is a claim (at
    least :data:`MARGIN` and the closest seeds apart)."""
    points = _points(records)
    lines = []
    for name, state, ppls in sorted((p for p in points if is_external(p[0])), key=lambda p: p[1]):
        ours = _best(points, state, external=False)
        if ours is None:
            lines.append(f"{name} ({state:.2f} MiB): none of ours fits in its state.")
            continue
        mine, theirs = statistics.fmean(ours[2]), statistics.fmean(ppls)
        lead, gap = 1 - mine / theirs, min(ppls) - max(ours[2])
        spread = f"beyond the seeds' spread (gap {gap:.2f})" if gap > 0 else "within the seeds' spread"
        if len(ppls) < 2 or len(ours[2]) < 2:
            spread = "one seed: no spread to compare with"
        seeded = len(ppls) > 1 and len(ours[2]) > 1
        shown = "a 3% lead, shown" if lead >= MARGIN and gap > 0 and seeded else "no 3% claim"
        lines.append(
            f"{name} ({state:.2f} MiB): our best at no more state, {ours[0]} ({ours[1]:.2f} MiB), "
            f"{'leads' if lead >= 0 else 'trails'} by {abs(100 * lead):.1f}% ({mine:.2f} vs {theirs:.2f}); "
            f"{spread}: {shown}."
        )
    return "\n".join(lines) if lines else "no comparison: the records hold no peer"
