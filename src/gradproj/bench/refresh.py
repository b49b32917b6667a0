"""Micro-benchmark of basis refreshes: time and captured gradient energy per projector.

The default shape is a LLaMA-7B-like MLP gradient slice (2048 x 5504) at rank 512, built as a
decaying low-rank signal plus noise, as real gradients are.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ..projection.bases import dct_indices, dct_matrix, random_orthonormal, rsvd_basis, svd_basis


def low_rank_plus_noise(
    m: int, n: int, rank: int, noise: float = 0.1, seed: int = 1234, device: str = "cpu"
) -> torch.Tensor:
    """``U diag(s) V^T + noise`` with a geometrically decaying spectrum over ``rank`` directions."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, rank, generator=gen)).Q
    spectrum = torch.logspace(0, -2, rank)
    signal = (u * spectrum) @ v.T
    g = signal + noise * signal.norm() / (m * n) ** 0.5 * torch.randn(m, n, generator=gen)
    return g.to(device)


def _timed(fn: Any, repeats: int, device: str) -> tuple[float, Any]:
    result = fn()  # burn-in
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def energy(g: torch.Tensor, left: torch.Tensor) -> float:
    """Fraction of ``||G||_F^2`` captured by the columns of ``left``."""
    return float((left.T @ g).norm() ** 2 / g.norm() ** 2)


def refresh_benchmark(
    m: int = 2048, n: int = 5504, rank: int = 512, repeats: int = 3, device: str = "cpu", power_iters: int = 2
) -> list[dict[str, Any]]:
    """Median seconds and captured energy of each projector's refresh on one gradient."""
    g = low_rank_plus_noise(m, n, rank, device=device)
    fns = {
        "svd": lambda: svd_basis(g, rank, "left")[0],
        "rsvd": lambda: rsvd_basis(g, rank, "left", seed=0, power_iters=power_iters)[0],
        "dct": lambda: dct_matrix(m, g.dtype, g.device)[:, dct_indices(g, rank, "left")[0]],
        "random": lambda: random_orthonormal(m, rank, 0, g.dtype).to(g.device),
    }
    rows: list[dict[str, Any]] = []
    for name, fn in fns.items():
        seconds, left = _timed(fn, repeats, device)
        rows.append({"projector": name, "seconds": seconds, "energy": energy(g, left)})
    svd = rows[0]
    for row in rows:
        row["speedup_vs_svd"] = svd["seconds"] / row["seconds"]
        row["energy_vs_svd"] = row["energy"] / svd["energy"]
        row.update(shape=[m, n], rank=rank, device=device, torch=torch.__version__, threads=torch.get_num_threads())
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = ["| projector | seconds | speed-up vs svd | captured energy | vs svd |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['projector']} | {r['seconds']:.3f} | {r['speedup_vs_svd']:.1f}x "
            f"| {r['energy']:.4f} | {r['energy_vs_svd']:.4f} |"
        )
    return "\n".join(lines)
