"""A pre-training checkpoint as one Hugging Face folder (``config.json`` and ``model.safetensors``),
from either checkpoint format: one-process (safetensors) or sharded (DCP, any number of ranks). One
process reads each shard once into a model built on the meta device, so the weights exist once.

Example::

    gradproj export runs/pretrain-galore_adamw-20261202/ --out my-model
    >>> AutoModelForCausalLM.from_pretrained("my-model")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, read_meta, resolve_checkpoint


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Write ``checkpoint`` (a checkpoint folder, or a run folder: its newest) to ``out`` with
    ``save_pretrained``; returns the checkpoint exported."""
    path = resolve_checkpoint(Path(checkpoint), what="export")
    model = load_pretrained_model(path)
    model.save_pretrained(str(out))  # type: ignore[operator]
    return path


def load_pretrained_model(path: Path) -> nn.Module:
    """The causal LM a pre-training checkpoint holds, weights loaded, on the CPU."""
    from .models import build_causal_lm

    meta = read_meta(path)
    config, task = meta.get("config", {}), meta.get("task", {})
    if config.get("kind") != "PretrainConfig":
        raise CheckpointError(f"checkpoint {path}: a {config.get('kind')} run; export takes pre-training runs")
    with torch.device("meta"):
        model = build_causal_lm(config["model"], vocab_size=task["vocab_size"], seq_len=config["seq_len"])
    weights = _weights(path, meta)
    missing = sorted(set(model.state_dict()) - set(weights))
    if missing:
        raise CheckpointError(f"checkpoint {path}: no weights for {', '.join(missing[:3])} (another model?)")
    model.load_state_dict(weights, assign=True, strict=True)
    return model.to(dtype=next(iter(weights.values())).dtype)


def _weights(path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    if meta.get("format") == "dcp":
        from .sharded_checkpoint import consolidated_weights

        return consolidated_weights(path)
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write a pre-training checkpoint as a Hugging Face model folder",
        description="Export a checkpoint (one-process or sharded --fsdp, any number of ranks) to a folder that "
        "AutoModelForCausalLM.from_pretrained loads: config.json and model.safetensors.",
    )
    p.add_argument("checkpoint", help="a run folder (its newest checkpoint) or a checkpoints/step-XXXXXXXX folder")
    p.add_argument("--out", required=True, help="the folder to write")


def run(args: argparse.Namespace) -> int:
    try:
        path = export_checkpoint(Path(args.checkpoint), Path(args.out))
    except (CheckpointError, ValueError) as error:
        print(f"gradproj export: error: {error}", file=sys.stderr)
        return 2
    print(f"exported {path} to {args.out}")
    return 0
