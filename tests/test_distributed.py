"""DDP under torchrun on CPU with gloo and 2 processes: every case matches a single-process run on
the same global batch, no basis or weight drifts across ranks, and low-rank communication sends
less on every step between refreshes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import distributed_worker as worker
import fsdp_worker

WORKER = Path(__file__).with_name("distributed_worker.py")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(script.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    result = subprocess.run([*command, str(script), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ddp") / "results.pt"
    torchrun(WORKER, "--out", str(out))
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("case", sorted(worker.CASES))
def test_ddp_matches_the_single_process_run_and_ranks_agree(results: dict[str, Any], case: str) -> None:
    result = results[case]
    reference = worker.reference(case)
    for key, value in reference.items():
        torch.testing.assert_close(result["weights"][key], value, rtol=0, atol=1e-12)
    assert result["weight_diff"] == 0.0  # bit-identical weights on both ranks
    assert result["basis_diff"] == 0.0  # ... and bit-identical bases
    if (
        worker.CASES[case]["preset"] in ("galore", "alice", "gradnorm")
        and worker.CASES[case].get("projector") != "random"
    ):
        assert result["bases"] == 2  # both projected matrices hold a basis: the check compared something


def test_low_rank_communication_sends_less_between_refreshes(results: dict[str, Any]) -> None:
    for case in ("low_rank", "low_rank_rsvd", "layerwise_low_rank_accum"):
        steps = results[case]["comm"]
        assert len(steps) == worker.STEPS
        for step, (sent, full) in enumerate(steps):
            if step % worker.GAP == 0:  # refresh: the basis needs the full averaged gradient
                assert sent == full
            else:
                assert sent < 0.4 * full
    # Fira's residual needs G itself, so it never goes low rank; plain DDP sends exactly its gradients
    assert all(sent == full for sent, full in results["fira_low_rank"]["comm"])
    assert all(sent == full for sent, full in results["alice_low_rank"]["comm"])  # compensation needs G too
    assert all(sent == full for sent, full in results["gradnorm_low_rank"]["comm"])  # dL/dv reads G's rows
    assert all(sent == full for sent, full in results["plain"]["comm"])


TINY_RUN = ["--model", "llama-tiny", "--steps", "6", "--seq-len", "32", "--update-proj-gap", "3", "--log-every", "1"]
TINY_RUN += ["--eval-every", "3", "--save-every", "3", "--no-progress", "--no-tensorboard"]


def _train_rows(run: Path) -> list[dict[str, Any]]:
    import json

    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.parametrize(
    "options",
    [[], ["--layerwise", "--low-rank-comm", "--clip", "0"]],
    ids=["ddp", "ddp-layerwise-low-rank-comm"],  # bf16 across ranks: tests/test_fsdp_trainer.py
)
def test_pretrain_under_torchrun_matches_one_process_on_the_same_global_batch(
    tmp_path: Path, options: list[str]
) -> None:
    from gradproj.cli import main

    script = tmp_path / "launch.py"
    script.write_text(Path(__file__).with_name("launch_cli.py").read_text())
    ddp = tmp_path / "ddp"
    result = torchrun(script, "pretrain", *TINY_RUN, "--batch-size", "4", "--out", str(ddp), *options)
    assert result.stdout.count("final perplexity") == 1  # rank 0 prints the summary, once
    single = tmp_path / "single"
    clip = ["--clip", "0"] if "--clip" in options else []
    assert main(["pretrain", *TINY_RUN, "--batch-size", "8", "--out", str(single), *clip]) == 0
    ddp_rows, single_rows = _train_rows(ddp), _train_rows(single)
    assert [r["loss"] for r in ddp_rows] == pytest.approx([r["loss"] for r in single_rows], rel=1e-5)
    if "--low-rank-comm" in options:  # steps 2, 3, 5, 6 are between refreshes: less was sent
        assert all(r["comm_bytes"] < r["comm_bytes_plain_ddp"] for r in ddp_rows if (r["step"] - 1) % 3)
        assert all(r["comm_bytes"] == r["comm_bytes_plain_ddp"] for r in ddp_rows if (r["step"] - 1) % 3 == 0)
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    assert len(list(tmp_path.iterdir())) == 3  # launch.py, ddp, single: rank 1 wrote no folder of its own


FSDP_WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fsdp") / "fsdp.pt"
    torchrun(FSDP_WORKER, "--out", str(out), timeout=300)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("case", list(fsdp_worker.CASES))
def test_fsdp2_matches_one_process_with_sharded_state(fsdp_results: dict[str, Any], case: str) -> None:
    weights, single_state = fsdp_worker.reference(case)
    for key, value in weights.items():  # gathered from the shards after 7 steps, 3 refreshes
        torch.testing.assert_close(fsdp_results[case]["weights"][key], value, rtol=0, atol=1e-12)
    assert fsdp_results[case]["dtensor_state"]  # every state tensor is one logical DTensor (DCP-ready)
    assert fsdp_results[case]["quantized"] == bool(fsdp_worker.CASES[case].get("quantized"))  # 8-bit did quantize
    if fsdp_worker.CASES[case].get("state"):
        per_rank = fsdp_results[case]["state_bytes"]
        assert max(per_rank) <= 0.56 * single_state  # about 1/world: rows of W and of R, row/column-sharded bases


@pytest.mark.parametrize("projector", ["svd", "rsvd", "eigh", "dct"])
def test_fsdp2_spreads_each_refresh_over_the_ranks(fsdp_results: dict[str, Any], projector: str) -> None:
    # two projected matrices, refreshed at steps 0, 3 and 6: six refreshes, three computed on each rank
    assert fsdp_results[projector]["refreshes"] == [3, 3]
    assert fsdp_results[projector]["gradient_all_gathers"] == [0, 0]  # each gradient went to its owner alone
    assert fsdp_results["svd_unspread"]["refreshes"] == [6, 6]  # spread=False repeats each on every rank
    assert fsdp_results["svd_unspread"]["gradient_all_gathers"] == [6, 6]
    for key, value in fsdp_results["svd_unspread"]["weights"].items():  # and the bits are the same
        assert torch.equal(fsdp_results["svd"]["weights"][key], value)


def test_fsdp2_spreads_muons_orthogonalizations_over_the_ranks(fsdp_results: dict[str, Any]) -> None:
    # two matrices, 7 steps: the first step creates the state and gathers each matrix alone (one per rank); the
    # next 6 are computed ahead, one matrix on each rank at the same time: 7 iterations per rank either way
    spread, alone = fsdp_results["muon"], fsdp_results["muon_unspread"]
    assert spread["orthogonalizations"] == alone["orthogonalizations"] == [7, 7]
    assert spread["one_by_one"] == [2, 2] and alone["one_by_one"] == [14, 14]
    for key, value in alone["weights"].items():  # the same bits either way, and one process's (the case above)
        assert torch.equal(spread["weights"][key], value)


def test_fsdp2_seeded_bases_gather_no_gradient(fsdp_results: dict[str, Any]) -> None:
    assert fsdp_results["random"]["gradient_all_gathers"] == [0, 0]
    assert fsdp_results["random"]["refreshes"] == [6, 6]  # rebuilt from its seed on every rank: nothing to share


def test_fsdp2_refuses_a_rule_that_cannot_be_sharded(fsdp_results: dict[str, Any]) -> None:
    assert "factored statistics average over whole rows and columns" in fsdp_results["adafactor_error"]
