"""The trainer end to end on real text with llama-tiny: learning, determinism, exact resume,
faults (NaN steps, signals, kill -9 during a save, corrupt checkpoints), logs and evaluation."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradproj.optim.build import OptimizerSpec
from gradproj.options import flatten
from gradproj.train import CheckpointError, NonFiniteError, PretrainConfig, latest_checkpoint, pretrain
from gradproj.train.checkpoint import list_checkpoints, load_checkpoint
from gradproj.train.pretrain import PretrainTask
from gradproj.train.text import prepare_pretrain_data

TINY = dict(model="llama-tiny", batch_size=4, seq_len=32, eval_tokens=2048, progress=False, tensorboard=False)


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    return prepare_pretrain_data(None, None, 4096, 32)


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors")


def test_pretrain_learns_and_logs(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = PretrainConfig(**{**TINY, "tensorboard": True}, steps=40, eval_every=20, log_every=5, out=str(tmp_path))
    result = pretrain(cfg, data=data)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert sum(result.losses[-5:]) < sum(result.losses[:5]) - 5 * 0.5
    assert result.final_eval["ppl"] < data.unigram_ppl
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [20, 40]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(5, 41, 5))
    assert (tmp_path / "train.csv").read_text().startswith("step,loss,lr,grad_norm,skipped_steps,tokens_per_s")
    assert json.loads((tmp_path / "config.json").read_text())["resolved_rank"] == 16  # hidden 64 / 4
    assert json.loads((tmp_path / "environment.json").read_text())["torch"] == torch.__version__
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["tokens_seen"] == 40 * 4 * 32


def test_same_seed_same_losses_other_seed_differs(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    runs = [
        pretrain(PretrainConfig(**TINY, steps=6, seed=seed, out=str(tmp_path / f"{i}")), data=data).losses
        for i, seed in enumerate((3, 3, 4))
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize(
    "options",
    [
        {"optim": {"name": "galore_adamw"}},
        {"optim": {"name": "fira_adamw", "projector": "rsvd", "on_refresh": "rotate"}},
        {"optim": {"name": "apollo_mini"}},
        {"optim": {"name": "adamw8bit"}},
        {"optim": {"name": "adamw"}, "grad_accum": 2},
        {"optim": {"name": "galore_adamw"}, "layerwise": True, "grad_accum": 2},
        {"optim": {"name": "adamw"}, "layerwise": True},
        {"optim": {"name": "galore_adamw"}, "dtype": "bf16"},  # stochastic rounding: its bits from (seed, step)
        {"optim": {"name": "adamw"}, "dtype": "bf16", "bf16_update": "kahan"},  # the buffer in the checkpoint
        {"optim": {"name": "galore_adamw8bit", "spike_policy": "stable_spam", "spam_reset_gap": 4}},  # its statistics
    ],
    ids=lambda o: "-".join(str(v) for v in flatten(o).values()),
)
def test_resume_ends_bit_identical_to_the_uninterrupted_run(data, tmp_path: Path, options) -> None:  # type: ignore[no-untyped-def]
    optim = {"update_proj_gap": 5, **options["optim"]}
    cfg = PretrainConfig.from_dict({**TINY, "steps": 12, "save_every": 7, "keep": 5, **options, "optim": optim})
    full = pretrain(replace(cfg, out=str(tmp_path / "full")), data=data)
    # the "stopped" run: only its checkpoint at step 7 survives
    shutil.copytree(tmp_path / "full/checkpoints/step-00000007", tmp_path / "part/checkpoints/step-00000007")
    resumed = pretrain(replace(cfg, out=str(tmp_path / "part")), resume=tmp_path / "part", data=data)
    assert resumed.losses == full.losses[7:]
    a, b = _weights(tmp_path / "full", 12), _weights(tmp_path / "part", 12)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # logs read as one run: no duplicate steps after the resume
    steps = [json.loads(line)["step"] for line in (tmp_path / "part/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)


@pytest.mark.parametrize(("optimizer", "rank"), [("apollo_mini", 1), ("galore_adamw", 8), ("adamw", None)])
def test_the_rank_the_optimizer_uses_is_the_rank_every_record_names(data, tmp_path: Path, optimizer, rank) -> None:  # type: ignore[no-untyped-def]
    """APOLLO-Mini is rank 1 whatever --rank says; config.json, summary.json and the optimizer agree."""
    result = pretrain(
        PretrainConfig(**TINY, steps=2, optim=OptimizerSpec(name=optimizer, rank=8), out=str(tmp_path)), data=data
    )
    assert json.loads((tmp_path / "config.json").read_text())["resolved_rank"] == rank
    assert json.loads((tmp_path / "summary.json").read_text())["rank"] == rank == result.summary["rank"]
    optimizer_state = torch.load(tmp_path / "checkpoints/step-00000002/optimizer.pt", weights_only=True)
    assert optimizer_state["param_groups"][0].get("rank") == rank


@pytest.mark.parametrize("optimizer", ["galore_adamw", "adamw", "fira_adamw"])
def test_layerwise_run_matches_the_standard_run(data, tmp_path: Path, optimizer: str) -> None:  # type: ignore[no-untyped-def]
    """Without clipping the maths is the same: identical losses and weights. With clipping the
    layer-wise run clips by the previous step's norm, so it differs, and logs a real norm."""
    cfg = PretrainConfig(
        **TINY, steps=8, clip=0.0, grad_accum=2, optim=OptimizerSpec(name=optimizer, update_proj_gap=3)
    )
    standard = pretrain(replace(cfg, out=str(tmp_path / "std")), data=data)
    layerwise = pretrain(replace(cfg, layerwise=True, out=str(tmp_path / "lw")), data=data)
    assert layerwise.losses == pytest.approx(standard.losses, rel=1e-5)
    a, b = _weights(tmp_path / "std", 8), _weights(tmp_path / "lw", 8)
    # float32 rounding of low-rank sums, grown by the refresh at step 6 (an SVD turns near-degenerate
    # directions with the rounding) and by Adam on rare embedding rows: up to 5e-4 on some hosts' LAPACK
    # and thread counts; a step taken wrongly (a micro-batch lost, a step twice) moves weights by ~lr = 1e-2
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=2e-3) for k in a)
    clipped = pretrain(replace(cfg, clip=0.5, layerwise=True, log_every=1, out=str(tmp_path / "clip")), data=data)
    norms = [json.loads(line)["grad_norm"] for line in (tmp_path / "clip/metrics.jsonl").read_text().splitlines()[:8]]
    assert all(n > 0.5 for n in norms)  # clipping was active from step 2 on
    assert clipped.losses[0] == layerwise.losses[0] and clipped.losses[2] != layerwise.losses[2]


