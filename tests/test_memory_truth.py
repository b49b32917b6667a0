"""The trainer proves the planner: every run records planned and measured bytes, and they agree
(5% for weights, gradients and state, 15% for activations) in fp32 and bf16, with and without
activation checkpointing and layer-wise; ``gradproj memory`` takes the trainer's flags; the
pre-flight check; bad input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from gradproj.memory import Setup, meta_model, plan_model
from gradproj.train import PretrainConfig, pretrain
from gradproj.train.memory_check import FIELDS, cheapest_fits, preflight

BOUNDS = {"weights": 0.05, "gradients": 0.05, "optimizer_state": 0.05, "activations": 0.15}


def _run(tmp_path: Path, **options: object) -> dict:  # type: ignore[type-arg]
    options = {"model": "llama-tiny", **options}
    config = PretrainConfig(
        steps=2,
        batch_size=4,
        progress=False,
        eval_every=0,
        eval_tokens=512,
        checkpoints=False,
        tensorboard=False,
        dynamics_every=0,
        out=str(tmp_path / "run"),
        **options,  # type: ignore[arg-type]
    )
    summary = pretrain(config).summary
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["memory"] == summary["memory"]
    return summary["memory"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("layerwise", [False, True])
def test_planned_and_measured_agree(tmp_path: Path, dtype: str, checkpointing: bool, layerwise: bool) -> None:
    memory = _run(tmp_path, dtype=dtype, activation_checkpointing=checkpointing, layerwise=layerwise)
    planned, measured = memory["planned"], memory["measured"]
    assert set(planned) == set(measured) == set(FIELDS)
    for key, bound in BOUNDS.items():
        assert abs(planned[key] / measured[key] - 1) <= bound, (key, planned[key], measured[key])
    assert abs(planned["peak"] / measured["peak"] - 1) <= 0.15


def test_bf16_halves_the_weights_and_checkpointing_cuts_activations(tmp_path: Path) -> None:
    fp32 = _run(tmp_path / "a", seq_len=64)["measured"]
    bf16 = _run(tmp_path / "b", seq_len=64, dtype="bf16")["measured"]
    assert bf16["weights"] * 2 == fp32["weights"]
    full = _run(tmp_path / "c", model="llama-1m", seq_len=64)["measured"]
    kept = _run(tmp_path / "d", model="llama-1m", seq_len=64, activation_checkpointing=True)["measured"]
    assert kept["activations"] < 0.75 * full["activations"]  # llama-20m at seq 256: benchmarks/memory.py, docs


def test_the_memory_command_takes_the_trainers_flags() -> None:
    from gradproj.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    memory, trainer = sub.choices["memory"], sub.choices["pretrain"]
    own = {"--world-size", "--fsdp", "--json", "-h", "--help"}
    planned = {s for a in memory._actions for s in a.option_strings} - own
    assert planned <= {s for a in trainer._actions for s in a.option_strings}
    for flag in ("--dtype", "--bf16-update", "--activation-checkpointing", "--layerwise", "--batch-size", "--rank"):
        assert flag in planned


def test_the_trainer_records_what_gradproj_memory_plans(tmp_path: Path) -> None:
    memory = _run(tmp_path, dtype="bf16", bf16_update="kahan", layerwise=True)
    config = PretrainConfig(model="llama-tiny", batch_size=4, dtype="bf16", bf16_update="kahan", layerwise=True)
    setup = Setup.from_config(
        config, vocab_size=json.loads((tmp_path / "run" / "config.json").read_text())["task"]["vocab_size"]
    )
    plan = plan_model(meta_model(setup), setup)
    assert memory["planned"]["optimizer_state"] == plan.optimizer  # the kahan buffer included
    assert memory["planned"]["weights"] == plan.weights and memory["planned"]["peak"] == plan.peak


def test_preflight_refuses_a_run_that_does_not_fit_and_names_the_cheapest_flags() -> None:
    config = PretrainConfig(model="llama-1b", vocab_size=32000, seq_len=256, batch_size=4, dtype="bf16")
    setup = Setup.from_config(PretrainConfig.from_dict({**config.to_dict(), "optim": {"name": "adamw"}}))
    needed = plan_model(meta_model(setup), setup).peak  # ~16 GiB: fp32 moments of 1.3B weights
    preflight(setup, needed, free=needed)  # fits exactly: no error
    with pytest.raises(
        ValueError,
        match=r"needs 15\.94 GiB at its peak but the device has 12\.00 GiB free; it fits "
        r"with --optimizer adamw8bit \(8\.50 GiB\)",
    ):
        preflight(setup, needed, free=12 * 2**30)
    assert cheapest_fits(setup, 8 * 2**30) == "--layerwise --optimizer adamw8bit (7.54 GiB)"  # one flag is not enough
    assert cheapest_fits(setup, 2**30) is None  # 1 GiB: nothing fits


def test_bad_dtype_flags_name_the_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gradproj.cli import main

    base = ["pretrain", "--model", "llama-tiny", "--steps", "2", "--no-progress", "--out", str(tmp_path / "run")]
    assert main([*base, "--bf16-update", "kahan"]) == 2
    assert "--bf16-update kahan needs --dtype bf16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--dtype", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
    assert main([*base, "--eval-tokens", "512", "--no-tensorboard", "--dynamics-every", "0"]) == 0
    capsys.readouterr()
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert main(["pretrain", "--resume", str(tmp_path / "run"), "--dtype", "bf16", "--steps", "3"]) == 2
    assert "dtype: 'fp32' -> 'bf16'" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_finetuning_checkpoints_activations_and_records_its_memory(tmp_path: Path) -> None:
    from gradproj.train import FinetuneConfig
    from gradproj.train.finetune import finetune

    runs = {}
    for checkpointing in (False, True):
        config = FinetuneConfig(
            steps=2,
            batch_size=8,
            max_length=64,
            eval_examples=16,
            eval_every=0,
            checkpoints=False,
            progress=False,
            tensorboard=False,
            dynamics_every=0,
            activation_checkpointing=checkpointing,
            out=str(tmp_path / str(checkpointing)),
        )
        result = finetune(config)
        assert result.model.is_gradient_checkpointing is checkpointing  # type: ignore[union-attr]
        runs[checkpointing] = result.summary["memory"]
    planned, measured = runs[True]["planned"], runs[True]["measured"]
    assert planned["activations"] is None  # encoders' activations are not modelled; the rest is
    assert abs(planned["optimizer_state"] / measured["optimizer_state"] - 1) <= 0.05
    assert measured["activations"] < runs[False]["measured"]["activations"]
