"""Training dynamics: each quantity equals its definition computed independently, sampling follows
the schedule, the probe never changes training, spikes are caught, and the trainer logs the rows
(JSONL, TensorBoard) and resumes them exactly."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import gradproj
from gradproj.dynamics import Dynamics
from gradproj.optim.build import OptimizerSpec
from gradproj.train import PretrainConfig, pretrain
from gradproj.train.text import prepare_pretrain_data

TINY = dict(model="llama-tiny", batch_size=4, seq_len=32, eval_tokens=2048, progress=False, tensorboard=False)
GAP5 = OptimizerSpec(update_proj_gap=5)


def _gradient(m: int, n: int, seed: int) -> torch.Tensor:
    """A gradient with a decaying spectrum (a clear top singular value, as real gradients have)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen, dtype=torch.float64)).Q
    return (u * torch.logspace(0, -3, min(m, n), dtype=torch.float64)) @ v.T


def _galore(w: torch.nn.Parameter, **group: object) -> torch.optim.Optimizer:
    return gradproj.GaLoreAdamW([{"params": [("w", w)], "rank": 4, "update_proj_gap": 3, **group}], lr=1e-2)


def test_each_quantity_equals_its_definition() -> None:
    w = torch.nn.Parameter(torch.randn(12, 20, dtype=torch.float64))
    opt = _galore(w)
    dynamics = Dynamics(opt, every=1)
    bases, grads, before = [], [], []
    for step in range(4):
        g = _gradient(12, 20, step)
        w.grad = g.clone()
        before.append(w.detach().clone())
        opt.step()
        grads.append(g)
        bases.append(opt.state[w]["basis_left"].clone())  # 12 x 20: the left (smaller) side is projected
    rows = [r for r in dynamics.drain() if r["kind"] == "layer"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["refresh"] for r in rows] == [True, False, False, True]
    basis = bases.__getitem__
    for i, row in enumerate(rows):
        q = basis(i)
        assert row["energy"] == pytest.approx(float((q.T @ grads[i]).norm() ** 2 / grads[i].norm() ** 2), rel=1e-9)
        if row["refresh"]:  # the stable rank is measured at refreshes
            sigma = torch.linalg.svdvals(grads[i])
            exact = float((sigma**2).sum() / sigma[0] ** 2)  # power iteration underestimates sigma_max, never over
            assert exact <= row["stable_rank"] <= 1.01 * exact
        else:
            assert "stable_rank" not in row
        moved = (w.detach() if i == 3 else before[i + 1]) - before[i]
        assert row["update_ratio"] == pytest.approx(float(moved.norm() / before[i].norm()), rel=1e-9)
        assert row["grad_norm"] == pytest.approx(float(grads[i].norm()), rel=1e-12)
    # the refresh at step 4: overlap of the new basis with the old, and the old basis' energy on G
    old, new = basis(2), basis(3)
    assert rows[3]["overlap"] == pytest.approx(float((old.T @ new).norm() ** 2 / 4), rel=1e-9)
    assert rows[3]["energy_before"] == pytest.approx(float((old.T @ grads[3]).norm() ** 2 / grads[3].norm() ** 2))
    assert rows[3]["energy"] > rows[3]["energy_before"]  # a fresh SVD basis keeps the most energy
    assert "overlap" not in rows[0]  # the first basis has no predecessor


@pytest.mark.parametrize(
    ("preset", "options", "one_factor"),
    [
        ("fira_adamw", {}, False),
        ("apollo_adamw", {}, False),
        ("apollo_adamw", {"scale_type": "tensor"}, True),
        ("alice", {}, False),
    ],
)
def test_fira_and_apollo_scaling_factors_are_logged(preset: str, options: dict, one_factor: bool) -> None:
    w = torch.nn.Parameter(torch.randn(12, 20, dtype=torch.float64))
    opt = gradproj.PRESETS[preset]([{"params": [w], "rank": 4, "update_proj_gap": 3, **options}], lr=1e-2)
    dynamics = Dynamics(opt, every=2)
    for step in range(3):
        w.grad = _gradient(12, 20, step)
        opt.step()
    rows = [r for r in dynamics.drain() if r["kind"] == "layer"]
    assert [r["step"] for r in rows] == [1, 3]
    for r in rows:
        assert 0 < r["scale_min"] <= r["scale_mean"] <= r["scale_max"]
        assert (r["scale_min"] == r["scale_max"]) is one_factor
    # the residual term's norm after the limiter (Alice: the compensation's) is the limiter's own record
    assert rows[-1]["residual_norm"] == pytest.approx(float(opt.state[w]["residual_norm"]), rel=1e-12)


