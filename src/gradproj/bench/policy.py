"""The gradient policy's learning-rate sweep (``--spike-policy stable_spam``): a method with and without
the policy at rates 2x apart upwards from its best, several seeds each, same data and initial weights:
where each diverges, and what each reaches at the best rate.

A run *diverged* when its held-out loss is not finite or its perplexity is above the unigram model's (it
learned less than the token frequencies). A policy variant is the registry's ``METHOD+stable_spam``.

Example:
    >>> def rec(method, lr, seed, ppl):
    ...     return {"method": method, "lr_matrix": lr, "val_ppl": ppl, "unigram_ppl": 500.0, "diverged": False,
    ...             "step_seconds_median": 0.1, "config": {"seed": seed}}
    >>> records = [rec("galore_adamw8bit", 0.01, s, 80.0 + s) for s in range(3)]
    >>> records += [rec("galore_adamw8bit", 0.04, s, 900.0) for s in range(3)]
    >>> records += [rec("galore_adamw8bit+stable_spam", lr, s, 81.0 + s) for lr in (0.01, 0.04) for s in range(3)]
    >>> print(policy_verdict(records))  # doctest: +ELLIPSIS
    galore_adamw8bit+stable_spam diverged at no rate of 2 where galore_adamw8bit diverged at 1 (0.04); ...
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from ..optim.registry import METHODS


def diverged(record: dict[str, Any]) -> bool:
    """Non-finite, or worse than the unigram model."""
    return bool(record["diverged"]) or record["val_ppl"] > record["unigram_ppl"]


def _runs(records: list[dict[str, Any]]) -> dict[str, dict[float, list[dict[str, Any]]]]:
    """method -> matrix rate -> its records (one per seed)."""
    out: dict[str, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        out[r["method"]][float(r["lr_matrix"])].append(r)
    return out


def _ppl(runs: list[dict[str, Any]]) -> tuple[float, float, float]:
    """Mean, min and max held-out perplexity over seeds (inf where any seed diverged)."""
    values = [float("inf") if diverged(r) else float(r["val_ppl"]) for r in runs]
    return statistics.fmean(values), min(values), max(values)


def policy_table(records: list[dict[str, Any]]) -> str:
    """Markdown: for every rate and method, its seeds, how many diverged, the perplexity's mean and range
    over seeds that did not, and the median step time."""
    lines = [
        "| matrix lr | method | seeds | diverged | val ppl, mean | min - max | step ms |",
        "|---:|---|---:|---:|---:|---|---:|",
    ]
    by_method = _runs(records)
    for lr in sorted({lr for rates in by_method.values() for lr in rates}):
        for method in sorted(by_method, key=lambda m: ("+" in m, m)):
            runs = by_method[method].get(lr)
            if not runs:
                continue
            fine = [float(r["val_ppl"]) for r in runs if not diverged(r)]
            mean = f"{statistics.fmean(fine):.2f}" if fine else "-"
            spread = f"{min(fine):.2f} - {max(fine):.2f}" if fine else "-"
            step = statistics.median(r["step_seconds_median"] for r in runs) * 1e3
            lines.append(
                f"| {lr:g} | {method} | {len(runs)} | {sum(map(diverged, runs))} | {mean} | {spread} | {step:.0f} |"
            )
    return "\n".join(lines)


def policy_verdict(records: list[dict[str, Any]]) -> str:
    """For each policy variant and the method it varies: the rates each diverged at, and at the method's best
    rate the mean perplexities against the seeds' spread (no worse: within the wider of the two ranges)."""
    by_method = _runs(records)
    lines = []
    for variant in sorted(m for m in by_method if m in METHODS and METHODS[m].variant_of in by_method):
        base = METHODS[variant].variant_of
        assert base is not None
        ours, theirs = by_method[variant], by_method[base]
        shared = sorted(set(ours) & set(theirs))
        bad_ours = [lr for lr in shared if any(map(diverged, ours[lr]))]
        bad_theirs = [lr for lr in shared if any(map(diverged, theirs[lr]))]
        where = ", ".join(f"{lr:g}" for lr in bad_theirs) or "none"
        at = f"at {len(bad_ours)} ({', '.join(f'{lr:g}' for lr in bad_ours)})" if bad_ours else "at no rate"
        text = f"{variant} diverged {at} of {len(shared)} where {base} diverged at {len(bad_theirs)} ({where}); "
        best = min(shared, key=lambda lr: _ppl(theirs[lr])[0])
        (a, a_low, a_high), (b, b_low, b_high) = _ppl(ours[best]), _ppl(theirs[best])
        width = max(a_high - a_low, b_high - b_low)
        judged = "no worse, within" if a - b <= width else "worse, beyond"
        judgement = f"{judged} the seeds' spread ({width:.2f})"
        if min(len(ours[best]), len(theirs[best])) < 2:  # no spread to hold the gap against
            judgement = "one seed: no spread to judge the gap by"
        text += (
            f"at {base}'s best rate {best:g}: {a:.2f} vs {b:.2f} ({100 * (a / b - 1):+.1f}% of the mean), {judgement}."
        )
        lines.append(text)
    return "\n".join(lines) or "no policy variant beside the method it varies"
