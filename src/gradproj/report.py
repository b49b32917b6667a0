"""``gradproj report RUN_DIR [RUN_B ...]``: one self-contained HTML page of a run's training
dynamics (figures are embedded PNGs; no server, no script, no network), overlaying several runs.

It reads what the trainer writes into a run folder: ``metrics.jsonl`` (loss, evaluations),
``dynamics.jsonl`` (per-layer samples and gradient-norm spikes, see :mod:`gradproj.dynamics`),
``config.json`` and ``summary.json``. A folder without ``dynamics.jsonl`` (``--dynamics-every 0``
or a peer's run) still gets its loss and gradient-norm figures.

Example:
    >>> import json, tempfile
    >>> run = Path(tempfile.mkdtemp())
    >>> rows = [{"kind": "train", "step": s, "loss": 6.0 - s / 10} for s in range(1, 11)]
    >>> _ = (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
    >>> page = render([load_run(run)])
    >>> page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    True
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bench.plots import pyplot
from .report_schedule import SCHEDULE_FIGURES, layer_order, png_bytes, short, span_steps
from .train.config import upgrade

QUANTITIES = {
    "energy": "captured energy ‖PᵀG‖²/‖G‖²",
    "overlap": "basis overlap with the previous basis",
    "stable_rank": "gradient stable rank ‖G‖²_F/σ₁²",
    "update_ratio": "update-to-weight norm ratio",
    "scale_mean": "Fira/APOLLO/Alice scaling factor φ (mean)",
    "residual_norm": "residual (compensation) norm after the limiter",
}


@dataclass
class Run:
    """What a run folder holds, read once."""

    path: Path
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    norms: list[dict[str, Any]] = field(default_factory=list)
    spikes: list[dict[str, Any]] = field(default_factory=list)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(path: Path) -> Run:
    """Read a run folder; a folder without ``metrics.jsonl`` is a one-line error."""
    path = Path(path)
    if not (path / "metrics.jsonl").exists():
        raise SystemExit(f"gradproj: {path} is not a run folder (no metrics.jsonl); pass a folder written by pretrain")
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else {}
    metrics, dynamics = _jsonl(path / "metrics.jsonl"), _jsonl(path / "dynamics.jsonl")
    optimizer = _optimizer(config).get("name")
    label = f"{path.name} ({optimizer})" if optimizer else path.name
    return Run(
        path=path,
        name=label,
        config=config,
        summary=summary,
        train=[r for r in metrics if r["kind"] == "train"],
        evals=[r for r in metrics if r["kind"] == "eval"],
        layers=[r for r in dynamics if r["kind"] == "layer"],
        norms=[r for r in dynamics if r["kind"] == "grad_norm"],
        spikes=[r for r in dynamics if r["kind"] == "spike"],
    )


def _img(png: bytes) -> str:
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


#: a series with fewer samples than this is drawn with a mark at each one
SPARSE = 20


def per_step(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps and the mean, min and max over layers of ``key`` at each step where it was sampled.

    >>> per_step([{"step": 1, "x": 1.0}, {"step": 1, "x": 3.0}, {"step": 2, "x": 2.0}], "x")
    ([1, 2], [2.0, 2.0], [1.0, 2.0], [3.0, 2.0])
    """
    by_step: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            by_step[row["step"]].append(float(value))
    steps = sorted(by_step)
    return (
        steps,
        [sum(by_step[s]) / len(by_step[s]) for s in steps],
        [min(by_step[s]) for s in steps],
        [max(by_step[s]) for s in steps],
    )