def test_galore_rows_have_no_scaling_factor_and_sampling_follows_every() -> None:
    w = torch.nn.Parameter(torch.randn(8, 16))
    opt = _galore(w, update_proj_gap=4)
    dynamics = Dynamics(opt, every=3)
    for _ in range(10):
        w.grad = torch.randn(8, 16)
        opt.step()
    rows = [r for r in dynamics.drain() if r["kind"] == "layer"]
    # sampled at engine steps 0, 3, 6, 9 and at the refreshes 0, 4, 8
    assert [r["step"] for r in rows] == [1, 4, 5, 7, 9, 10]
    assert [r["step"] for r in rows if r["refresh"]] == [1, 5, 9]
    assert not any("scale_mean" in r for r in rows)
    assert dynamics.drain() == []


@pytest.mark.parametrize("foreach", [False, None])
def test_the_probe_changes_nothing_in_training(foreach: bool | None) -> None:
    """Same weights and optimizer state with and without it, and the global RNG is not touched. A sampled
    step takes the per-parameter step: on the fast path the weights then differ by its rounding only."""
    results = []
    for probe in (False, True):
        w = torch.nn.Parameter(torch.ones(10, 24))
        group = {"params": [("w", w)], "rank": 3, "update_proj_gap": 2, "projector": "rsvd"}
        opt = gradproj.FiraAdamW([group], foreach=foreach)
        dynamics = Dynamics(opt, every=1) if probe else None
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(5)
        for _ in range(5):
            w.grad = torch.randn(10, 24, generator=gen)
            opt.step()
        results.append((w.detach().clone(), torch.random.get_rng_state(), opt.state[w]["exp_avg"].clone()))
        if dynamics is not None:
            assert len(dynamics.drain()) == 5
            dynamics.detach()
            assert opt.probe is None  # type: ignore[attr-defined]
    (weight, rng, moment), (probed_weight, probed_rng, probed_moment) = results
    assert torch.equal(rng, probed_rng) and torch.equal(moment, probed_moment)
    if foreach is False:
        assert torch.equal(weight, probed_weight)
    else:
        torch.testing.assert_close(weight, probed_weight, rtol=1e-6, atol=1e-7)


def test_global_gradient_norm_spikes() -> None:
    dynamics = Dynamics(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), spike_factor=3.0, window=20)
    norms = [1.0] * 5 + [10.0] + [1.0] * 10 + [10.0, 2.5, float("nan")]  # too early, spike, below factor, NaN
    for step, norm in enumerate(norms, 1):  # tensors too: read when drained, not inside the step
        dynamics.observe_grad_norm(step, torch.tensor(norm) if step % 2 else norm)
    rows = dynamics.drain()
    spikes = [r for r in rows if r["kind"] == "spike"]
    assert [r["step"] for r in spikes] == [17, 19]
    assert spikes[0]["ratio"] == pytest.approx(10.0 / (25.0 / 16))  # the mean of the 16 norms before
    assert spikes[1]["grad_norm"] == "nan" and spikes[1]["running_mean"] is None
    means = [r["running_mean"] for r in rows if r["kind"] == "grad_norm"]
    assert means[0] is None and means[1] == 1.0 and len(means) == 18
    with pytest.raises(ValueError, match="every=0 is not valid"):
        Dynamics(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), every=0)


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    return prepare_pretrain_data(None, None, 4096, 32)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "dynamics.jsonl").read_text().splitlines()]


