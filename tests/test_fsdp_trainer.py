"""``gradproj pretrain --fsdp`` under torchrun on CPU/gloo: every FSDP-capable method equals one
process on the same global batch with about 1/world of the state per rank; a run stopped by SIGTERM
on one rank resumes bit-exact on as many ranks and within 1e-6 on 1 and on 4 (DCP re-shards the
weights and the low-rank state); a NaN on one rank is skipped by all; a rank that raises stops every
rank with one message and leaves the last checkpoint whole; bad combinations are refused in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import fsdp_train_worker as worker
from gradproj.optim.registry import METHODS
from test_distributed import torchrun

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
WORKER = Path(__file__).with_name("fsdp_train_worker.py")


def _losses(run: Path) -> list[float]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if r["kind"] == "train"]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from gradproj.train.sharded_checkpoint import consolidated_weights

    return consolidated_weights(checkpoint)


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp-methods")
    torchrun(WORKER, "methods", str(out), timeout=400)
    return out


@pytest.mark.parametrize("run", [*worker.fsdp_methods(), *worker.FLAG_RUNS])
def test_fsdp_equals_one_process_on_the_same_global_batch(method_runs: Path, tmp_path: Path, run: str) -> None:
    from gradproj.cli import main

    single, (method, *options) = tmp_path / "single", worker.run_options(run)
    argv = [*worker.METHOD_RUN, "--optimizer", method, *options, "--batch-size", "8", "--out", str(single)]
    assert main(["pretrain", *argv]) == 0
    # bf16: two ranks' bf16 gradients, reduced in float32, are not one process's bf16 gradient of the batch
    tolerance = 2e-2 if "bf16" in options else 1e-5  # checkpointing recomputes the same forward: exact maths
    if METHODS[method].group_options.get("ns_dtype") == "bfloat16":  # the Muon family's iterations round to
        tolerance = 1e-3  # bf16 the momentum of a gradient reduced in another order: a last-bit change shows
    assert _losses(method_runs / run) == pytest.approx(_losses(single), rel=tolerance)
    sharded, whole = _summary(method_runs / run), _summary(single)
    assert sharded["global_batch"] == whole["global_batch"] == 8 and sharded["world_size"] == 2
    assert sharded["optimizer_state_bytes"] <= 0.55 * whole["optimizer_state_bytes"]  # this rank's shards
    assert sharded["weight_bytes"] <= 0.55 * whole["weight_bytes"]
    planned, measured = sharded["memory"]["planned"], sharded["memory"]["measured"]
    for key in ("weights", "gradients"):  # this rank's shards, and the root's gathered weights
        assert planned[key] == measured[key], key
    # per-tensor counters and one-per-row statistics differ by a few hundred bytes: within 0.5%
    assert planned["optimizer_state"] == pytest.approx(measured["optimizer_state"], rel=5e-3)
    assert planned["peak"] == pytest.approx(measured["peak"], rel=0.05)  # the gathered root included (3.5% off)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp-interrupt")
    torchrun(WORKER, "interrupt", str(out), timeout=400)
    return out


def _resume_copy(interrupted: Path, target: Path) -> Path:
    shutil.copytree(interrupted / "stopped" / "checkpoints", target / "checkpoints")
    return target


def test_sigterm_on_one_rank_saves_once_and_resumes_bit_exact_on_as_many_ranks(interrupted: Path) -> None:
    stopped = sorted(p.name for p in (interrupted / "stopped" / "checkpoints").iterdir())
    assert stopped == ["step-00000002", f"step-{worker.STOP_STEP:08d}"]  # saved once, at the step it stopped
    final = f"checkpoints/step-{6:08d}"
    straight, resumed = _weights(interrupted / "straight" / final), _weights(interrupted / "resumed" / final)
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name
    assert _losses(interrupted / "resumed")[-3:] == _losses(interrupted / "straight")[-3:]


@pytest.fixture(scope="module")
def on_one_process(interrupted: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2-rank run stopped at step 3, resumed as one plain process (a group of one: 2 shards into 1)."""
    from gradproj.cli import main

    run = _resume_copy(interrupted, tmp_path_factory.mktemp("fsdp-one") / "run")
    assert main(["pretrain", "--resume", str(run)]) == 0
    return run


@pytest.mark.parametrize(
    ("source", "world", "replicate"),
    [("2 ranks", 1, 1), ("1 process", 4, 1), ("2 ranks", 4, 2)],
    ids=["2-to-1", "1-to-4", "2-to-hsdp-2x2"],
)
def test_a_run_resumes_resharded_on_another_world_size(
    interrupted: Path, on_one_process: Path, tmp_path: Path, source: str, world: int, replicate: int
) -> None:
    run = on_one_process
    if world > 1:  # 4 shards of the one-process run's step 4, or HSDP (2 replicas of 2 shards) of the 2-rank step 3
        run = tmp_path / "run"
        if source == "1 process":
            step = on_one_process / "checkpoints" / f"step-{4:08d}"
            shutil.copytree(step, run / "checkpoints" / step.name)
        else:
            _resume_copy(interrupted, run)
        script = tmp_path / "launch.py"
        script.write_text(Path(__file__).with_name("launch_cli.py").read_text())
        hsdp = ["--fsdp-replicate", str(replicate)] if replicate > 1 else []
        torchrun(script, "pretrain", "--resume", str(run), *hsdp, nproc=world, timeout=300)
    summary = _summary(run)
    assert summary["world_size"] == world and summary["global_batch"] == 8  # the maths kept: 8 sequences per step
    straight = _weights(interrupted / "straight" / f"checkpoints/step-{6:08d}")
    resumed = _weights(run / f"checkpoints/step-{6:08d}")
    # float sums in another order (micro-batches, reduce-scatter), compounded over three steps: not bitwise, and
    # up to 2e-6 on some hosts' BLAS; a resume that lost a moment or a basis is off by a whole step (about 1e-3)
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-5)
    two_ranks = _summary(interrupted / "straight")
    if replicate > 1:  # each replica shards like the 2-rank run (its per-tensor counters aside)
        assert summary["optimizer_state_bytes"] == pytest.approx(two_ranks["optimizer_state_bytes"], rel=1e-3)
    elif world == 4:
        assert summary["optimizer_state_bytes"] <= 0.30 * 2 * two_ranks["optimizer_state_bytes"]
        assert summary["weight_bytes"] <= 0.30 * 2 * two_ranks["weight_bytes"]


