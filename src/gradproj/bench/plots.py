"""Figures of a side-by-side benchmark (matplotlib, no display needed): loss curves, perplexity
against optimizer memory (the Pareto picture) and step time relative to AdamW.

Example:
    >>> import tempfile
    >>> records = [{"method": "adamw", "val_loss": 4.0, "val_ppl": 54.6, "diverged": False,
    ...             "state_bytes": 2e6, "losses": [5.0, 4.5, 4.2], "step_seconds_median": 0.1}]
    >>> sorted(p.name for p in write_plots(records, Path(tempfile.mkdtemp())))
    ['loss_curves.png', 'pareto.png', 'step_time.png']
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .tables import best_per_method, is_external, is_peer


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display); a one-line error if missing."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("gradproj: figures need matplotlib: pip install 'gradproj[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far).

    >>> smooth([1.0, 3.0, 5.0], 2)
    [1.0, 2.0, 4.0]
    """
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both memory and perplexity, sorted by memory.

    >>> pareto_front([(1, 5), (2, 3), (3, 4), (4, 1)])
    [(1, 5), (2, 3), (4, 1)]
    """
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def _style(method: str) -> dict[str, Any]:
    return {"linestyle": "--" if is_peer(method) else "-", "linewidth": 1.2}


def write_plots(records: list[dict[str, Any]], out: Path, title: str = "") -> list[Path]:
    """Write ``loss_curves.png``, ``pareto.png`` and ``step_time.png`` for the best run of each method."""
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in best_per_method(records) if not r["diverged"]]
    paths = [out / "loss_curves.png", out / "pareto.png", out / "step_time.png"]

    colours = {r["method"]: plt.cm.tab20(i % 20) for i, r in enumerate(rows)}  # 19 methods: 10 colours repeat
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        losses = r.get("losses") or []
        if losses:
            ax.plot(
                range(1, len(losses) + 1),
                smooth(losses, 20),
                label=r["method"],
                color=colours[r["method"]],
                **_style(r["method"]),
            )
    ax.set(xlabel="step", ylabel="training loss (20-step mean)", title=f"Loss curves {title}".strip())
    finals = [v for r in rows for v in (r.get("losses") or [])[-50:]]
    if finals:
        ax.set_ylim(min(finals) - 0.3, max(finals) + 1.5)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    points = [(r["state_bytes"] / 2**20, r["val_ppl"]) for r in rows if math.isfinite(r["val_ppl"])]
    for r in rows:
        marker = "s" if is_external(r["method"]) else "o"
        ax.scatter(r["state_bytes"] / 2**20, r["val_ppl"], marker=marker, color=colours[r["method"]])
        ax.annotate(
            r["method"], (r["state_bytes"] / 2**20, r["val_ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    front = pareto_front(points)
    ax.plot([x for x, _ in front], [y for _, y in front], color="grey", linewidth=0.8, label="Pareto front")
    ax.set(xlabel="optimizer state (MiB)", ylabel="validation perplexity", title=f"Quality vs memory {title}".strip())
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
    adamw = next((r for r in rows if r["method"] == "adamw"), None)
    timed = [r for r in rows if r.get("step_seconds_median")]
    if adamw is not None and adamw.get("step_seconds_median"):
        timed.sort(key=lambda r: r["step_seconds_median"])
        ratios = [r["step_seconds_median"] / adamw["step_seconds_median"] for r in timed]
        ax.barh([r["method"] for r in timed], ratios, color=["C1" if is_external(r["method"]) else "C0" for r in timed])
        ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set(xlabel="median step time / AdamW's", title=f"Step time {title}".strip())
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths
