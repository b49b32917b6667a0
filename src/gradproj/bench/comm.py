"""What a rank sends per step under FSDP2: every collective's input bytes, by kind, counted while a
run trains (``scripts/fsdp_comm.py`` runs it under torchrun and writes docs/SCALE.md's table).

FSDP2 all-gathers weights (``all_gather_single``: forward, and again in backward for resharded
units) and reduce-scatters gradients (``reduce_scatter_single``); the optimizer all-reduces the
low-rank sums of left projections and the norms of Fira/APOLLO, all-gathers rows of ``u`` and, at
a refresh, gathers each full gradient on the rank that computes its basis (``gather``: the other
ranks' rows counted), which broadcasts the basis (``broadcast``: counted on the sender). The
counter wraps those functions of ``torch.distributed`` for as long as it is active: a measurement
aid, never on in training.

Example (one process: nothing is sent, nothing is counted)::

    with counting_collectives() as sent:
        ...
    sent  # {"all_gather_single": bytes, "reduce_scatter_single": bytes, ...}
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

#: collective -> the position of the tensor(s) a rank contributes (its send buffer)
COLLECTIVES = {
    "all_gather_single": 1,
    "reduce_scatter_single": 1,
    "all_reduce": 0,
    "all_gather": 1,
    "gather": 0,
    "all_gather_into_tensor": 1,
    "reduce_scatter_tensor": 1,
    "broadcast": 0,
}


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _stays(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether this rank's buffer leaves it: not a broadcast's receivers' nor a gather's owner's own part."""
    if name == "broadcast":
        return bool(kwargs.get("src", args[1] if len(args) > 1 else None) != dist.get_rank())
    if name == "gather":
        return bool(kwargs.get("dst", args[2] if len(args) > 2 else None) == dist.get_rank())
    return False


@contextlib.contextmanager
def counting_collectives() -> Iterator[dict[str, int]]:
    """Count the bytes this rank contributes to each collective of :data:`COLLECTIVES` while inside."""
    sent = dict.fromkeys(COLLECTIVES, 0)
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name: str, function: Any) -> Any:
        position = COLLECTIVES[name]

        @functools.wraps(function)
        def counted(*args: Any, **kwargs: Any) -> Any:
            keyword = {"all_reduce": "tensor", "broadcast": "tensor", "gather": "tensor"}.get(name, "input")
            buffer = args[position] if len(args) > position else kwargs.get(keyword, kwargs.get("input_tensor"))
            sent[name] += 0 if _stays(name, args, kwargs) else _nbytes(buffer)
            return function(*args, **kwargs)

        return counted

    for name, function in originals.items():
        setattr(dist, name, wrap(name, function))
    try:
        yield sent
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)


def comm_table(records: list[dict[str, Any]]) -> str:
    """docs/SCALE.md's table: per method, a step between refreshes and a refresh step, by collective."""
    rows = [
        "| method | step | all-gather weights | reduce-scatter grads | optimizer (reductions, gathers, broadcasts) | "
        "total / fp32 weights |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        for kind in ("between_refreshes", "refresh_step"):
            sent = r[kind]
            optimizer = sum(v for k, v in sent.items() if k not in ("all_gather_single", "reduce_scatter_single"))
            rows.append(
                f"| {r['method']} | {kind.replace('_', ' ')} | {sent.get('all_gather_single', 0) / 2**20:.1f} MiB | "
                f"{sent.get('reduce_scatter_single', 0) / 2**20:.1f} MiB | {optimizer / 2**20:.2f} MiB | "
                f"{sum(sent.values()) / r['fp32_weight_bytes']:.2f}x |"
            )
    return "\n".join(rows)


def spread_table(records: list[dict[str, Any]]) -> str:
    """docs/SCALE.md's table of ``scripts/fsdp_refresh.py``: the optimizer step's median time on refresh
    steps with the refreshes spread over the ranks and repeated on each, and between refreshes."""
    rows = [
        "| model | method | ranks x threads | refresh step, spread | refresh step, repeated | speed-up | "
        "between refreshes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        t = r["median_s"]
        rows.append(
            f"| {r['model']} | {r['method']} | {r['world']} x {r['threads']} | {t['spread']:.2f} s | "
            f"{t['repeated']:.2f} s | {t['repeated'] / t['spread']:.2f}x | {t['between']:.2f} s |"
        )
    return "\n".join(rows)
