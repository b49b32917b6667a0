"""Causal-LM fine-tuning (``gradproj finetune --task causal-lm``): supervised fine-tuning of a causal
LM on prompt/response pairs, the loss on response tokens only (:mod:`gradproj.train.sft_data`).

Evaluation is over the held-out pairs: the token-weighted mean loss on their responses and its
perplexity and, when every response is a short answer (at most :data:`SHORT_ANSWER` tokens), the
exact-match accuracy of the greedily generated answer (stripped of spaces). The offline default is
BBC News as a generative task, ``"Article: ...\\nCategory:" -> " business"``, held out as the
classifier's split is; the model is one gradproj pre-trained itself (``--model RUN``): no causal LM
with weights ships on PyPI.

Example::

    gradproj pretrain --out runs/base                     # or: bash scripts/demo.sh
    gradproj finetune --task causal-lm --model runs/base  # BBC News as "Article: ... Category:" -> label
    gradproj finetune --task causal-lm --model runs/base --data chat.jsonl
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from ..data.embedded import load_bbc_news, stratified_split
from ..folders import error_reason, model_folder
from ..welore import factorize
from .config import FinetuneConfig
from .models import pretrained_causal_lm, quiet_transformers, welore_ranks_of
from .sft_data import IGNORE, Pair, answer_text, bbc_pairs, chat_template_of, read_jsonl, tokenize_pairs
from .text import _permutation

#: the longest response (in tokens, EOS included) that counts as a short answer, scored by exact match
SHORT_ANSWER = 8
#: share of a JSONL file's pairs held out (those with the smallest hash: the same on every run)
HELD_OUT_FRACTION = 0.1
#: examples generated at once for the exact match (left-padded)
GENERATE_BATCH = 32


class CausalLMTask:
    kind, unit = "finetune", "examples"

    def __init__(self, config: FinetuneConfig) -> None:
        from transformers import AutoTokenizer

        if not config.model:
            raise ValueError(
                "--task causal-lm needs --model: a causal LM, e.g. a gradproj pretrain run folder "
                "(bash scripts/demo.sh trains one) or a Hugging Face path/name"
            )
        self.config = config
        try:
            self.model_path = model_folder(config.model)
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        except Exception as error:
            raise ValueError(f"--model {config.model}: no tokenizer ({error_reason(error)})") from None
        #: --welore: module name -> rank of every low-rank component (gradproj compress's welore.json)
        self.low_rank = welore_ranks_of(config.model, "--model") if config.welore else None
        train, held, self.source = self._pairs(config)
        self.train = tokenize_pairs(self.tokenizer, train, config.max_length)
        self.held_out = tokenize_pairs(self.tokenizer, held[: config.eval_examples or None], config.max_length)
        lengths = self.held_out.labels.ne(IGNORE).sum(dim=1)
        self.answer_tokens = int(lengths.max())
        self.short_answers = self.answer_tokens <= SHORT_ANSWER

    def _pairs(self, config: FinetuneConfig) -> tuple[list[Pair], list[Pair], str]:
        if config.data is None:
            data = load_bbc_news()
            train_idx, held_idx = stratified_split(data)
            pairs = bbc_pairs(data.texts, data.targets, data.labels)
            removed = data.duplicates_removed
            source = f"BBC News from PyPI as 'Article: ... Category:' -> label ({removed} duplicates removed)"
            return [pairs[i] for i in train_idx], [pairs[i] for i in held_idx], source
        pairs, note = read_jsonl(config.data, chat_template_of(self.tokenizer))
        if len(pairs) < 2:
            raise ValueError(f"--data {config.data}: {len(pairs)} example; need at least 2 to hold one out")
        digest = sorted(range(len(pairs)), key=lambda i: hashlib.sha1(repr(pairs[i]).encode()).hexdigest())
        held = set(digest[: max(1, round(HELD_OUT_FRACTION * len(pairs)))])
        train = [p for i, p in enumerate(pairs) if i not in held]
        source = f"{config.data} ({len(train)} examples for training, {len(held)} held out)"
        source += f"; {note}" if note else ""
        return train, [pairs[i] for i in digest if i in held], source

    def build_model(self) -> nn.Module:
        model = pretrained_causal_lm(self.model_path, f"--model {self.config.model}")
        if self.low_rank is not None:
            factorize(model, self.low_rank)  # WeLore-PEFT: the components' factors and the norms train
        return model

    def batch(self, position: int, size: int) -> dict[str, torch.Tensor]:
        n = len(self.train)
        rows = torch.tensor(
            [int(_permutation(n, self.config.seed, p // n)[p % n]) for p in range(position, position + size)]
        )
        return {
            "input_ids": self.train.input_ids[rows],
            "attention_mask": self.train.attention_mask[rows],
            "labels": self.train.labels[rows],
        }

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the batch's response tokens (each predicted from the token before it)."""
        total, count = response_loss(model, batch)
        return total / count

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].shape[0])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        held = self.held_out
        total, count = 0.0, 0
        for start in range(0, len(held), 64):
            part = {
                k: getattr(held, k)[start : start + 64].to(device) for k in ("input_ids", "attention_mask", "labels")
            }
            loss, tokens = response_loss(model, part)
            total, count = total + float(loss), count + int(tokens)
        metrics = {"loss": total / count, "ppl": float(torch.tensor(total / count).clamp(max=50).exp())}
        if self.short_answers:
            metrics["exact_match"] = self.exact_match(model)
        return metrics

    def exact_match(self, model: nn.Module) -> float:
        """The share of held-out prompts whose greedy answer, stripped, is the response, stripped."""
        held = self.held_out
        answers = generate_answers(
            model, self.tokenizer, [held.prompt(i) for i in range(len(held))], self.answer_tokens
        )
        pairs = self.held_out.pairs
        right = [answer_text(a, self.tokenizer) == p.response.strip() for a, p in zip(answers, pairs, strict=True)]
        return sum(right) / len(right)

    def export_tokenizer(self) -> Any:
        return self.tokenizer

    def describe(self) -> dict[str, Any]:
        responses = [p.response.strip() for p in self.held_out.pairs]
        majority = max(responses.count(r) for r in set(responses)) / len(responses)
        return {
            "data": self.source,
            "model": self.config.model,
            "model_path": self.model_path,
            "train_examples": len(self.train),
            "heldout_examples": len(self.held_out),
            # the exact match of always answering the commonest held-out answer (short answers only)
            "majority_share": majority if self.short_answers else None,
        }


def response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy of the response tokens and their number."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]  # b x L-1 x V
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    loss = nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss, targets.ne(IGNORE).sum()


def generate_answers(model: nn.Module, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of the token lists ``prompts`` (left-padded in batches: transformers derives
    the positions from the attention mask), decoded without special tokens."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id
    )
    answers: list[str] = []
    for start in range(0, len(prompts), GENERATE_BATCH):
        encoded = prompts[start : start + GENERATE_BATCH]
        width = max(len(e) for e in encoded)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)  # batch x width
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        with quiet_transformers(errors_only=True):  # the model's sampling defaults, positions past its training length
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)  # type: ignore[operator]
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return answers
