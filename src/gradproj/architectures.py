"""Causal language models by shape, before any training: the GaLore paper's LLaMA shapes, small ones that
learn on a CPU, or any Hugging Face config by name (built from the config, on any device, the meta device
included); which of a model's modules are its transformer blocks and its root (how FSDP2 wraps it); and the
rank the trainer gives a model. Below the trainer and the memory planner, which both build models here.

Example:
    >>> model = build_causal_lm("llama-tiny", vocab_size=256, seq_len=32)
    >>> sum(p.numel() for p in model.parameters()) < 200_000, default_rank(model)
    (True, 16)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .folders import model_folder
from .optim.groups import Target, target_weights

#: hidden / intermediate / heads / layers. The paper's five (Zhao et al., 2024, Table 9) and small
#: shapes for CPUs: ``llama-tiny`` trains in seconds (tests, smoke runs); ``llama-1m`` ...
#: ``llama-20m`` learn real text in minutes.
LLAMA_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "llama-tiny": (64, 172, 4, 2),
    "llama-1m": (128, 344, 4, 2),
    "llama-5m": (256, 688, 4, 4),
    "llama-20m": (384, 1024, 6, 6),
    "llama-60m": (512, 1376, 8, 8),
    "llama-130m": (768, 2048, 12, 12),
    "llama-350m": (1024, 2736, 16, 24),
    "llama-1b": (2048, 5461, 32, 24),
    "llama-7b": (4096, 11008, 32, 32),
}


def llama_config(name: str, *, vocab_size: int, seq_len: int) -> Any:
    """A ``transformers.LlamaConfig`` for one of :data:`LLAMA_SHAPES`."""
    from transformers import LlamaConfig

    if name not in LLAMA_SHAPES:
        raise ValueError(
            f"unknown model {name!r}; valid: {', '.join(LLAMA_SHAPES)}, or a Hugging Face config path/name"
        )
    hidden, intermediate, heads, layers = LLAMA_SHAPES[name]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
    )


def model_config(name: str, *, vocab_size: int, seq_len: int) -> Any:
    """The config for a registered name, or ``AutoConfig`` of a local path / hub name (vocab resized)."""
    if name in LLAMA_SHAPES:
        return llama_config(name, vocab_size=vocab_size, seq_len=seq_len)
    if name.startswith("llama-") or not (Path(name).exists() or "/" in name):
        raise ValueError(
            f"unknown model {name!r}; valid: {', '.join(LLAMA_SHAPES)}, or a Hugging Face config path/name"
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_folder(name))  # a run folder: its exported model's
    except Exception as error:  # offline, no such repository, not a config folder
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--model {name}: not a loadable Hugging Face config ({reason})") from None
    config.vocab_size = vocab_size
    return config


def build_causal_lm(name: str, *, vocab_size: int, seq_len: int) -> nn.Module:
    """A freshly initialised causal LM (pre-training starts from random weights, as in the paper)."""
    from transformers import AutoModelForCausalLM

    model: nn.Module = AutoModelForCausalLM.from_config(model_config(name, vocab_size=vocab_size, seq_len=seq_len))
    return model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the classes transformers lists in ``_no_split_modules`` (the unit
    it never splits across devices), e.g. ``LlamaDecoderLayer`` or ``BertLayer``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not blocks:
        raise ValueError(
            f"--fsdp: {type(model).__name__} names no transformer block class (transformers' _no_split_modules is "
            f"{sorted(names) or 'empty'}), so it cannot be sharded block by block; drop --fsdp"
        )
    return blocks


def untied_input_embeddings(model: nn.Module) -> nn.Module | None:
    """The input embeddings, unless they share their weight with the head (then the root holds both)."""
    embed: Any = getattr(model, "get_input_embeddings", lambda: None)()
    head: Any = getattr(model, "get_output_embeddings", lambda: None)()
    if embed is None or (head is not None and head.weight is embed.weight):
        return None
    return embed  # type: ignore[no-any-return]


def root_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters :func:`shard_model` leaves to the root unit: those outside every transformer
    block and the (untied) input embeddings, i.e. the final norm and the head of a causal LM. FSDP2
    keeps the root's weights gathered from its forward to the end of backward."""
    units = [*transformer_blocks(model), untied_input_embeddings(model)]
    inside = {id(p) for unit in units if unit is not None for p in unit.parameters()}
    return [p for p in model.parameters() if id(p) not in inside]


def default_rank(model: nn.Module) -> int:
    """A quarter of the hidden size: the paper's ratio (128/512 for LLaMA-60M ... 512/2048 for 1B)."""
    return max(1, int(getattr(getattr(model, "config", None), "hidden_size", 512)) // 4)


def check_rank(model: nn.Module, target: Target, rank: int) -> None:
    """Refuse a rank larger than the smallest targeted matrix (the engine would clamp it silently per matrix)."""
    smallest, name = smallest_target_dim(model, target)
    if rank > smallest:
        raise ValueError(
            f"--rank {rank} is larger than the model's matrices ({name} has min(m, n) = {smallest}); "
            f"use --rank <= {smallest}"
        )


def smallest_target_dim(model: nn.Module, target: Target) -> tuple[int, str]:
    """``min(m, n)`` over the target linears and the name of the weight that has it."""
    weights = target_weights(model, target)
    name, weight = min(weights.items(), key=lambda item: min(item[1].shape))
    return min(weight.shape), name
