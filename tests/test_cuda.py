"""CUDA paths: the engine on a GPU matches the CPU, and resumes in lockstep there.

Skipped without a GPU (CI has none); run on a lent GPU machine, see docs/BENCHMARKS.md.
Bases are compared up to the sign of each singular vector, which differs between LAPACK and
cuSOLVER; ``on_refresh="reset"`` makes the update invariant to those signs, so we compare there.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

import gradproj
from conftest import PAIRS, grad_stream, lr_kwargs, make_params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SHAPES = [(96, 64), (64, 128), (32,)]


def _opt(preset: str, params: list[torch.Tensor], projector: str, on_refresh: str) -> torch.optim.Optimizer:
    kwargs = lr_kwargs(preset)
    group = {"rank": 8, "update_proj_gap": 4, "projector": projector, "on_refresh": on_refresh}
    # named parameters: the random projector's seeds then follow the names
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    return gradproj.PRESETS[preset]([{"params": named[:2], **group}, {"params": named[2:]}], **kwargs)


@pytest.mark.parametrize(("preset", "projector"), PAIRS)
def test_cuda_matches_cpu(preset: str, projector: str) -> None:
    cpu = make_params(SHAPES, torch.float32)
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    opt_cpu, opt_gpu = _opt(preset, cpu, projector, "reset"), _opt(preset, gpu, projector, "reset")
    for grads in grad_stream(cpu, 10):
        for p, q, g in zip(cpu, gpu, grads, strict=True):
            p.grad, q.grad = g.clone(), g.cuda()
        opt_cpu.step()
        opt_gpu.step()
    # a quantization code may round differently; Fira's residual G - PP^T G is sensitive to how LAPACK and
    # cuSOLVER resolve nearly equal singular values (measured on an H100: 3 of 8192 entries off by 2.6e-4)
    tol = {"galore_adamw8bit": 5e-3, "fira_adamw": 1e-3}.get(preset, 2e-4)
    for p, q in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=tol, atol=tol)


@pytest.mark.parametrize(("preset", "projector"), PAIRS)
def test_cuda_state_dict_resumes_in_lockstep(preset: str, projector: str) -> None:
    params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(SHAPES, torch.bfloat16)]
    opt = _opt(preset, params, projector, "rotate")
    stream = [[g.cuda() for g in grads] for grads in grad_stream(params, 8)]
    for grads in stream[:5]:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = _opt(preset, twin_params, projector, "rotate")
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    for grads in stream[5:]:
        for group in (params, twin_params):
            for p, g in zip(group, grads, strict=True):
                p.grad = g.clone()
        opt.step()
        twin.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params, strict=True))
    assert all(p.dtype == torch.bfloat16 for p in params)


def test_dynamics_on_cuda_match_the_cpu() -> None:
    """Per-layer dynamics stay tensors on the GPU until drained, then equal the CPU's."""
    from gradproj.dynamics import Dynamics

    rows = {}
    for device in ("cpu", "cuda"):
        params = [torch.nn.Parameter(p.detach().to(device)) for p in make_params(SHAPES, torch.float32)]
        opt = _opt("fira_adamw", params, "svd", "reset")
        dynamics = Dynamics(opt, every=2)
        for grads in grad_stream(make_params(SHAPES, torch.float32), 6):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.to(device)
            opt.step()
        rows[device] = [r for r in dynamics.drain() if r["kind"] == "layer"]
    assert len(rows["cpu"]) == len(rows["cuda"]) > 0
    for a, b in zip(rows["cpu"], rows["cuda"], strict=True):
        assert a.keys() == b.keys()
        for key in ("energy", "stable_rank", "update_ratio", "scale_mean", "overlap"):
            if key in a:  # stable rank and overlap at refreshes only
                assert b[key] == pytest.approx(a[key], rel=1e-3), key


def test_bench_run_on_cuda_records_gpu_memory_and_step_time(tmp_path: Path) -> None:
    from gradproj.bench.methods import get_method
    from gradproj.bench.quality import bench_config, prepare_data, run

    cfg = bench_config(model="llama-1m", steps=12, batch_size=4, seq_len=32, rank=8, gap=4, device="cuda")
    data = prepare_data(cfg)
    record = run(get_method("galore_adamw"), 1e-2, 1e-2, data, cfg, tmp_path)
    assert record["memory_kind"] == "cuda_max_memory_allocated"
    assert record["peak_memory_bytes"] > record["state_bytes"] > 0
    assert record["refreshes"] == 3 * 7 * 2 and record["refresh_seconds"] > 0  # 3 refreshes x 14 matrices
    assert 0 < record["step_seconds_median"] < 5
