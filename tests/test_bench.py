"""``gradproj bench``: peers side by side (a missing one reported, not fatal), the measurements each
record carries (step time, refresh time for ours and peers', peak memory in its own process), LoRA
at comparable state, tables, plots, and docs/BENCHMARKS.md in sync with its committed records."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gradproj.bench.methods import Method, get_method, lineup, missing
from gradproj.bench.quality import bench_config, prepare_data, run, run_isolated
from gradproj.bench.refresh import captured_benchmark
from gradproj.bench.tables import best_learning_rates, read_records, table
from gradproj.bench.timing import timed_refreshes
from gradproj.cli import main
from gradproj.optim.build import build_optimizer
from gradproj.optim.external import lora_rank
from gradproj.optim.groups import target_weights
from gradproj.train.pretrain import PretrainTask, next_token_loss

ROOT = Path(__file__).resolve().parents[1]
CFG = bench_config(model="llama-1m", steps=8, batch_size=4, seq_len=32, rank=8, gap=4, eval_windows=8)
MATRICES = 14  # llama-1m: 2 blocks x (q, k, v, o, gate, up, down)


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    return prepare_data(CFG)


def _method(name: str) -> Method:
    return get_method(name)


def test_record_carries_every_measurement(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    record = run(_method("galore_adamw"), 1e-2, 1e-2, data, CFG, tmp_path)
    assert record["refreshes"] == 2 * MATRICES and record["refresh_seconds"] > 0  # refreshes at steps 0 and 4
    assert 0 < record["step_seconds_median"] <= max(record["seconds"], 1e-9)
    assert record["burn_in"] == 4 and len(record["losses"]) == 8
    assert record["evals"][-1] == [8, record["val_loss"]] or record["evals"][-1] == (8, record["val_loss"])
    assert (
        record["memory_kind"] == "process_peak_rss" and record["peak_memory_bytes"] >= record["baseline_memory_bytes"]
    )
    assert record["config"]["seed"] == 0 and record["versions"]["torch"] == torch.__version__


def test_peer_refreshes_are_timed_and_the_wrapper_is_removed(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("galore_torch")
    from galore_torch.galore_projector import GaLoreProjector

    original = GaLoreProjector.get_orthogonal_matrix
    record = run(_method("galore-torch"), 1e-2, 1e-2, data, CFG, tmp_path)
    assert record["refreshes"] == 2 * MATRICES
    assert GaLoreProjector.get_orthogonal_matrix is original
    with timed_refreshes(None, "cpu") as clock:  # methods without a basis time nothing
        pass
    assert clock.calls == 0


def test_lora_trains_adapters_at_comparable_state(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("peft")
    lora = replace(CFG, optim=replace(CFG.optim, name="lora-peft", lr=1e-2, other_lr=1e-2))
    model = PretrainTask(lora, data).build_model()
    base = list(target_weights(model).values())  # the very Parameters peft wraps as base_layer.weight
    before = [p.detach().clone() for p in base]
    optimizer = build_optimizer(model, lora.optimizer_spec())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and not any(n.endswith("base_layer.weight") for n in trainable)
    assert "model.embed_tokens.weight" in trainable
    assert len(optimizer.param_groups[0]["params"]) == 2 * MATRICES  # A and B per targeted matrix
    adapters = [p.detach().clone() for p in optimizer.param_groups[0]["params"]]
    embedding = model.get_input_embeddings().weight.detach().clone()
    for step in range(3):  # train this very model, then look at its weights
        next_token_loss(model, data.train.batch(step * 4, 4, seed=0)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(torch.equal(p, b) for p, b in zip(base, before, strict=True))  # frozen: untouched by training
    assert not all(torch.equal(p, a) for p, a in zip(optimizer.param_groups[0]["params"], adapters, strict=True))
    assert not torch.equal(model.get_input_embeddings().weight, embedding)  # the rest trains in full
    record = run(_method("lora-peft"), 1e-2, 1e-2, data, CFG, tmp_path)
    galore = run(_method("galore_adamw"), 1e-2, 1e-2, data, CFG, tmp_path)
    assert 0.7 < record["state_bytes"] / galore["state_bytes"] < 1.4  # "comparable trainable state"
    assert record["losses"][-1] < record["losses"][0]
    assert lora_rank(64) == 32 and lora_rank(1) == 1


@pytest.mark.parametrize("name", [m.name for m in lineup() if m.external])
def test_every_installed_peer_builds_and_steps_through_the_trainer(data, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    method = _method(name)
    if missing(method) is not None:
        pytest.skip(f"{name}: {missing(method)}")
    cfg = replace(CFG, steps=2, eval_tokens=2 * CFG.seq_len)
    record = run(method, 1e-3, 1e-3, data, cfg, tmp_path)
    assert not record["diverged"] and len(record["losses"]) == 2 and record["state_bytes"] > 0
    assert json.loads((Path(record["run_dir"]) / "summary.json").read_text())["steps"] == 2


def test_bitsandbytes_8bit_adamw_peer(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("bitsandbytes")
    adamw = run(_method("adamw"), 1e-3, 1e-2, data, CFG, tmp_path)
    eight = run(_method("adamw8bit-bnb"), 1e-3, 1e-2, data, CFG, tmp_path)
    assert eight["state_bytes"] < 0.45 * adamw["state_bytes"]  # 1 byte per moment + scales (small tensors stay fp32)
    assert abs(eight["losses"][-1] - adamw["losses"][-1]) < 0.5


def test_a_missing_peer_is_reported_and_skipped(data, monkeypatch, capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from gradproj.optim.registry import METHODS

    ghost = Method(name="ghost-peer", kind="peer", summary="a peer that is not installed", cls="no_such_peer_package:X")
    assert "no_such_peer_package does not import" in (missing(ghost) or "")
    monkeypatch.setitem(METHODS, "ghost-peer", ghost)
    out = tmp_path / "bench"
    args = ["bench", "quality", "--model", "llama-1m", "--steps", "3", "--batch-size", "2", "--seq-len", "16"]
    args += ["--rank", "4", "--lr-matrix", "1e-3", "--lr-other", "1e-2", "--no-isolate", "--out", str(out)]
    assert main([*args, "--methods", "ghost-peer,adamw"]) == 0
    printed = capsys.readouterr().out
    assert "skip ghost-peer: no_such_peer_package does not import" in printed
    assert [json.loads(line)["method"] for line in (out / "records.jsonl").read_text().splitlines()] == ["adamw"]


def _metrics(run_dir: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_bench_runs_are_pretrain_runs_that_report_draws(tmp_path: Path) -> None:
    shape = ["--model", "llama-1m", "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--rank", "8"]
    bench = ["bench", "quality", *shape, "--gap", "3", "--methods", "galore_adamw,adamw", "--dynamics-every", "2"]
    bench += ["--lr-matrix", "1e-2", "--lr-other", "3e-2", "--no-isolate", "--out", str(tmp_path / "bench")]
    assert main(bench) == 0
    records = {r["method"]: r for r in read_records([tmp_path / "bench"])}
    galore = Path(records["galore_adamw"]["run_dir"])
    assert galore.parent == tmp_path / "bench" and (galore / "summary.json").exists()
    # the same flags given to `gradproj pretrain` train the same run, loss for loss
    pretrain = ["pretrain", *shape, "--update-proj-gap", "3", "--lr", "1e-2", "--other-lr", "3e-2", "--autocast", "off"]
    pretrain += ["--eval-tokens", str(128 * 32), "--eval-every", "0", "--log-every", "1", "--dynamics-every", "2"]
    pretrain += ["--no-progress", "--no-tensorboard", "--out", str(tmp_path / "pretrain")]
    assert main(pretrain) == 0
    ours, theirs = _metrics(galore), _metrics(tmp_path / "pretrain")
    assert [r["loss"] for r in ours if r["kind"] == "train"] == [r["loss"] for r in theirs if r["kind"] == "train"]
    assert [r["loss"] for r in ours if r["kind"] == "eval"] == [r["loss"] for r in theirs if r["kind"] == "eval"]
    assert len([r for r in ours if r["kind"] == "train"]) == 6 and records["galore_adamw"]["losses"][0] > 0
    assert records["galore_adamw"]["dynamics_samples"] > MATRICES  # the probe ran inside the bench's run
    # gradproj report draws the bench's run folders, overlaid
    page = tmp_path / "report.html"
    adamw = records["adamw"]["run_dir"]
    assert main(["report", str(galore), adamw, "--out", str(page)]) == 0
    text = page.read_text()
    assert text.count("data:image/png;base64,") >= 3 and "adamw-lr0.01-0.03-seed0" in text


def test_isolated_runs_measure_their_own_peak_memory(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    record = run_isolated(_method("adamw"), 1e-3, 1e-2, data, CFG, tmp_path / "isolated")
    in_process = run(_method("adamw"), 1e-3, 1e-2, data, CFG, tmp_path)
    assert record["memory_isolated"] and record["losses"] == in_process["losses"]  # same run, another process
    assert 0 < record["peak_memory_bytes"] - record["baseline_memory_bytes"] < 2**30


def test_lr_from_runs_each_method_at_its_best_rates(data, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    sweep = [
        {"method": "adamw", "lr_matrix": 1e-3, "lr_other": 3e-2, "val_loss": 5.0, "diverged": False},
        {"method": "adamw", "lr_matrix": 3e-3, "lr_other": 1e-2, "val_loss": 4.0, "diverged": False},
        {"method": "adamw", "lr_matrix": 1e-1, "lr_other": 1e-1, "val_loss": float("inf"), "diverged": True},
    ]
    assert best_learning_rates(sweep) == {"adamw": (3e-3, 1e-2)}
    path = tmp_path / "sweep.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sweep))
    out = tmp_path / "bench"
    args = ["bench", "quality", "--model", "llama-1m", "--steps", "2", "--batch-size", "2", "--seq-len", "16"]
    args += ["--rank", "4", "--methods", "adamw", "--lr-from", str(path), "--no-isolate", "--out", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [(r["lr_matrix"], r["lr_other"]) for r in rows] == [(3e-3, 1e-2)]


def test_clip_reaches_every_run_and_a_bad_value_is_one_line(tmp_path: Path) -> None:
    args = ["bench", "quality", "--model", "llama-1m", "--steps", "3", "--batch-size", "2", "--seq-len", "16"]
    args += ["--rank", "4", "--methods", "adamw", "--lr-matrix", "1e-2", "--lr-other", "1e-2", "--no-isolate"]
    runs = {}
    for clip in ("1", "0"):
        assert main([*args, "--clip", clip, "--out", str(tmp_path / clip)]) == 0
        (runs[clip],) = read_records([tmp_path / clip])
    assert runs["1"]["config"]["clip"] == 1.0 and runs["0"]["config"]["clip"] == 0.0
    norms = [r["grad_norm"] for r in _metrics(Path(runs["0"]["run_dir"])) if r["kind"] == "train"]
    assert norms[0] > 1.0  # so the default clipped the first step and --clip 0 did not
    assert runs["1"]["losses"][0] == runs["0"]["losses"][0] and runs["1"]["losses"][1] != runs["0"]["losses"][1]
    with pytest.raises(SystemExit, match=r"clip=-1.0 is not valid; expected a number >= 0"):
        main([*args, "--clip", "-1", "--out", str(tmp_path / "bad")])


def test_table_and_plots_from_records(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    records = [
        {
            "method": "adamw",
            "val_loss": 4.0,
            "val_ppl": 54.6,
            "diverged": False,
            "lr_matrix": 1e-3,
            "lr_other": 1e-2,
            "state_bytes": 4 * 2**20,
            "step_seconds_median": 0.1,
            "peak_memory_bytes": 2**29,
            "losses": [6.0, 5.0, 4.0],
            "refreshes": 0,
            "refresh_seconds": 0.0,
        },
        {
            "method": "galore_adamw",
            "val_loss": 4.1,
            "val_ppl": 60.3,
            "diverged": False,
            "lr_matrix": 1e-2,
            "lr_other": 1e-2,
            "state_bytes": 2**21,
            "step_seconds_median": 0.12,
            "peak_memory_bytes": 2**28,
            "losses": [6.0, 5.1, 4.1],
            "refreshes": 42,
            "refresh_seconds": 1.5,
        },
    ]
    text = table(records)
    assert "| galore_adamw | 60.30 | 1.104 | 0.01 / 0.01 | 2.00 | 0.500 | 256.0 | 120.0 | 1.20 | 1.50 (42) |" in text
    assert "| adamw | 54.60 | 1.000 |" in text and "n/a |" in text  # AdamW has no refreshes
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["bench", "table", str(path), "--plots", str(tmp_path / "fig")]) == 0
    for name in ("loss_curves.png", "pareto.png", "step_time.png"):
        assert (tmp_path / "fig" / name).stat().st_size > 10_000
    with pytest.raises(SystemExit, match="does not exist"):
        main(["bench", "table", str(tmp_path / "missing.jsonl")])


def test_refresh_on_captured_gradients_orders_the_projectors() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = {f"g{i}": torch.randn(24, 8, generator=gen) @ torch.randn(8, 40, generator=gen) for i in range(2)}
    rows = {r["projector"]: r for r in captured_benchmark(grads, rank=8, repeats=1)}
    assert rows["svd"]["energy"] == pytest.approx(1.0, abs=1e-5)  # rank-8 gradients, rank-8 basis
    assert rows["rsvd"]["energy"] == pytest.approx(1.0, abs=1e-4)
    assert rows["random"]["energy"] < rows["svd"]["energy"]
    assert rows["svd"]["speedup_vs_svd"] == 1.0 and rows["svd"]["source"] == "captured (2 matrices)"


def test_dynamics_overhead_run_trains_identically() -> None:
    from gradproj.bench.overhead import overhead

    (row,) = overhead(CFG, every=2, repeats=1)
    assert row["loss_gap"] < 1e-4 and row["rows_per_run"] > MATRICES  # rounding apart: see overhead()
    assert row["step_seconds_mean_off"] > 0 and row["step_seconds_mean_on"] > 0


def test_speed_takes_steps_in_turn_and_ratios_to_adamw(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "speed", "--model", "llama-1m", "--steps", "6", "--batch-size", "4", "--seq-len", "32",
                 "--rank", "8", "--methods", "racs,galore_adamw", "--repeats", "2", "--out", str(tmp_path)]) == 0  # fmt: skip
    rows = {r["method"]: r for r in read_records([tmp_path])}
    assert list(rows) == ["adamw", "racs", "galore_adamw"]  # AdamW added first, the baseline of every ratio
    for round_ in range(2):  # each trainer in its own process; their timed steps began one of each in turn
        began = sorted((t, name) for name, r in rows.items() for t in r["step_started"][round_])
        order = [name for _, name in began]
        assert len(order) == 3 * 6 and all(len(set(order[i : i + 3])) == 3 for i in range(0, len(order), 3))
    assert rows["adamw"]["vs_adamw"] == 1.0 and all(len(r["step_seconds_rounds"]) == 2 for r in rows.values())
    assert rows["racs"]["vs_adamw"] == pytest.approx(
        rows["racs"]["step_seconds_median"] / rows["adamw"]["step_seconds_median"]
    )
    assert "| racs |" in capsys.readouterr().out


def test_round_robin_goes_on_without_a_finished_trainer() -> None:
    from gradproj.bench.speed import RoundRobin

    robin = RoundRobin(3)
    assert robin.turn == -1  # closed until every trainer is set up
    robin.open()
    assert robin.turn == 0
    robin.pass_on(0)
    robin.leave(1)  # its turn: passed to 2
    assert robin.turn == 2
    robin.pass_on(2)
    assert robin.turn == 0
    robin.leave(0)
    robin.leave(2)
    assert robin.turn in (0, 1, 2)  # everyone left: nobody waits


@pytest.mark.parametrize("document", ["BENCHMARKS.md", "SCALE.md"])
def test_benchmarks_doc_matches_its_committed_records(capsys, document: str) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "docs", str(ROOT / "docs" / document), "--check"]) == 0


def test_speed_times_activation_checkpointing_in_the_same_round_robin(tmp_path: Path) -> None:
    assert main(["bench", "speed", "--model", "llama-1m", "--steps", "4", "--batch-size", "4", "--seq-len", "32",
                 "--rank", "8", "--methods", "galore_adamw", "--checkpointing", "--out", str(tmp_path)]) == 0  # fmt: skip
    rows = {r["method"]: r for r in read_records([tmp_path])}
    assert list(rows) == ["adamw", "galore_adamw", "adamw+checkpointing", "galore_adamw+checkpointing"]
    ckpt = rows["galore_adamw+checkpointing"]
    assert ckpt["config"]["activation_checkpointing"] and not rows["galore_adamw"]["config"]["activation_checkpointing"]
    assert ckpt["vs_without_checkpointing"] == pytest.approx(
        ckpt["step_seconds_median"] / rows["galore_adamw"]["step_seconds_median"]
    )


def test_adaptive_table_compares_each_variant_with_the_best_fixed_gap_at_the_best_rates() -> None:
    from gradproj.bench.adaptive import adaptive_table, adaptive_verdict

    def rec(method: str, gap: int, lr: float, seed: int, ppl: float, options: dict | None = None) -> dict:
        return {"method": method, "val_ppl": ppl, "diverged": False, "refreshes": 10, "state_bytes": 2**20,
                "refresh_seconds": 0.5 if "auto" in method else 1.0 + seed, "lr_matrix": lr, "lr_other": 0.03, "options": options or {},
                "config": {"seed": seed, "optim": {"update_proj_gap": gap, "rank": 64}}}  # fmt: skip

    records = [rec("galore_adamw", 50, 1e-2, s, 80.0 + s) for s in range(3)]
    records.append(rec("galore_adamw", 50, 3e-3, 0, 80.5))  # a one-seed sweep point: not the 3-seed rates
    records += [rec("galore_adamw", 100, 1e-2, s, 82.0 + s) for s in range(3)]
    auto = {"update_proj_gap": "auto"}
    records += [rec("galore_adamw+auto", 50, 1e-2, s, 70.0 + s, auto) for s in range(3)]
    lines = adaptive_table(records).splitlines()
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in lines[2:]}
    assert len(lines) == 2 + 3  # one row per schedule, at its best rates (gap 50's 3e-3 run is not shown)
    assert "| 0.01 / 0.03 | 3 | 81.00 | 80.00 - 82.00 | 1.000 |" in rows[("galore_adamw", "50")]
    assert "| 0.877 | 10 | 0.50 | 1.00 |" in rows[("galore_adamw+auto", "auto")]  # 71 / 81; refreshes, s, MiB
    assert "| 10 | 2.00 | 1.00 |" in rows[("galore_adamw", "50")]  # the mean of 1, 2 and 3 seconds
    assert "best fixed gap (50): -12.3%" in adaptive_verdict(records)
    assert "10 vs 10 refreshes (0.50 vs 2.00 s)" in adaptive_verdict(records)
    assert "seed by seed -12.5%, -12.3%, -12.2% (seeds 0, 1, 2)" in adaptive_verdict(records)  # 70/80, 71/81, 72/82
    assert adaptive_verdict(records).endswith("the gap (8.00 between the closest seeds) exceeds the spread.")
