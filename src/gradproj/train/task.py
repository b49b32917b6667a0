"""What a kind of training supplies to the loop (:class:`gradproj.train.loop.Trainer`): pre-training
(:class:`gradproj.train.pretrain.PretrainTask`), sequence classification and causal-LM fine-tuning."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class Task(Protocol):
    """What a kind of training supplies to the loop."""

    kind: str  # "pretrain" | "finetune": the run folder's prefix
    unit: str  # what a batch is counted in for throughput: "tokens" | "examples"

    def build_model(self) -> nn.Module: ...
    def batch(self, position: int, size: int) -> dict[str, torch.Tensor]: ...
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def count(self, batch: dict[str, torch.Tensor]) -> int: ...
    def evaluate(self, model: nn.Module) -> dict[str, float]: ...
    def describe(self) -> dict[str, Any]: ...
    def export_tokenizer(self) -> Any: ...  # a transformers tokenizer, saved next to the exported model
