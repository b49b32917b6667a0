"""The report's figures of each run's schedule: when every layer refreshed its basis, the rank it held,
when the gradient policy clipped entries and reset the moments (:mod:`gradproj.optim.spikes`) and, for a
``--welore`` run, the weight spectra it started from; with the helpers every report figure uses.

Example:
    >>> from types import SimpleNamespace
    >>> run = SimpleNamespace(name="a", layers=[], train=[{"step": 10, "spam_clipped": 4, "spam_resets": 0},
    ...                                               {"step": 20, "spam_clipped": 9, "spam_resets": 1}])
    >>> policy_events(run)
    ([10, 20], [4, 5], [20])
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bench.plots import pyplot

if TYPE_CHECKING:
    from .report import Run


def png_bytes(fig: Any) -> bytes:
    """A figure as PNG bytes (the figure is closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96)
    pyplot().close(fig)
    return buffer.getvalue()


def last_step(run: Any) -> int:
    """The step a run ended at (its summary's, else its config's length, else its last logged step)."""
    for value in (run.summary.get("steps"), run.config.get("steps")):
        if isinstance(value, int) and value > 0:
            return value
    return max((int(r["step"]) for r in run.train), default=1)


def span_steps(ax: Any, runs: list[Any]) -> None:
    """Every figure over steps spans the whole run, from step 0 to its last, whatever was sampled in it
    (a short run's single refresh is then a mark at its step, not a lone point in an axis of its own)."""
    last = max(last_step(run) for run in runs)
    ax.set_xlim(0, last + max(1, last // 50))


def short(layer: str) -> str:
    """A layer's name short enough for an axis label (``model.layers.3.mlp.up_proj.weight``: ``L3.mlp.up_proj``)."""
    return layer.removeprefix("model.").removesuffix(".weight").replace("layers.", "L").replace("self_attn.", "")


def layer_order(name: str) -> tuple[int, str]:
    """Sort key: the layer's first number (its depth), then its name."""
    parts = name.split(".")
    numbers = [int(p) for p in parts if p.isdigit()]
    return (numbers[0] if numbers else -1, name)


def refresh_steps(run: Run) -> dict[str, list[int]]:
    """Each projected layer's refresh steps, from the probe's rows (it records every refresh)."""
    steps: dict[str, list[int]] = {}
    for r in run.layers:
        if r.get("refresh"):
            steps.setdefault(r["layer"], []).append(int(r["step"]))
    return {layer: sorted(steps[layer]) for layer in sorted(steps, key=layer_order)}


def refresh_figure(run: Run) -> bytes | None:
    """One row per layer, a tick at each of its basis refreshes: a fixed gap is a grid, ``auto`` shows
    which layers went stale when."""
    steps = refresh_steps(run)
    if not steps:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.16 * len(steps) + 1.2)))
    for row, at in enumerate(steps.values()):
        ax.plot(at, [row] * len(at), "|", color="C0", ms=6)
    ax.set_yticks(range(len(steps)), [short(n) for n in steps], fontsize=6)
    ax.invert_yaxis()
    span_steps(ax, [run])
    total = sum(map(len, steps.values()))
    ax.set(xlabel="step", title=f"{run.name}: basis refreshes ({total} over {len(steps)} layers)")
    fig.tight_layout()
    return png_bytes(fig)


def rank_history(run: Run) -> dict[str, list[tuple[int, int]]]:
    """Each projected layer's ``(step, rank)`` at every refresh (``rank="auto"`` changes it there)."""
    history: dict[str, list[tuple[int, int]]] = {}
    for r in run.layers:
        if r.get("refresh") and r.get("rank"):
            history.setdefault(r["layer"], []).append((int(r["step"]), int(r["rank"])))
    return {layer: sorted(history[layer]) for layer in sorted(history, key=layer_order)}


def rank_figure(run: Run) -> bytes | None:
    """Each layer's rank over the run (a step line per layer), when ranks differ between layers or
    refreshes (``rank="auto"``); None for one fixed rank."""
    history = rank_history(run)
    if len({rank for at in history.values() for _, rank in at}) < 2:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    last = max(last_step(run), *(step + 1 for at in history.values() for step, _ in at))
    for i, (layer, at) in enumerate(history.items()):
        steps, ranks = [s for s, _ in at] + [last], [r for _, r in at] + [at[-1][1]]
        ax.step(steps, ranks, where="post", color=f"C{i % 10}", lw=1, alpha=0.8, label=short(layer))
    span_steps(ax, [run])
    ax.set(xlabel="step", ylabel="rank", title=f"{run.name}: rank per layer (set at each refresh)")
    if len(history) <= 12:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return png_bytes(fig)


