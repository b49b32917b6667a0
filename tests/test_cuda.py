"""CUDA paths: the engine on a GPU matches the CPU, and resumes in lockstep there.

Skipped without a GPU (CI has none); run on a lent GPU machine, see docs/BENCHMARKS.md.
Bases are compared up to the sign of each singular vector, which differs between LAPACK and
cuSOLVER; ``on_refresh="reset"`` makes the update invariant to those signs, so we compare there.
"""

from __future__ import annotations

import io

import pytest
import torch

import gradproj
from conftest import PRESET_NAMES, PROJECTORS, grad_stream, make_params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SHAPES = [(96, 64), (64, 128), (32,)]


def _opt(preset: str, params: list[torch.Tensor], projector: str, on_refresh: str) -> torch.optim.Optimizer:
    kwargs = {} if preset == "galore_adafactor" else {"lr": 1e-2}
    group = {"rank": 8, "update_proj_gap": 4, "projector": projector, "on_refresh": on_refresh}
    return gradproj.PRESETS[preset]([{"params": params[:2], **group}, {"params": params[2:]}], **kwargs)


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("projector", PROJECTORS)
def test_cuda_matches_cpu(preset: str, projector: str) -> None:
    cpu = make_params(SHAPES, torch.float32)
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    opt_cpu, opt_gpu = _opt(preset, cpu, projector, "reset"), _opt(preset, gpu, projector, "reset")
    for grads in grad_stream(cpu, 10):
        for p, q, g in zip(cpu, gpu, grads, strict=True):
            p.grad, q.grad = g.clone(), g.cuda()
        opt_cpu.step()
        opt_gpu.step()
    tol = 5e-3 if preset == "galore_adamw8bit" else 2e-4  # a quantization code may round differently
    for p, q in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=tol, atol=tol)


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("projector", PROJECTORS)
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
