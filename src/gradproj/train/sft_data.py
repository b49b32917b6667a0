"""Supervised fine-tuning data for a causal LM: prompt/response pairs from a JSONL file or, offline,
BBC News as a generative task; tokenized with the loss on response tokens only.

A JSONL line is ``{"prompt": ..., "response": ...}`` or ``{"messages": [{"role": ..., "content": ...},
...]}``, whose last message (the assistant's) is the response and the rest the prompt: rendered with
the tokenizer's chat template when it has one, else as ``role: content`` lines. Each example is
``prompt + response + end`` (EOS, or a blank line for a tokenizer without one) padded on the right to
``max_length`` (no packing: an example never
attends to another); a prompt too long loses its start, the response is kept whole.

Example:
    >>> pairs = parse_jsonl(['{"prompt": "2+2=", "response": "4"}'], source="toy.jsonl")
    >>> pairs[0].prompt, pairs[0].response
    ('2+2=', '4')
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.decode import read_text

#: the label of prompt and padding positions: no loss (PyTorch's and transformers' ignore index)
IGNORE = -100
#: characters of a BBC article the generative default keeps (the prompt is truncated to fit anyway)
ARTICLE_CHARS = 600


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str


@dataclass
class SFTExamples:
    """Tokenized examples, ``n x max_length``: ``labels`` is ``IGNORE`` except on response tokens; the
    pairs, and each prompt's length as trained (its first ``prompt_lengths[i]`` tokens), for generation."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pairs: list[Pair]
    prompt_lengths: list[int]

    def prompt(self, i: int) -> list[int]:
        """Example ``i``'s prompt tokens, cut as in training."""
        return [int(t) for t in self.input_ids[i, : self.prompt_lengths[i]]]

    def __len__(self) -> int:
        return len(self.pairs)


def parse_jsonl(lines: list[str], *, source: str, chat_template: Any = None) -> list[Pair]:
    """Pairs from JSONL lines; a bad line is named by its number. ``chat_template``: a function that
    renders a list of messages as a prompt ending where the assistant's reply starts."""
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"--data {source}: line {number} is not JSON ({error.msg})") from None
        pairs.append(_pair(row, number, source, chat_template))
    if not pairs:
        raise ValueError(f"--data {source}: no examples (an empty file); give one JSON object per line")
    return pairs


def _pair(row: Any, number: int, source: str, chat_template: Any) -> Pair:
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        return Pair(row["prompt"], row["response"])
    messages = row.get("messages") if isinstance(row, dict) else None
    if isinstance(messages, list) and len(messages) >= 2 and all(_is_message(m) for m in messages):
        *context, last = messages
        if last["role"] == "assistant":
            return Pair(_render(context, chat_template), last["content"])
    raise ValueError(
        f"--data {source}: line {number} has neither string 'prompt' and 'response' nor 'messages' ending with an "
        "assistant message (a list of {'role': ..., 'content': ...})"
    )


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def _render(messages: list[dict[str, str]], chat_template: Any) -> str:
    if chat_template is not None:
        return str(chat_template(messages))
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def read_jsonl(path: str, chat_template: Any = None) -> tuple[list[Pair], str]:
    """The pairs of a JSONL file and a note of how it was read (:mod:`gradproj.data.decode`: UTF-8, a few
    broken bytes replaced, or Windows-1252), empty when it was clean UTF-8. Lines end at a line feed only: a
    string may hold U+2028 or other characters ``str.splitlines`` would cut at."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"--data {path}: no such file (give a JSONL file of prompt/response or messages lines)")
    decoded = read_text(file)
    return parse_jsonl(decoded.text.split("\n"), source=path, chat_template=chat_template), decoded.note


def bbc_pairs(texts: list[str], targets: list[int], labels: list[str]) -> list[Pair]:
    """BBC News as a generative task: ``"Article: <text>\\nCategory:"`` -> ``" <label>"``."""
    return [
        Pair(f"Article: {t[:ARTICLE_CHARS].strip()}\nCategory:", f" {labels[y]}")
        for t, y in zip(texts, targets, strict=True)
    ]


def chat_template_of(tokenizer: Any) -> Any:
    """The tokenizer's chat template as a function of messages, or None when it has none."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


#: what ends a response when the tokenizer has no EOS token: a blank line, which ends a document in
#: the text our BPE (and the models pre-trained with it) learned from
BLANK_LINE = "\n\n"


def end_of_response(tokenizer: Any) -> list[int]:
    """The tokens that end every response, so a model learns to stop: EOS, else a blank line's."""
    if tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id]
    return list(tokenizer(BLANK_LINE, add_special_tokens=False)["input_ids"])


def answer_text(generated: str, tokenizer: Any) -> str:
    """A generated continuation up to the end of the response (EOS is dropped by decoding), stripped."""
    return (generated if tokenizer.eos_token_id is not None else generated.split(BLANK_LINE)[0]).strip()


def tokenize_pairs(tokenizer: Any, pairs: list[Pair], max_length: int) -> SFTExamples:
    """``prompt + response + end`` per example, right-padded to ``max_length``; the loss only on the
    response and its end. The prompt keeps its end when it must be cut (its instruction is there)."""
    eos = end_of_response(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    n = len(pairs)
    ids = torch.full((n, max_length), pad, dtype=torch.int64)
    mask = torch.zeros((n, max_length), dtype=torch.int64)
    labels = torch.full((n, max_length), IGNORE, dtype=torch.int64)
    prompts = tokenizer([p.prompt for p in pairs], add_special_tokens=False)["input_ids"]
    responses = tokenizer([p.response for p in pairs], add_special_tokens=False)["input_ids"]
    lengths = []
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        answer = (response + eos)[: max_length - 1]  # at least one prompt token predicts the first answer token
        prompt = prompt[-(max_length - len(answer)) :]
        row = prompt + answer
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(prompt) : len(row)] = torch.tensor(answer)
        lengths.append(len(prompt))
    return SFTExamples(ids, mask, labels, list(pairs), lengths)