def policy_events(run: Any) -> tuple[list[int], list[int], list[int]]:
    """From the train rows' running totals: the logged steps, the entries clipped since the previous logged
    step, and the logged steps by which the moments were reset (one per reset)."""
    rows = [r for r in run.train if isinstance(r.get("spam_clipped"), (int, float))]
    steps, clipped, resets = [], [], []
    last_clipped, last_resets = 0, 0
    for row in rows:
        steps.append(int(row["step"]))
        clipped.append(int(row["spam_clipped"]) - last_clipped)
        resets += [int(row["step"])] * (int(row["spam_resets"]) - last_resets)
        last_clipped, last_resets = int(row["spam_clipped"]), int(row["spam_resets"])
    return steps, clipped, sorted(set(resets))


def policy_figure(run: Run) -> bytes | None:
    """Entries Stable-SPAM clipped per logged interval (every policed tensor together), with a dashed line
    where it reset the moments; None for a run without a gradient policy."""
    steps, clipped, resets = policy_events(run)
    if not steps:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.plot(steps, clipped, "-", color="C3", lw=1)
    for at in resets:
        ax.axvline(at, color="C0", ls="--", lw=0.8)
    span_steps(ax, [run])
    ax.set(xlabel="step", ylabel="entries clipped per logged interval")
    ax.set_title(f"{run.name}: {sum(clipped)} entries clipped, {len(resets)} moment resets (dashed)", fontsize=10)
    fig.tight_layout()
    return png_bytes(fig)


def welore_manifest(run: Run) -> dict[str, Any] | None:
    """The ``welore.json`` of the compressed model a ``--welore`` run fine-tuned (None for any other run)."""
    if not run.config.get("welore"):
        return None
    from .train.export import model_folder
    from .welore import MANIFEST

    path = Path(model_folder(str(run.config["model"]))) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None  # type: ignore[no-any-return]


def spectra_figure(run: Run) -> bytes | None:
    """Each matrix's singular values (over its largest, against the share of its rank): the low-rank components
    a ``--welore`` run trained in red with a dot at the rank they keep, the dense ones in grey."""
    data = welore_manifest(run)
    if data is None:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    matrices = [m for _, m in sorted(data["matrices"].items(), key=lambda item: layer_order(item[0]))]
    for m in matrices:
        values = [v / m["singular_values"][0] for v in m["singular_values"]]
        share = [i / len(values) for i in range(len(values))]
        if m["low_rank"]:
            ax.plot(share, values, "-", color="C3", lw=0.8, alpha=0.7)
            ax.plot(share[m["rank"] - 1], values[m["rank"] - 1], "o", color="C3", ms=3)
        else:
            ax.plot(share, values, "--", color="0.6", lw=0.8, alpha=0.7)
    lrcs = sum(m["low_rank"] for m in matrices)
    ax.set(xlabel="direction / rank", ylabel="singular value / largest", yscale="log")
    ax.set_title(
        f"{run.name}: {lrcs} of {len(matrices)} matrices are low-rank components (red, dot: the rank kept; "
        f"{data['method']}, {data['matrix_parameters']['kept']:.2f} of the parameters)",
        fontsize=9,
    )
    fig.tight_layout()
    return png_bytes(fig)


#: the per-run figures of the refresh schedule: (file name, title, figure, note)
SCHEDULE_FIGURES: tuple[tuple[str, str, Callable[[Run], bytes | None], str], ...] = (
    (
        "refreshes",
        "Basis refreshes per layer",
        refresh_figure,
        "Each tick is one refresh of that layer's basis. With --update-proj-gap auto a layer refreshes "
        "when its basis keeps too little of its gradient (docs/ALGORITHMS.md).",
    ),
    (
        "ranks",
        "Rank per layer",
        rank_figure,
        "Each layer's rank, set at its refreshes: with --rank auto the budget goes where one more "
        "direction keeps the largest share of a gradient per byte (docs/ALGORITHMS.md).",
    ),
    (
        "gradient_policy",
        "Gradient policy",
        policy_figure,
        "--spike-policy stable_spam: entries above the running mean of each gradient's maxima are clipped "
        "onto it (red: how many per logged interval, over every tensor); dashed: the moments were reset.",
    ),
    (
        "spectra",
        "Weight spectra and low-rank components",
        spectra_figure,
        "--welore: each matrix's singular values as gradproj compress found them. WeLore keeps, in every matrix, "
        "the directions above one threshold of the normalised spectrum; a matrix whose factors are then smaller "
        "than itself is a low-rank component (red); those trained, with the norms, and the dense ones stayed frozen.",
    ),
)
