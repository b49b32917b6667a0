"""``gradproj memory``: the memory planner on the command line (see :mod:`gradproj.memory`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

EPILOG = """examples:
  gradproj memory --model llama-7b --optimizer galore_adamw8bit --rank 1024 --layerwise --batch 1 --seq-len 2048
  gradproj memory --model llama-1b --optimizer galore_adamw --rank 512 --world-size 8 --fsdp --json
  gradproj memory --model path/to/hf-config --optimizer fira_adamw --activation-checkpointing

The model is built on PyTorch's meta device (no memory, no download beyond a config), so any
size plans in seconds. Optimizer state and gradient bytes are exact; activations follow the
tensors autograd saves in transformers' LLaMA code (docs/SCALE.md shows them against measurements)."""


def add_parser(sub: Any) -> None:
    from .memory import DTYPES
    from .optim.registry import trainer_methods
    from .projection.projectors import PROJECTORS

    p = sub.add_parser(
        "memory",
        help="predict weights, gradients, optimizer state and activations, side by side with AdamW and LoRA",
        description="Plan the memory of a training config, per device, for a gradproj optimizer and the "
        "baselines (AdamW, 8-bit AdamW, LoRA at comparable state: half the rank).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="llama-7b", help="llama-60m ... llama-7b, llama-tiny/1m/5m/20m, or a HF config")
    p.add_argument(
        "--optimizer",
        default="galore_adamw8bit",
        choices=[m.name for m in trainer_methods()],
        help="(default galore_adamw8bit)",
    )
    p.add_argument("--rank", type=int, default=None, help="projection rank, LoRA's is half (default: hidden size / 4)")
    p.add_argument("--projector", default=None, choices=PROJECTORS, help="(default: the optimizer's own)")
    p.add_argument("--layerwise", action="store_true", help="layer-wise updates: gradients of one layer at a time")
    p.add_argument("--batch", type=int, default=1, help="sequences per device per micro-batch (default 1)")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="weights and activations (default bf16)")
    p.add_argument("--vocab-size", dest="vocab_size", type=int, default=32000, help="(default 32000, LLaMA's)")
    p.add_argument(
        "--activation-checkpointing",
        dest="activation_checkpointing",
        action="store_true",
        help="keep only each layer's input; recompute in backward",
    )
    p.add_argument("--world-size", dest="world_size", type=int, default=1, help="ranks (with --fsdp: shards)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2: weights, gradients and state sharded over the ranks")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .memory import Setup, format_plans, plan

    options = {f.name: getattr(args, f.name) for f in fields(Setup) if hasattr(args, f.name)}
    try:
        plans = plan(**options)
    except ValueError as error:
        print(f"gradproj memory: {error}")
        return 2
    if args.json:
        print(json.dumps({"setup": options, "plans": [p.to_dict() for p in plans]}, indent=2))
    else:
        print(format_plans(plans, Setup(**options)))
    return 0
