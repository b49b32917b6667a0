"""Typed run configurations, validated on construction. Every field describes itself
(:func:`gradproj.options.option`: help, limits, choices, whether ``--resume`` may change it), and the
``gradproj pretrain`` / ``finetune`` flags are generated from these fields
(:mod:`gradproj.train.flags`). The optimizer and its options are one nested
:class:`~gradproj.optim.build.OptimizerSpec`; what every run shares is :class:`TrainConfig`
(:mod:`gradproj.train.run_config`).

Example:
    >>> cfg = PretrainConfig(model="llama-tiny", steps=10, optim=OptimizerSpec(name="fira_adamw", rank=8))
    >>> cfg.warmup_steps, cfg.optimizer_spec().name, cfg.optimizer_spec().matrix_lr
    (1, 'fira_adamw', 0.003)
    >>> PretrainConfig(steps=0)
    Traceback (most recent call last):
    ...
    ValueError: steps=0 is not valid; expected an integer >= 1
    >>> PretrainConfig.from_dict({"steps": 5, "optim": {"name": "adamw"}}).optim.name
    'adamw'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..optim.build import OptimizerSpec
from ..options import option
from .run_config import (
    AUTOCAST,
    DATA,
    DEFAULT_MODEL,
    LOOP,
    MEMORY,
    OUTPUTS,
    SCALE,
    SECTIONS,
    TrainConfig,
    _llama_shapes,
    upgrade,
)  # fmt: skip

__all__ = [
    "AUTOCAST", "DATA", "DEFAULT_MODEL", "LOOP", "MEMORY", "OUTPUTS", "SCALE", "SECTIONS", "FinetuneConfig",
    "OptimizerSpec", "PretrainConfig", "TrainConfig", "upgrade",
]  # fmt: skip


@dataclass(kw_only=True)
class PretrainConfig(TrainConfig):
    """Pre-training a causal LM from scratch."""

    FIELD_HELP: ClassVar[dict[str, str]] = {"welore": "give the compressed model as --init-from"}

    model: str | None = option(
        None,
        help=lambda: f"{_llama_shapes()} (default: {DEFAULT_MODEL}, or --init-from's own)",
        group=DATA,
        planned=True,
    )
    init_from: str | None = option(
        None,
        help="start from these weights instead of random ones: a run folder (its exported model), a Hugging Face "
        "folder or a causal-LM name; its tokenizer unless --tokenizer",
        group=DATA,
        planned=True,
    )
    data: str | None = option(
        None, help="text file, folder of .txt, or hf:NAME[:CONFIG] (default: embedded Shakespeare)", group=DATA
    )
    tokenizer: str | None = option(
        None, help="Hugging Face tokenizer path/name (default: BPE trained on the data, cached)", group=DATA
    )
    vocab_size: int = option(
        4096, help="trained BPE size (ignored with --tokenizer)", minimum=2, group=DATA, planned=True
    )
    seq_len: int = option(128, help="tokens per sequence", minimum=2, group=DATA, planned=True)
    eval_tokens: int = option(
        65_536, help="held-out tokens per evaluation (fixed windows, the same every time)", minimum=2, group=DATA
    )

    def _check_welore(self) -> None:
        super()._check_welore()
        if not self.init_from:
            raise ValueError(
                "--welore continues pre-training the low-rank components of a model `gradproj compress` wrote; "
                "give it as --init-from COMPRESSED"
            )

    @property
    def model_name(self) -> str:
        """The architecture: ``model``, else ``init_from``'s (its config), else :data:`DEFAULT_MODEL`."""
        return self.model or self.init_from or DEFAULT_MODEL

    @property
    def tokenizer_name(self) -> str | None:
        """The Hugging Face tokenizer to use: ``tokenizer``, else ``init_from``'s; None: train a BPE."""
        if self.tokenizer or not self.init_from:
            return self.tokenizer
        from ..folders import model_folder

        try:
            return model_folder(self.init_from)
        except ValueError as error:
            raise ValueError(f"--init-from {error}") from None


@dataclass(kw_only=True)
class FinetuneConfig(TrainConfig):
    """Fine-tuning a pretrained encoder for sequence classification, or a causal LM on prompt/response
    pairs (``task="causal-lm"``, :mod:`gradproj.train.sft`).

    Default learning rates are 0.3x the pre-training recipe's for the matrices (GaLore 3e-3, AdamW
    3e-4) and 3e-4 for embeddings, norms and head: the best of a small sweep on BBC News
    (docs/BENCHMARKS.md); pretrained weights want gentler steps than a random init.
    """

    LR_FACTOR: ClassVar[float] = 0.3
    OTHER_LR: ClassVar[float | None] = 3e-4
    FIELD_HELP: ClassVar[dict[str, str]] = {"welore": "give the compressed model as --model, with --task causal-lm"}

    steps: int = 100
    eval_every: int = 50
    save_every: int = 50
    model: str | None = option(
        None, help="Hugging Face model path/name (default: embedded all-MiniLM-L6-v2)", group=DATA
    )
    task: str = option(
        "bbc-news",
        help="bbc-news (embedded) or a GLUE task: cola, sst2, mrpc, qqp, mnli, qnli, rte (sequence classification); "
        "causal-lm: supervised fine-tuning of a causal LM --model on --data",
        group=DATA,
    )
    data: str | None = option(
        None,
        help='--task causal-lm: a JSONL file, one {"prompt": ..., "response": ...} or {"messages": [...]} per line '
        "(default: BBC News as 'Article: ... Category:' -> label)",
        group=DATA,
    )
    max_length: int = option(128, help="tokens per example (truncated)", minimum=8, group=DATA)
    eval_examples: int = option(0, help="held-out examples per evaluation (0: all)", minimum=0, group=DATA)

    def _check_welore(self) -> None:
        super()._check_welore()
        if self.task != "causal-lm":
            raise ValueError(
                f"--welore with --task {self.task}: it fine-tunes the low-rank components of a causal LM that "
                "`gradproj compress` wrote; use --task causal-lm --model COMPRESSED"
            )
