"""Pre-training task: a causal LM from scratch on packed text; evaluation is the token-weighted
mean next-token loss (and perplexity) over fixed held-out windows.

Example:
    >>> from gradproj.train import PretrainConfig, pretrain
    >>> result = pretrain(PretrainConfig(model="llama-tiny", steps=20, progress=False))  # doctest: +SKIP
    >>> result.final_eval["ppl"] < result.summary["unigram_ppl"]                          # doctest: +SKIP
    True
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..welore import factorize
from .config import PretrainConfig
from .loop import Trainer
from .models import build_causal_lm, load_causal_lm_weights, welore_ranks_of
from .parallel import rank_zero_first
from .progress import RunResult
from .text import PretrainData, prepare_pretrain_data


class PretrainTask:
    kind, unit = "pretrain", "tokens"

    def __init__(self, config: PretrainConfig, data: PretrainData | None = None) -> None:
        self.config = config
        self.data = data or prepare_pretrain_data(config.data, config.tokenizer_name, config.vocab_size, config.seq_len)
        count = min(config.eval_tokens // config.seq_len, self.data.validation.windows)
        self.eval_windows = torch.stack([self.data.validation.window(i) for i in range(max(1, count))])
        #: --welore: module name -> rank of every low-rank component of --init-from (gradproj compress's welore.json)
        self.low_rank = welore_ranks_of(str(config.init_from), "--init-from") if config.welore else None

    def build_model(self) -> nn.Module:
        cfg, vocab = self.config, self.data.tokenizer.vocab_size
        if not cfg.init_from:
            return build_causal_lm(cfg.model_name, vocab_size=vocab, seq_len=cfg.seq_len)
        # continued pre-training from real weights (--welore: only the low-rank components' factors train)
        model = load_causal_lm_weights(cfg.init_from, model=cfg.model, vocab_size=vocab, seq_len=cfg.seq_len)
        if self.low_rank is not None:
            factorize(model, self.low_rank)
        return model

    def batch(self, position: int, size: int) -> dict[str, torch.Tensor]:
        return {"tokens": self.data.train.batch(position, size, self.config.seed)}  # batch x (seq_len + 1)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return next_token_loss(model, batch["tokens"])

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["tokens"][:, 1:].numel())

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        mean, tokens = heldout_loss(model, self.eval_windows)
        return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": float(tokens)}

    def export_tokenizer(self) -> Any:
        return self.data.tokenizer.as_transformers()

    def resident_tensors(self) -> tuple[torch.Tensor, ...]:
        """What the task keeps for the whole run (the memory meter counts it apart from the step's)."""
        return (self.data.train.ids, self.data.validation.ids, self.eval_windows)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.config.model_name,
            "data": self.data.source,
            "train_tokens": int(self.data.train.ids.numel()),
            "heldout_tokens": int(self.data.validation.ids.numel()),
            "vocab_size": self.data.tokenizer.vocab_size,
            "unigram_ppl": round(self.data.unigram_ppl, 2),
        }


def next_token_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``tokens`` (batch x (L + 1)): position t predicts token t + 1."""
    logits = model(tokens[:, :-1]).logits  # batch x L x vocab
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def heldout_loss(model: nn.Module, windows: torch.Tensor, chunk_size: int = 32) -> tuple[float, int]:
    """Token-weighted mean next-token loss over every target of ``windows`` (n x (L + 1)), and the
    number of targets: position t predicts token t + 1, so each window has L targets."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for chunk in windows.split(chunk_size):
        chunk = chunk.to(device)
        logits = model(chunk[:, :-1]).logits.float()  # batch x seq x vocab
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        total, tokens = total + float(loss), tokens + chunk[:, 1:].numel()
    return total / tokens, tokens


def pretrain(
    config: PretrainConfig, *, resume: str | Path | None = None, data: PretrainData | None = None
) -> RunResult:
    """Pre-train ``config.model`` on ``config.data``; see :class:`PretrainConfig` for every field."""
    with rank_zero_first():  # under torchrun: one rank fetches and trains the tokenizer, the others read the cache
        task = PretrainTask(config, data)
    return Trainer(config, task, resume=resume).run()
