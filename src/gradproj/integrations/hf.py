"""gradproj optimizers for ``transformers.Trainer``.

Hugging Face's built-in GaLore support installs ``galore-torch`` and, in layer-wise mode, cannot
accumulate gradients or resume. Here the Trainer gets an ordinary optimizer and scheduler:
``Trainer(..., optimizers=create_optimizer(model, args))``. Targets and options are read from the
same ``TrainingArguments`` fields (``optim_target_modules``, ``optim_args``) Hugging Face uses,
so a GaLore config moves over unchanged, and the Trainer's own checkpoints save and resume them
(the state loads with ``weights_only=True``).

Example:
    >>> from transformers import TrainingArguments                        # doctest: +SKIP
    >>> args = TrainingArguments("out", learning_rate=1e-2, max_steps=1000,
    ...                          optim_target_modules=["attn", "mlp"],
    ...                          optim_args="rank=128,update_proj_gap=200,scale=0.25")   # doctest: +SKIP
    >>> trainer = Trainer(model, args, train_dataset=data,
    ...                   optimizers=create_optimizer(model, args, optimizer="galore_adamw"))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..optim.build import OptimizerSpec, build_optimizer
from ..optim.groups import ATTENTION_AND_MLP

#: what ``TrainingArguments`` sets itself rather than ``optim_args``
_FROM_ARGS = ("name", "lr", "weight_decay", "target_modules")


def _optim_args() -> dict[str, Callable[[str], Any]]:
    """Every :class:`~gradproj.optim.build.OptimizerSpec` option of a plain type, or with its own parser
    (``update_proj_gap``: an int or ``auto``), read from its fields."""
    hints = typing.get_type_hints(OptimizerSpec)
    out: dict[str, Callable[[str], Any]] = {}
    for f in dataclasses.fields(OptimizerSpec):
        kinds = [t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if t is not type(None)]
        if f.name in _FROM_ARGS:
            continue
        if f.metadata.get("parse") is not None:
            out[f.name] = f.metadata["parse"]
        elif len(kinds) == 1 and kinds[0] in (int, float, str):
            out[f.name] = kinds[0]
    return out


#: ``optim_args`` keys and how to read them: ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``, ...
OPTIM_ARGS: dict[str, Callable[[str], Any]] = _optim_args()
#: the keys read by a parser of the field's own (its errors say what is valid)
_WORDED = frozenset(f.name for f in dataclasses.fields(OptimizerSpec) if f.metadata.get("parse") is not None)


def parse_optim_args(text: str | None) -> dict[str, Any]:
    """``"rank=128,scale=0.25"`` -> ``{"rank": 128, "scale": 0.25}`` (Hugging Face's format).

    >>> parse_optim_args("rank=64, update_proj_gap=100,proj_type=left")
    {'rank': 64, 'update_proj_gap': 100, 'proj_type': 'left'}
    >>> parse_optim_args("update_proj_gap=auto,min_gap=50")
    {'update_proj_gap': 'auto', 'min_gap': 50}
    >>> parse_optim_args("rank=auto,state_budget=1x@64")
    {'rank': 'auto', 'state_budget': '1x@64'}
    """
    out: dict[str, Any] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in OPTIM_ARGS:
            raise ValueError(f"optim_args item {item.strip()!r} is not KEY=VALUE with KEY in {', '.join(OPTIM_ARGS)}")
        try:
            out[key] = OPTIM_ARGS[key](value.strip())
        except ValueError as error:  # a parser of its own words its message; int() and float() do not
            if key in _WORDED:
                raise ValueError(f"optim_args {key}: {error}") from None
            raise ValueError(f"optim_args {key}={value.strip()!r}: expected {OPTIM_ARGS[key].__name__}") from None
    return out


def _targets(value: Any) -> str:
    """``optim_target_modules`` (a string, regex or list of names) as one regex for ``param_groups``."""
    if value is None:
        return ATTENTION_AND_MLP
    if isinstance(value, str):
        return value
    return "(" + "|".join(str(v) for v in value) + ")"


def create_optimizer(
    model: nn.Module, args: Any, *, optimizer: str = "galore_adamw"
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A gradproj optimizer and the Trainer's own scheduler for ``args`` (``TrainingArguments``).

    Reads ``learning_rate``, ``weight_decay``, ``optim_target_modules``, ``optim_args``,
    ``lr_scheduler_type``, warmup and ``max_steps``. ``optimizer`` is any name of
    :data:`gradproj.optim.registry.METHODS`; ``optim_args`` may also set ``other_lr`` (embeddings,
    norms and head; default: ``learning_rate``).
    """
    from transformers import get_scheduler

    options = parse_optim_args(getattr(args, "optim_args", None))
    spec = OptimizerSpec(
        name=optimizer,
        lr=args.learning_rate,
        other_lr=options.pop("other_lr", args.learning_rate),
        weight_decay=args.weight_decay,
        target_modules=_targets(getattr(args, "optim_target_modules", None)),
        **options,
    )
    built = build_optimizer(model, spec)
    if args.max_steps is None or args.max_steps <= 0:
        raise ValueError(f"max_steps={args.max_steps!r}: set TrainingArguments(max_steps=...) for the scheduler")
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        built,
        num_warmup_steps=args.get_warmup_steps(args.max_steps),
        num_training_steps=args.max_steps,
    )
    return built, scheduler
