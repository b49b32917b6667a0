"""What a rank sends per step under FSDP2: every collective's input bytes, by kind, counted while a
run trains (``scripts/fsdp_comm.py`` runs it under torchrun and writes docs/SCALE.md's table).

FSDP2 all-gathers weights (``all_gather_single``: forward, and again in backward for resharded
units) and reduce-scatters gradients (``reduce_scatter_single``); the optimizer all-reduces the
low-rank sums of left projections and the norms of Fira/APOLLO, all-gathers rows of ``u`` and, at
a refresh, the full gradient (``all_gather``). The counter wraps those functions of
``torch.distributed`` for as long as it is active: a measurement aid, never on in training.

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


@contextlib.contextmanager
def counting_collectives() -> Iterator[dict[str, int]]:
    """Count the bytes this rank contributes to each collective of :data:`COLLECTIVES` while inside."""
    sent = dict.fromkeys(COLLECTIVES, 0)
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name: str, function: Any) -> Any:
        position = COLLECTIVES[name]

        @functools.wraps(function)
        def counted(*args: Any, **kwargs: Any) -> Any:
            keyword = {"all_reduce": "tensor", "broadcast": "tensor"}.get(name, "input")
            buffer = args[position] if len(args) > position else kwargs.get(keyword, kwargs.get("input_tensor"))
            sent[name] += _nbytes(buffer)
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
        "| method | step | all-gather weights | reduce-scatter grads | optimizer (all-reduce, all-gather) | "
        "total / fp32 weights |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        for kind in ("between_refreshes", "refresh_step"):
            sent = r[kind]
            optimizer = sent.get("all_reduce", 0) + sent.get("all_gather", 0)
            rows.append(
                f"| {r['method']} | {kind.replace('_', ' ')} | {sent.get('all_gather_single', 0) / 2**20:.1f} MiB | "
                f"{sent.get('reduce_scatter_single', 0) / 2**20:.1f} MiB | {optimizer / 2**20:.2f} MiB | "
                f"{sum(sent.values()) / r['fp32_weight_bytes']:.2f}x |"
            )
    return "\n".join(rows)
