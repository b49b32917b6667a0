"""Causal language models for a run: loading pretrained weights (``--init-from``, a WeLore-compressed model),
activation checkpointing and transformers' logging; the shapes themselves are :mod:`gradproj.architectures`'.

Example:
    >>> model = build_causal_lm("llama-tiny", vocab_size=256, seq_len=32)
    >>> sum(p.numel() for p in model.parameters()) < 200_000
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from ..architectures import (
    LLAMA_SHAPES,
    build_causal_lm,
    check_rank,
    default_rank,
    llama_config,
    model_config,
    smallest_target_dim,
)
from ..folders import error_reason, model_folder

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


__all__ = [
    "ARCHITECTURE", "LLAMA_SHAPES", "build_causal_lm", "check_rank", "default_rank", "enable_activation_checkpointing",
    "llama_config", "load_causal_lm_weights", "model_config", "pretrained_causal_lm", "quiet_transformers",
    "smallest_target_dim", "welore_ranks_of",
]  # fmt: skip
