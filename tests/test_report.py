"""``gradproj report``: a self-contained HTML page from real run folders, overlaying runs, with clear
errors; and the page renders in headless Chromium (when it is installed: CI installs it)."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gradproj.cli import main
from gradproj.optim.build import OptimizerSpec
from gradproj.report import load_run, render
from gradproj.report_schedule import rank_history, refresh_steps
from gradproj.train import PretrainConfig, pretrain
from gradproj.train.cli import format_summary
from gradproj.train.text import prepare_pretrain_data

TINY = dict(model="llama-tiny", batch_size=4, seq_len=32, eval_tokens=2048, progress=False, tensorboard=False)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    data = prepare_pretrain_data(None, None, 4096, 32)
    root = tmp_path_factory.mktemp("runs")
    common = dict(**TINY, steps=12, dynamics_every=2, eval_every=6, log_every=2)
    galore, fira = (OptimizerSpec(name=name, update_proj_gap=4) for name in ("galore_adamw", "fira_adamw"))
    pretrain(PretrainConfig(**common, optim=galore, out=str(root / "galore")), data=data)
    pretrain(PretrainConfig(**common, optim=fira, out=str(root / "fira")), data=data)
    return root / "galore", root / "fira"


def _images(page: str) -> list[str]:
    return re.findall(r'<img alt="figure" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)


def test_report_of_one_run_is_self_contained(runs: tuple[Path, Path]) -> None:
    page = render([load_run(runs[0])])
    # loss, heatmap, refreshes, energy, drift, stable rank, update size, spikes (no Fira scaling for GaLore)
    assert len(_images(page)) == 8
    assert "Fira/APOLLO scaling" not in page and "Subspace drift" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing to fetch: opens offline
    assert "galore_adamw" in page


def test_report_overlays_runs_from_the_cli(runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "compare.html"
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    page = out.read_text()
    assert "galore (galore_adamw)" in page and "fira (fira_adamw)" in page
    assert len(_images(page)) == 11  # two heatmaps, two refresh rasters, and Fira's scaling factors
    assert main(["report", str(runs[0])]) == 0
    assert (runs[0] / "report.html").exists()


def test_a_folder_that_is_not_a_run_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="is not a run folder"):
        main(["report", str(tmp_path)])


def test_a_run_without_dynamics_still_reports_loss_and_norms(runs: tuple[Path, Path], tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(runs[0] / "metrics.jsonl", bare / "metrics.jsonl")
    page = render([load_run(bare)])
    assert "No per-layer samples" in page and len(_images(page)) == 2  # loss and gradient norms


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (CI installs Debian's chromium)")
def test_report_renders_in_headless_chromium(runs: tuple[Path, Path], tmp_path: Path) -> None:
    from PIL import Image

    page, shot = tmp_path / "report.html", tmp_path / "shot.png"
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(page)]) == 0
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    flags += [f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,4000", f"--screenshot={shot}"]
    subprocess.run([CHROMIUM, *flags, page.as_uri()], capture_output=True, timeout=120, check=True)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1000, 4000)
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 500  # plots, not a blank or broken page
    # the heatmap's colour map reached the screen: viridis' yellow end (253, 231, 37) and dark end
    assert any(r > 200 and g > 200 and b < 90 for _, (r, g, b) in colours)
    assert any(r < 80 and 20 < g < 120 and b > 90 for _, (r, g, b) in colours)


def test_an_adaptive_run_shows_each_layers_refreshes(tmp_path: Path) -> None:
    """``--update-proj-gap auto``: the report's raster holds every refresh the optimizer counted, at the
    steps the signal chose (not a grid), and the summary prints the count against a fixed gap."""
    data = prepare_pretrain_data(None, None, 4096, 32)
    spec = OptimizerSpec(name="galore_adamw", update_proj_gap="auto", min_gap=2, max_gap=8, check_every=2)
    config = PretrainConfig(**TINY, steps=16, dynamics_every=4, log_every=2, optim=spec, out=str(tmp_path / "auto"))
    result = pretrain(config, data=data)
    counted = result.summary["basis_refreshes"]
    run = load_run(tmp_path / "auto")
    steps = refresh_steps(run)
    assert sum(map(len, steps.values())) == counted["refreshes"] and len(steps) == counted["matrices"]
    gaps = {b - a for at in steps.values() for a, b in itertools.pairwise(at)}
    assert gaps and min(gaps) >= 2 and max(gaps) <= 8
    assert "Basis refreshes per layer" in render([run])
    printed = format_summary({**result.summary, "seconds": 1.0}, config)
    assert f"refreshes   {counted['refreshes']} over {counted['matrices']} matrices" in printed
    assert f"a fixed gap of 200: {counted['matrices']}" in printed  # 16 steps: one refresh each at gap 200


def test_an_auto_rank_run_shows_each_layers_rank_and_its_state_against_the_budget(tmp_path: Path) -> None:
    """``--rank auto``: the report draws each layer's rank at its refreshes (the ranks the optimizer holds
    at the end are the last ones drawn), and the summary prints the state against the budget and a fixed rank."""
    data = prepare_pretrain_data(None, None, 4096, 32)
    spec = OptimizerSpec(name="galore_adamw", rank="auto", state_budget="0.5x@8", update_proj_gap=4)
    config = PretrainConfig(**TINY, steps=9, dynamics_every=4, log_every=2, optim=spec, out=str(tmp_path / "ranks"))
    result = pretrain(config, data=data)
    ranks = result.summary["allocated_ranks"]
    assert ranks["state_bytes"] <= ranks["state_budget"] == ranks["fixed_state_bytes"] // 2
    assert ranks["reference_rank"] == 8 and ranks["min"] < ranks["max"]
    run = load_run(tmp_path / "ranks")
    history = rank_history(run)
    assert len(history) == ranks["matrices"] and all(len(at) == 3 for at in history.values())  # steps 0, 4, 8
    final = sorted(at[-1][1] for at in history.values())
    assert (final[0], final[-1], sum(final) / len(final)) == (ranks["min"], ranks["max"], ranks["mean"])
    assert "Rank per layer" in render([run])
    printed = format_summary({**result.summary, "seconds": 1.0}, config)
    assert f"ranks       {ranks['min']}-{ranks['max']} (mean {ranks['mean']:.1f}) over {ranks['matrices']}" in printed
    assert "fixed rank 8:" in printed
