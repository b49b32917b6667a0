"""``gradproj memory``: the memory planner on the command line (see :mod:`gradproj.memory`).

Its model, optimizer and memory flags are the trainer's own, generated from the same config fields
(:func:`gradproj.train.flags.add_config_flags` with ``planned=True``), so they cannot drift: a plan
and ``gradproj pretrain`` with the same flags describe the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EPILOG = """examples:
  gradproj memory                                         # what plain `gradproj pretrain` will hold
  gradproj memory --model llama-7b --vocab-size 32000 --dtype bf16 --optimizer galore_adamw8bit \\
      --rank 1024 --layerwise --batch-size 1 --seq-len 256  # the GaLore paper's 7B run on one 24 GB GPU
  gradproj memory --model llama-1b --vocab-size 32000 --rank 512 --world-size 8 --fsdp --json
  gradproj memory --model path/to/hf-config --optimizer fira_adamw --activation-checkpointing

The model is built on PyTorch's meta device (no memory, no download beyond a config), so any
size plans in seconds. Optimizer state and gradient bytes are exact; activations follow the
tensors autograd saves in transformers' LLaMA code. Every training run records this plan next to
what it measured (summary.json, "memory"); docs/SCALE.md shows them side by side."""


def add_parsers(sub: Any) -> None:
    from .train.config import SCALE, PretrainConfig
    from .train.flags import add_config_flags

    p = sub.add_parser(
        "memory",
        help="predict weights, gradients, optimizer state, activations and peak, side by side with AdamW and LoRA",
        description="Plan the memory of a training run, per device, for a gradproj optimizer and the baselines "
        "(AdamW, 8-bit AdamW, LoRA at comparable state: half the rank). The flags are gradproj pretrain's.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups = add_config_flags(p, PretrainConfig, planned=True)
    groups[SCALE].add_argument(
        "--world-size", dest="world_size", type=int, default=1, help="ranks (with --fsdp: shards; else replicas)"
    )
    groups["outputs"].add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from .memory import Setup, format_plans, plan_setup
    from .train.config import PretrainConfig
    from .train.flags import given

    flags = {k: v for k, v in given(args).items() if k not in ("world_size", "json")}
    try:
        setup = Setup.from_config(PretrainConfig.from_dict(flags), world_size=args.world_size)
        plans = plan_setup(setup)
    except ValueError as error:
        print(f"gradproj memory: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        options = {k: v for k, v in vars(setup).items() if k != "optim"}
        print(
            json.dumps(
                {"setup": {**options, "optim": flags.get("optim", {})}, "plans": [p.to_dict() for p in plans]}, indent=2
            )
        )
    else:
        print(format_plans(plans, setup))
    return 0
