"""``gradproj generate``: text from a causal LM, ours or any Hugging Face one, with transformers'
own ``generate``: greedy, or sampled with a seed (the same seed gives the same text).

Example::

    gradproj generate runs/pretrain-galore_adamw-20261202/ --prompt "ROMEO:" --max-new-tokens 40
    >>> complete("my-model", "ROMEO:", max_new_tokens=5, greedy=True)  # doctest: +SKIP
    'ROMEO: I will not'
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from ..folders import error_reason, model_folder
from .export import SAMPLING
from .models import pretrained_causal_lm


def load_causal_lm(name: str) -> tuple[Any, Any]:
    """The model (eval mode, on the CPU) and tokenizer of a run folder, a Hugging Face folder or hub name."""
    from transformers import AutoTokenizer

    model = pretrained_causal_lm(name, name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_folder(name))
    except Exception as error:
        raise ValueError(f"{name}: could not load its tokenizer ({error_reason(error)})") from None
    return model.eval(), tokenizer


def complete(
    name: str | tuple[Any, Any],
    prompt: str,
    *,
    max_new_tokens: int = int(SAMPLING["max_new_tokens"]),
    greedy: bool = False,
    temperature: float = float(SAMPLING["temperature"]),
    top_k: int = int(SAMPLING["top_k"]),
    seed: int = 0,
) -> str:
    """``prompt`` followed by the model's continuation (``name``: a folder, a hub name, or a loaded
    ``(model, tokenizer)``)."""
    model, tokenizer = load_causal_lm(name) if isinstance(name, str) else name
    ids = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(seed)  # transformers samples from torch's global generator
    options: dict[str, Any] = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature}
    if not greedy:
        options["top_k"] = top_k
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **options,
        )
    return str(prompt + tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="continue a prompt with a trained (or any Hugging Face) causal LM",
        description="Generate text with a causal LM: a run folder (its exported RUN/model), an exported folder, "
        "or a Hugging Face path/name. Sampled by default (seeded: the same --seed gives the same text); --greedy "
        "picks the likeliest token each time.",
    )
    p.add_argument("model", help="a run folder, a Hugging Face model folder, or a hub name")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=SAMPLING["max_new_tokens"], help="tokens to add (%(default)s)")
    p.add_argument("--greedy", action="store_true", help="always the likeliest token (no sampling)")
    p.add_argument("--temperature", type=float, default=SAMPLING["temperature"], help="sampling heat (%(default)s)")
    p.add_argument("--top-k", type=int, default=SAMPLING["top_k"], help="sample among the k likeliest (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed (%(default)s)")


def run(args: argparse.Namespace) -> int:
    for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--top-k", args.top_k, 1)):
        if value < low:
            print(f"gradproj generate: error: {flag} {value}: must be at least {low}", file=sys.stderr)
            return 2
    if not args.temperature > 0:
        print(f"gradproj generate: error: --temperature {args.temperature}: must be above 0", file=sys.stderr)
        return 2
    try:
        text = complete(
            args.model,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            greedy=args.greedy,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
        )
    except ValueError as error:
        print(f"gradproj generate: error: {error}", file=sys.stderr)
        return 2
    print(text)
    return 0