def test_resume_with_a_changed_model_is_refused(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = PretrainConfig(**TINY, steps=3, out=str(tmp_path))
    pretrain(cfg, data=data)
    with pytest.raises(CheckpointError, match=r"model: 'llama-tiny' -> 'llama-1m'"):
        pretrain(replace(cfg, model="llama-1m", steps=6), resume=tmp_path, data=data)
    pretrain(replace(cfg, steps=5), resume=tmp_path, data=data)  # more steps is allowed
    assert latest_checkpoint(tmp_path).name == "step-00000005"  # type: ignore[union-attr]


def test_nan_step_is_skipped_and_counted(data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    real_loss = PretrainTask.loss
    calls = {"n": 0}

    def loss(self, model, batch):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        value = real_loss(self, model, batch)
        return value * math.nan if calls["n"] == 3 else value

    monkeypatch.setattr(PretrainTask, "loss", loss)
    result = pretrain(PretrainConfig(**TINY, steps=5, out=str(tmp_path)), data=data)
    assert result.progress.skipped == 1 and math.isnan(result.losses[2])
    assert all(math.isfinite(x) for i, x in enumerate(result.losses) if i != 2)
    assert all(torch.isfinite(w).all() for w in _weights(tmp_path, 5).values())


def test_a_nonfinite_gradient_under_a_finite_loss_is_skipped_by_the_norm(  # type: ignore[no-untyped-def]
    data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the trainer builds its optimizer with nonfinite="checked" (step() reads no gradient to check it):
    # the clipped gradient norm is what must catch this step
    real_loss = PretrainTask.loss
    calls = {"n": 0}

    def loss(self, model, batch):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:  # one inf row in one gradient, in this backward only
            weight = model.model.layers[0].mlp.down_proj.weight

            def poison(grad: torch.Tensor) -> torch.Tensor:
                handle.remove()
                return grad.index_fill(0, torch.tensor([1]), math.inf)

            handle = weight.register_hook(poison)
        return real_loss(self, model, batch)

    monkeypatch.setattr(PretrainTask, "loss", loss)
    result = pretrain(PretrainConfig(**TINY, steps=5, out=str(tmp_path)), data=data)
    assert result.progress.skipped == 1 and math.isnan(result.losses[2])
    assert all(torch.isfinite(w).all() for w in _weights(tmp_path, 5).values())


def test_repeated_nan_stops_with_the_last_checkpoint_intact(
    data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    real_loss = PretrainTask.loss
    calls = {"n": 0}

    def loss(self, model, batch):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return real_loss(self, model, batch) * (math.inf if calls["n"] > 4 else 1.0)

    monkeypatch.setattr(PretrainTask, "loss", loss)
    with pytest.raises(NonFiniteError, match="3 consecutive non-finite steps"):
        pretrain(PretrainConfig(**TINY, steps=20, save_every=2, max_nonfinite=3, out=str(tmp_path)), data=data)
    last = latest_checkpoint(tmp_path)  # steps 5 and 6 were skipped, so step 6 holds step 4's good weights
    assert last is not None and last.name == "step-00000006"
    good, kept = _weights(tmp_path, 4), load_file(last / "model.safetensors")
    assert all(torch.equal(good[k], kept[k]) and torch.isfinite(kept[k]).all() for k in good)


def test_evaluation_is_the_token_weighted_next_token_loss(data) -> None:  # type: ignore[no-untyped-def]
    task = PretrainTask(
        PretrainConfig(**{**TINY, "eval_tokens": 32 * 40}, steps=1), data
    )  # 40 windows: 32 + 8 per chunk
    torch.manual_seed(0)
    model = task.build_model().eval()
    with torch.no_grad():
        ours = task.evaluate(model)["loss"]
        # transformers shifts labels itself; every window has the same 32 targets, so the token-weighted
        # mean is the mean of the per-window means
        theirs = torch.stack([model(w[None], labels=w[None]).loss for w in task.eval_windows]).mean()
    assert ours == pytest.approx(float(theirs), rel=1e-5)
    assert task.eval_windows.shape == (40, 33)


def test_corrupt_or_partial_checkpoints(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = PretrainConfig(**TINY, steps=4, save_every=2, out=str(tmp_path))
    pretrain(cfg, data=data)
    (tmp_path / "checkpoints/.step-00000006.tmp-123").mkdir()  # an interrupted save is not a checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000004"]
    last = latest_checkpoint(tmp_path)
    assert last is not None
    blob = (last / "model.safetensors").read_bytes()
    (last / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    task = PretrainTask(cfg, data)
    model = task.build_model()
    with pytest.raises(CheckpointError, match="model weights do not load"):
        load_checkpoint(last, model, torch.optim.AdamW(model.parameters()), None)


def _cli(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "gradproj.cli", "pretrain", *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(run: Path, process: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while latest_checkpoint(run) is None:
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


FLAGS = [
    "--model",
    "llama-tiny",
    "--batch-size",
    "4",
    "--seq-len",
    "32",
    "--eval-tokens",
    "2048",
    "--no-progress",
    "--no-tensorboard",
]


def test_sigterm_saves_and_the_resumed_run_matches(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from gradproj.cli import main

    run = tmp_path / "run"
    process = _cli([*FLAGS, "--steps", "300", "--save-every", "5", "--out", str(run)], tmp_path)
    _wait_for_checkpoint(run, process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, output
    assert f"--resume {run}" in output
    stopped = latest_checkpoint(run)
    assert stopped is not None and 5 <= int(stopped.name.split("-")[1]) < 300
    assert main(["pretrain", "--resume", str(run)]) == 0  # the saved settings, no flags repeated
    clean = pretrain(PretrainConfig(**TINY, steps=300, out=str(tmp_path / "clean")), data=data)
    assert clean.progress.step == 300
    a, b = _weights(tmp_path / "clean", 300), _weights(run, 300)
    assert all(torch.equal(a[k], b[k]) for k in a)


# A process that trains with a checkpoint every 2 steps and SIGKILLs itself inside the second save, after the
# weights of step 4 are written to the temporary folder and before its optimizer state is: a crash at the
# worst moment, every time (no sleeping and hoping).
KILL_INSIDE_SECOND_SAVE = """
import os, signal, sys
import torch
import gradproj.train.checkpoint as checkpoint
from gradproj.cli import main

real_save, saves = torch.save, []

def save(obj, path, *args, **kwargs):
    if str(path).endswith("optimizer.pt"):
        saves.append(path)
        if len(saves) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *args, **kwargs)

checkpoint.torch.save = save
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


def test_kill_9_inside_a_save_leaves_the_previous_checkpoint_loadable(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    args = [*FLAGS, "--steps", "6", "--save-every", "2", "--eval-every", "0", "--out", str(run)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-c", KILL_INSIDE_SECOND_SAVE, *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stdout[-2000:] + done.stderr[-2000:]
    interrupted = list((run / "checkpoints").glob(".step-00000004.tmp-*"))
    assert len(interrupted) == 1 and (interrupted[0] / "model.safetensors").is_file()  # the kill landed mid-save
    assert not (interrupted[0] / "optimizer.pt").exists()
    last = latest_checkpoint(run)
    assert last is not None and last.name == "step-00000002"  # the half-written step 4 is not a checkpoint
    cfg = PretrainConfig(**TINY, steps=6)
    model = PretrainTask(cfg, data).build_model()
    from gradproj.optim.build import build_optimizer

    state = load_checkpoint(last, model, build_optimizer(model, cfg.optimizer_spec(16)), None)
    assert state["step"] == 2
    resumed = pretrain(replace(cfg, save_every=2, eval_every=0, out=str(run)), resume=run, data=data)
    assert resumed.progress.step == 6 and latest_checkpoint(run).name == "step-00000006"  # type: ignore[union-attr]


def test_a_peer_trains_in_the_trainer_but_does_not_resume(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Every registry method runs through the one loop; a peer whose state is pickled objects is refused
    on --resume with a message that says why (the registry's `resumable`)."""
    pytest.importorskip("galore_torch")
    cfg = PretrainConfig(**TINY, steps=2, optim=OptimizerSpec(name="galore-torch", rank=8), out=str(tmp_path))
    result = pretrain(cfg, data=data)
    assert result.summary["rank"] == 8 and math.isfinite(result.losses[-1])
    with pytest.raises(CheckpointError, match=r"galore-torch .*cannot be resumed"):
        pretrain(replace(cfg, steps=4), resume=tmp_path, data=data)