def test_trainer_writes_dynamics_and_resumes_them_exactly(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = PretrainConfig(**TINY, steps=12, optim=GAP5, save_every=7, keep=5, dynamics_every=2, log_every=4)
    full = pretrain(replace(cfg, out=str(tmp_path / "full"), tensorboard=True), data=data)
    rows = _rows(tmp_path / "full")
    layers = {r["layer"] for r in rows if r["kind"] == "layer"}
    assert len(layers) == 2 * 7  # llama-tiny: 2 blocks x (q, k, v, o, gate, up, down)
    assert sorted({r["step"] for r in rows if r["kind"] == "layer"}) == [1, 3, 5, 6, 7, 9, 11]  # every 2 + refreshes
    assert [r["step"] for r in rows if r["kind"] == "grad_norm"] == list(range(1, 13))
    events = b"".join(p.read_bytes() for p in (tmp_path / "full/tensorboard").glob("events.*"))
    assert b"dynamics/energy/model.layers.0.self_attn.q_proj.weight" in events
    # resume from step 7: the dynamics file reads as the uninterrupted run's
    shutil.copytree(tmp_path / "full/checkpoints/step-00000007", tmp_path / "part/checkpoints/step-00000007")
    shutil.copy(tmp_path / "full/metrics.jsonl", tmp_path / "part/metrics.jsonl")
    shutil.copy(tmp_path / "full/dynamics.jsonl", tmp_path / "part/dynamics.jsonl")
    resumed = pretrain(replace(cfg, out=str(tmp_path / "part")), resume=tmp_path / "part", data=data)
    assert resumed.losses == full.losses[7:]
    assert _rows(tmp_path / "part") == rows
    # the run summary's totals are those of the rows, after a resume too
    energies = [r["energy"] for r in rows if r["kind"] == "layer"]
    for result in (full, resumed):
        totals = result.summary["dynamics"]
        assert totals["samples"] == len(energies) and totals["spikes"] == sum(r["kind"] == "spike" for r in rows)
        assert totals["mean_energy"] == pytest.approx(sum(energies) / len(energies), rel=1e-12)


def test_layerwise_training_is_sampled_too(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = PretrainConfig(
        **TINY, steps=4, optim=OptimizerSpec(update_proj_gap=2), dynamics_every=1, layerwise=True, out=str(tmp_path)
    )
    pretrain(cfg, data=data)
    rows = [r for r in _rows(tmp_path) if r["kind"] == "layer"]
    assert sorted({r["step"] for r in rows}) == [1, 2, 3, 4]
    assert all(0 < r["energy"] <= 1 + 1e-6 and r["update_ratio"] > 0 for r in rows)


def test_dynamics_can_be_turned_off(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pretrain(PretrainConfig(**TINY, steps=2, dynamics_every=0, out=str(tmp_path)), data=data)
    assert not (tmp_path / "dynamics.jsonl").exists()


def test_spike_statistics_resume_from_the_checkpoint_whatever_the_out(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The detector's window, the layers' averages and the totals live in the checkpoint: a resume into an
    empty folder (no earlier dynamics.jsonl) writes the uninterrupted run's rows and totals."""
    cfg = PretrainConfig(**TINY, steps=12, optim=GAP5, save_every=7, keep=5, dynamics_every=2, log_every=4)
    full = pretrain(replace(cfg, out=str(tmp_path / "full")), data=data)
    shutil.copytree(tmp_path / "full/checkpoints/step-00000007", tmp_path / "elsewhere/checkpoints/step-00000007")
    resumed = pretrain(replace(cfg, out=str(tmp_path / "elsewhere")), resume=tmp_path / "elsewhere", data=data)
    after = [r for r in _rows(tmp_path / "full") if r["step"] > 7]
    assert any("running_mean" in r and r["running_mean"] is not None for r in after)
    assert any("grad_norm_ratio" in r for r in after)
    assert _rows(tmp_path / "elsewhere") == after
    assert resumed.summary["dynamics"] == full.summary["dynamics"]