def loss_figure(runs: list[Run]) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, run in enumerate(runs):
        rows = [r for r in run.train if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=f"C{i}", label=f"{run.name} train")
        evals = [r for r in run.evals if "loss" in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o--", color=f"C{i}", label="held-out")
    span_steps(ax, runs)
    ax.set(xlabel="step", ylabel="loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def heatmap_figure(run: Run, key: str = "energy") -> bytes | None:
    """Layers (rows) x sampled steps (columns) of ``key``; white where a layer was not sampled."""
    plt = pyplot()
    layers = sorted({r["layer"] for r in run.layers if key in r}, key=layer_order)
    steps = sorted({r["step"] for r in run.layers if key in r})
    if not layers:
        return None
    grid = [[math.nan] * len(steps) for _ in layers]
    row_of, col_of = {name: i for i, name in enumerate(layers)}, {s: j for j, s in enumerate(steps)}
    for r in run.layers:
        if key in r:
            grid[row_of[r["layer"]]][col_of[r["step"]]] = r[key]
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.16 * len(layers) + 1.2)))
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_yticks(range(len(layers)), [short(n) for n in layers], fontsize=6)
    ticks = list(range(0, len(steps), max(1, len(steps) // 10)))
    ax.set_xticks(ticks, [str(steps[j]) for j in ticks], fontsize=7)
    ax.set(xlabel="step", title=f"{run.name}: {QUANTITIES[key]}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return png_bytes(fig)


def band_figure(runs: list[Run], key: str, *, refresh_only: bool = False, log: bool = False) -> bytes | None:
    """Mean over layers (line) and min-max (band) of ``key`` against step, one colour per run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    drawn = False
    for i, run in enumerate(runs):
        rows = [r for r in run.layers if r.get("refresh")] if refresh_only else run.layers
        steps, mean, low, high = per_step(rows, key)
        if not steps:
            continue
        drawn = True
        style = "o-" if refresh_only or len(steps) < SPARSE else "-"  # a few samples: each one visible
        ax.plot(steps, mean, style, ms=4, color=f"C{i}", label=f"{run.name} (mean over layers)")
        ax.fill_between(steps, low, high, color=f"C{i}", alpha=0.15)
        if key == "energy":
            s2, m2, _, _ = per_step(run.layers, "energy_before")
            if s2:
                ax.plot(s2, m2, "x", color=f"C{i}", label=f"{run.name}: old basis at refresh")
    if not drawn:
        plt.close(fig)
        return None
    if log:
        ax.set_yscale("log")
    span_steps(ax, runs)
    ax.set(xlabel="step", ylabel=QUANTITIES[key])
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def spike_figure(runs: list[Run]) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for i, run in enumerate(runs):
        norms = run.norms or [r for r in run.train if isinstance(r.get("grad_norm"), (int, float))]
        ax.plot([r["step"] for r in norms], [r["grad_norm"] for r in norms], color=f"C{i}", lw=0.8, label=run.name)
        means = [r for r in norms if r.get("running_mean") is not None]
        label = "running mean" if i == 0 else None
        ax.plot([r["step"] for r in means], [r["running_mean"] for r in means], ":", color=f"C{i}", label=label)
        spikes = [r for r in run.spikes if isinstance(r.get("grad_norm"), (int, float))]
        if spikes:
            x, y = [r["step"] for r in spikes], [r["grad_norm"] for r in spikes]
            ax.plot(x, y, "v", color="red", ms=7, label="spike" if i == 0 else None)
    span_steps(ax, runs)
    ax.set(xlabel="step", ylabel="global gradient norm")
    if any(len(line.get_xdata()) for line in ax.get_lines()):  # a log axis needs data
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def _optimizer(config: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's settings in a run's config.json (older runs' flat keys upgraded)."""
    return dict(upgrade(config).get("optim", {}))


def _summary_table(runs: list[Run]) -> str:
    head = "<tr><th>run</th><th>optimizer</th><th>rank / gap</th><th>steps</th><th>held-out loss</th>"
    head += "<th>optimizer state</th><th>refreshes</th><th>spikes</th><th>mean energy</th><th>mean overlap</th></tr>"
    body = []
    for run in runs:
        c, s = _optimizer(run.config), run.summary
        evals = run.evals[-1].get("loss") if run.evals else None
        state = s.get("optimizer_state_bytes")
        energies = [r["energy"] for r in run.layers if "energy" in r]
        overlaps = [r["overlap"] for r in run.layers if "overlap" in r]
        cells = [
            run.name,
            str(c.get("name") or "?"),
            "full rank"
            if "rank" in s and s["rank"] is None
            else f"{run.config.get('resolved_rank', c.get('rank', '?'))} / {c.get('update_proj_gap', '?')}",
            str(s.get("steps", run.train[-1]["step"] if run.train else "?")),
            f"{evals:.4f}" if isinstance(evals, float) else "?",
            f"{state / 2**20:.2f} MiB" if state else "?",
            str((s.get("basis_refreshes") or {}).get("refreshes", "n/a")),
            str(len(run.spikes)),
            f"{sum(energies) / len(energies):.3f}" if energies else "n/a",
            f"{sum(overlaps) / len(overlaps):.3f}" if overlaps else "n/a" if not energies else "none yet",
        ]
        body.append("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in cells) + "</tr>")
    return f"<table>{head}{''.join(body)}</table><p class=note>{html.escape(TABLE_NOTE)}</p>"


#: what the summary table's dynamics columns mean
TABLE_NOTE = (
    "Mean energy: the share of each sampled gradient its layer's basis kept, over every sample. Mean overlap: of "
    "each new basis with the one it replaced, so it needs a refresh after the first ('none yet': every layer still "
    "holds its first basis; a run of fewer steps than the gap). n/a: the run has no per-layer samples (a full-rank "
    "optimizer, or --dynamics-every 0)."
)


STYLE = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px}
h2{margin-top:1.6em;border-bottom:1px solid #ddd}p.note{color:#555;font-size:14px}img{max-width:100%}"""


def figures(runs: list[Run]) -> list[tuple[str, str, bytes | None, str]]:
    """Every section of the report: (file name, title, PNG or None, note)."""
    out: list[tuple[str, str, bytes | None, str]] = [
        ("loss", "Loss", loss_figure(runs), "Training loss at each logged step; circles are held-out evaluations.")
    ]
    for i, run in enumerate(runs):
        note = (
            "Share of each layer's gradient kept by its basis. Bright right after a refresh, darkening as the "
            "gradient turns away; a layer that stays dark is poorly served by low rank."
        )
        heatmap = heatmap_figure(run)
        if heatmap is None:
            note = "No per-layer samples (a full-rank optimizer, or --dynamics-every 0)."
        out.append((f"energy_heatmap_{i}", f"Captured energy per layer: {run.name}", heatmap, note))
        for name, title, figure, note in SCHEDULE_FIGURES:  # drawn only where the run has what they show
            png = figure(run)
            if png is not None:
                out.append((f"{name}_{i}", f"{title}: {run.name}", png, note))
    refreshed_again = any("energy_before" in r for run in runs for r in run.layers)
    optional = [
        (
            "energy",
            "Captured energy over time",
            band_figure(runs, "energy"),
            "The share of each layer's gradient its basis keeps: mean over layers, band from the lowest to the "
            "highest. "
            + (
                "×: what the old basis kept at a refresh, just before it was replaced."
                if refreshed_again
                else "Once a layer refreshes a second time, × marks what its old basis kept just before (none "
                "in this run yet)."
            ),
        ),
        (
            "drift",
            "Subspace drift",
            band_figure(runs, "overlap", refresh_only=True),
            "Overlap of each new basis with the previous one: near 1, the subspace is stable; low, the "
            "moments kept in old coordinates are stale.",
        ),
        (
            "stable_rank",
            "Gradient stable rank",
            band_figure(runs, "stable_rank", log=True),
            "How many directions carry the gradient (measured at refreshes, where the full gradient is decomposed).",
        ),
        ("update_ratio", "Update size", band_figure(runs, "update_ratio", log=True), "‖step‖/‖W‖ per layer."),
        ("scaling", "Fira/APOLLO scaling", band_figure(runs, "scale_mean", log=True), "The residual's scaling φ."),
    ]
    out += [section for section in optional if section[2] is not None]
    out.append(("spikes", "Gradient-norm spikes", spike_figure(runs), "A spike is a norm above 3× its running mean."))
    return out


def render(runs: list[Run]) -> str:
    """The report page for one run or an overlay of several."""
    body = f"<h2>Summary</h2>{_summary_table(runs)}"
    for _, title, png, note in figures(runs):
        image = _img(png) if png is not None else ""
        body += f"<h2>{html.escape(title)}</h2>{image}<p class=note>{html.escape(note)}</p>"
    title = "gradproj report: " + ", ".join(run.name for run in runs)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="HTML page of a run's loss and training dynamics (overlay several runs to compare)",
        description="Render one self-contained HTML page (open it in any browser, no server) from run folders "
        "written by gradproj pretrain/finetune: loss, per-layer captured-energy heatmap, subspace drift, "
        "stable rank, update size, Fira/APOLLO scaling and gradient-norm spikes. Several folders are overlaid.",
        epilog="example: gradproj report runs/galore runs/adamw --out compare.html",
    )
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="run folders (the first is the main one)")
    p.add_argument("--out", type=Path, default=None, help="HTML file (default RUN_DIR/report.html)")
    p.add_argument("--figures", type=Path, default=None, metavar="DIR", help="also write each figure as a PNG here")


def run(args: argparse.Namespace) -> int:
    runs = [load_run(path) for path in args.runs]
    out = args.out or args.runs[0] / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(runs))
    print(f"wrote {out}")
    if args.figures:
        args.figures.mkdir(parents=True, exist_ok=True)
        for name, _, png, _ in figures(runs):
            if png is not None:
                (args.figures / f"{name}.png").write_bytes(png)
        print(f"wrote figures to {args.figures}")
    return 0
