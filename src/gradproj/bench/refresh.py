"""Micro-benchmark of basis refreshes: time and captured gradient energy per projector.

The default shape is a LLaMA-7B-like MLP gradient slice (2048 x 5504) at rank 512, built as a
decaying low-rank signal plus noise, as real gradients are.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any

import torch

from ..optim.defaults import PROJECTION_DEFAULTS
from ..projection.projectors import PROJECTORS, Layout, get_projector


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


def energy(g: torch.Tensor, left: torch.Tensor | None) -> float:
    """Fraction of ``||G||_F^2`` captured by the columns of ``left`` (None: no projection, all of it)."""
    return 1.0 if left is None else float((left.T @ g).norm() ** 2 / g.norm() ** 2)


def _projector_fns(g: torch.Tensor, rank: int, power_iters: int) -> dict[str, Any]:
    """Each projector's own refresh of a left basis (every projector of the registry; ``eigh``'s timed
    calls are warm-started from the basis of the burn-in call, as its refreshes after the first are)."""
    layout = Layout((int(g.shape[0]), int(g.shape[1])), rank, "left", g.dtype, g.device)
    group = {**PROJECTION_DEFAULTS, "rank": rank, "power_iters": power_iters}
    fns = {}
    for name in PROJECTORS:
        state: dict[str, Any] = {"proj_seed": 0, "step": 0, "last_refresh": 0}
        projector = get_projector(name)
        fns[name] = lambda projector=projector, state=state: projector.refresh(g, state, layout, group)[0]
    return fns


def _compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    svd = rows[0]
    for row in rows:
        row["speedup_vs_svd"] = svd["seconds"] / row["seconds"]
        row["energy_vs_svd"] = row["energy"] / svd["energy"]
    return rows


def refresh_benchmark(
    m: int = 2048, n: int = 5504, rank: int = 512, repeats: int = 3, device: str = "cpu", power_iters: int = 2
) -> list[dict[str, Any]]:
    """Median seconds and captured energy of each projector's refresh on one synthetic gradient."""
    g = low_rank_plus_noise(m, n, rank, device=device)
    rows: list[dict[str, Any]] = []
    for name, fn in _projector_fns(g, rank, power_iters).items():
        seconds, left = _timed(fn, repeats, device)
        rows.append({"projector": name, "seconds": seconds, "energy": energy(g, left)})
    for row in rows:
        row.update(source="synthetic", shape=[m, n], rank=rank, device=device, torch=torch.__version__)
        row["threads"] = torch.get_num_threads()
    return _compare(rows)


def captured_gradients(model: str = "llama-20m", steps: int = 50, seq_len: int = 128, batch: int = 16) -> dict:
    """Real gradients: train ``model`` on the embedded Shakespeare with AdamW for ``steps`` steps (the
    trainer's run), then return the gradient of every attention and MLP matrix on the next batch
    (float32, CPU)."""
    import tempfile

    from ..optim.groups import target_weights
    from ..train.loop import Trainer
    from ..train.pretrain import PretrainTask, next_token_loss
    from .quality import bench_config, prepare_data

    with tempfile.TemporaryDirectory(prefix="gradproj-captured-") as out:
        cfg = bench_config(model=model, steps=steps, batch_size=batch, seq_len=seq_len)
        adamw = replace(cfg.optim, name="adamw", lr=1e-3, other_lr=1e-3)
        cfg = replace(cfg, optim=adamw, clip=0.0, eval_tokens=seq_len, out=out)
        task = PretrainTask(cfg, prepare_data(cfg))
        result = Trainer(cfg, task).run()
    net = result.model
    next_token_loss(net, task.batch(result.progress.position, batch)["tokens"]).backward()
    return {name: p.grad.detach().clone() for name, p in target_weights(net).items() if p.grad is not None}


def captured_benchmark(
    gradients: dict[str, torch.Tensor], rank: int, repeats: int = 3, device: str = "cpu", power_iters: int = 2
) -> list[dict[str, Any]]:
    """Each projector on each captured gradient (compressing its smaller side, as ``std`` does):
    total median seconds over the matrices and the mean captured energy."""
    totals: dict[str, list[float]] = {}
    for g in gradients.values():
        g = g.to(device)
        g = g if g.shape[0] <= g.shape[1] else g.T  # the compressed side is the smaller one
        r = min(rank, g.shape[0])
        for name, fn in _projector_fns(g, r, power_iters).items():
            seconds, left = _timed(fn, repeats, device)
            total = totals.setdefault(name, [0.0, 0.0])
            total[0] += seconds
            total[1] += energy(g, left) / len(gradients)
    shapes = sorted({tuple(g.shape) for g in gradients.values()})
    rows = [{"projector": k, "seconds": v[0], "energy": v[1]} for k, v in totals.items()]
    for row in rows:
        row.update(source=f"captured ({len(gradients)} matrices)", shape=[list(s) for s in shapes], rank=rank)
        row.update(device=device, torch=torch.__version__, threads=torch.get_num_threads())
    return _compare(rows)


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Markdown table of refresh rows (synthetic and captured gradients alike)."""
    lines = [
        "| gradient | projector | seconds | speed-up vs svd | captured energy | vs svd |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        source = r.get("source", "synthetic")
        where = f"{source} {r['shape'][0]}x{r['shape'][1]}" if source == "synthetic" else source
        lines.append(
            f"| {where}, rank {r.get('rank', '?')} | {r['projector']} | {r['seconds']:.3f} | "
            f"{r['speedup_vs_svd']:.1f}x | {r['energy']:.4f} | {r['energy_vs_svd']:.4f} |"
        )
    return "\n".join(lines)
