"""Causal language models by name: the GaLore paper's LLaMA shapes, small ones that learn on a CPU,
or any Hugging Face config.

Example:
    >>> model = build_causal_lm("llama-tiny", vocab_size=256, seq_len=32)
    >>> sum(p.numel() for p in model.parameters()) < 200_000
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from ..optim.groups import Target

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

    from .export import model_folder

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


#: the config fields that make two causal LMs the same architecture (``--init-from`` against ``--model``)
ARCHITECTURE = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)


@contextlib.contextmanager
def quiet_transformers(errors_only: bool = False) -> Iterator[None]:
    """No transformers progress bars (one file's "Loading weights" is noise in a run's output) and, with
    ``errors_only``, no warnings either (expected ones: a new classifier head, a model's sampling defaults)."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.disable_progress_bar()
    if errors_only:
        logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()


def pretrained_causal_lm(name: str, what: str) -> nn.Module:
    """The causal LM at ``name`` (a run folder: its exported model; a Hugging Face folder or name) with
    its weights; a failure is one line starting with ``what`` (the flag or argument that named it)."""
    from transformers import AutoModelForCausalLM

    from .checkpoint import error_reason
    from .export import model_folder

    folder = model_folder(name)
    try:
        with quiet_transformers():
            model: nn.Module = AutoModelForCausalLM.from_pretrained(folder)
    except Exception as error:  # no weights, not a causal LM, offline and not cached ...
        raise ValueError(f"{what}: could not load a causal LM ({error_reason(error)})") from None
    return model


def load_causal_lm_weights(name: str, *, model: str | None, vocab_size: int, seq_len: int) -> nn.Module:
    """The causal LM at ``name`` (a run folder, a Hugging Face folder or name) with its weights, for
    ``--init-from``; refused when it is not ``model``'s architecture (if given) or has another vocabulary
    than the tokenizer's ``vocab_size``."""
    loaded = pretrained_causal_lm(name, f"--init-from {name}")
    have = getattr(loaded, "config").to_dict()  # noqa: B009  (a transformers model's)
    if int(have["vocab_size"]) != vocab_size:
        raise ValueError(
            f"--init-from {name}: its embeddings have {have['vocab_size']} tokens, the tokenizer {vocab_size}; "
            "drop --tokenizer (the model's own is the default) or give the one it was trained with"
        )
    if model is not None:
        want = model_config(model, vocab_size=vocab_size, seq_len=seq_len).to_dict()
        differ = [f"{k} {have.get(k)} vs {want.get(k)}" for k in ARCHITECTURE if have.get(k) != want.get(k)]
        if differ:
            raise ValueError(
                f"--init-from {name} is not a --model {model} ({', '.join(differ)}); drop --model (the weights' "
                "own architecture is the default) or give the matching one"
            )
    return loaded


def welore_ranks_of(name: str, flag: str) -> dict[str, int]:
    """Module name -> rank of every low-rank component of the compressed model at ``name`` (a run folder or a
    model folder ``gradproj compress`` wrote); refused, naming ``flag``, when it has none."""
    from ..welore import low_rank_components, read_manifest
    from .export import model_folder

    return low_rank_components(read_manifest(model_folder(name), f"{flag} {name}"))


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in backward (transformers' own mechanism, non-reentrant
    ``torch.utils.checkpoint``): only the blocks' inputs are kept from the forward."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"--activation-checkpointing: {type(model).__name__} does not support it (transformers' "
            "supports_gradient_checkpointing is False); drop the flag"
        )
    new = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
    if new is not None:
        new(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]


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
    from ..optim.groups import target_weights

    weights = target_weights(model, target)
    name, weight = min(weights.items(), key=lambda item: min(item[1].shape))
    return min(weight.shape), name