def test_a_nan_on_one_rank_is_skipped_by_every_rank(interrupted: Path) -> None:
    run = interrupted / "nan"
    assert [json.loads((run / f"skipped-{r}.json").read_text()) for r in (0, 1)] == [1, 1]
    losses = _losses(run)
    assert losses[worker.NAN_STEP - 1] != losses[worker.NAN_STEP - 1]  # logged as NaN: not applied
    assert all(x == x for i, x in enumerate(losses) if i != worker.NAN_STEP - 1)  # the run went on, finite


def test_a_rank_that_raises_stops_every_rank_with_one_message(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    started = time.monotonic()
    result = subprocess.run(
        [*command, str(WORKER), "fault", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 180  # bounded: the peers do not wait for a collective forever
    err = result.stderr
    assert err.count(f"rank 1 failed: RuntimeError: injected fault on rank 1 at step {worker.FAULT_STEP}") == 1
    assert "rank 0 stopped: another rank failed" in err and "Connection closed by peer" not in err
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002", "step-00000004"]  # no temporary folder left, the last good one whole
    assert _weights(tmp_path / "run" / "checkpoints" / "step-00000004")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--layerwise"], "--layerwise with --fsdp: not supported yet"),
        (["--low-rank-comm"], "--low-rank-comm is DDP's"),
        (["--optimizer", "galore_adafactor"], "--fsdp with --optimizer galore_adafactor: it cannot step FSDP2"),
    ],
)
def test_fsdp_refuses_what_it_cannot_combine_with(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from gradproj.cli import main

    assert main(["pretrain", "--fsdp", "--steps", "1", *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_sharded_checkpoint_exports_to_one_hugging_face_folder(interrupted: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from gradproj.cli import main

    checkpoint = interrupted / "straight" / f"checkpoints/step-{6:08d}"
    assert main(["export", str(interrupted / "straight"), "--out", str(tmp_path / "hf")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for name, value in _weights(checkpoint).items():
        assert torch.equal(model.state_dict()[name], value), name
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2  # one line, no traceback


def test_eight_bit_moments_re_shard_from_two_ranks_to_one_process(interrupted: Path, tmp_path: Path) -> None:
    from gradproj.cli import main
    from gradproj.train.sharded_checkpoint import _safe_reader

    written = interrupted / "eight_bit" / "checkpoints"
    keys = _safe_reader(written / f"step-{4:08d}").read_metadata().state_dict_metadata
    assert any(key.endswith("exp_avg_absmax") for key in keys)  # the embeddings' moments did quantize
    run = tmp_path / "run"
    shutil.copytree(written / f"step-{4:08d}", run / "checkpoints" / f"step-{4:08d}")
    assert main(["pretrain", "--resume", str(run)]) == 0  # 2 writers' blocks dequantized, quantized again
    two_ranks, resumed = _weights(written / f"step-{6:08d}"), _weights(run / f"checkpoints/step-{6:08d}")
    for name, value in two_ranks.items():  # one more 8-bit rounding (measured 4.6e-4 over 2 steps; one process
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=2e-3)  # vs 2 ranks, no checkpoint: 7.1e-4)


def test_checkpoint_metadata_that_would_run_code_is_refused(tmp_path: Path) -> None:
    import os
    import pickle

    from gradproj.train.checkpoint import CheckpointError

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match=r"posix\.system is not a DCP metadata record"):
        _weights(tmp_path)
    assert not marker.exists()


def test_the_collective_counter_counts_what_each_rank_hands_over() -> None:
    from gradproj.bench.comm import counting_collectives
    from gradproj.distributed import join_single_process_group

    join_single_process_group()
    try:
        with counting_collectives() as sent:
            dist.all_reduce(torch.ones(10))  # 40 bytes
            dist.all_gather([torch.empty(3, dtype=torch.float64)], torch.ones(3, dtype=torch.float64))  # 24
            dist.gather(torch.ones(2), [torch.empty(2)], dst=0)  # to this rank: its own rows stay here
            dist.broadcast(torch.ones(3), src=0)  # 12, sent by this rank (receivers count nothing)
        dist.all_reduce(torch.ones(5))  # after the block: not counted, the functions restored
        assert (sent["all_reduce"], sent["all_gather"], sent["gather"], sent["broadcast"]) == (40, 24, 0, 12)
    finally:
        dist.destroy_process_group()
