"""Typed run configurations, validated on construction; every field is one command-line flag.

Example:
    >>> cfg = PretrainConfig(model="llama-tiny", steps=10)
    >>> cfg.warmup_steps, cfg.optimizer_spec().name
    (1, 'galore_adamw')
    >>> PretrainConfig(steps=0)
    Traceback (most recent call last):
    ...
    ValueError: steps=0 is not valid; expected an integer >= 1
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from ..optim.build import OptimizerSpec
from ..optim.groups import ATTENTION_AND_MLP
from ..optim.registry import get_method
from ..optim.validate import ON_REFRESH
from ..projection.projectors import PROJECTORS
from ..projection.sides import PROJ_TYPES

AUTOCAST = ("auto", "bf16", "off")
#: Fields that may differ when resuming; every other field must equal the checkpoint's.
RESUMABLE = (
    "steps",
    "eval_every",
    "save_every",
    "keep",
    "log_every",
    "out",
    "progress",
    "tensorboard",
    "max_nonfinite",
    "dynamics_every",
    "checkpoints",
)


def _positive(name: str, value: int | float, minimum: float = 1) -> None:
    if not value >= minimum:
        kind = "an integer" if isinstance(value, int) else "a number"
        raise ValueError(f"{name}={value!r} is not valid; expected {kind} >= {minimum:g}")


@dataclass(kw_only=True)
class TrainConfig:
    """What every run shares: optimizer, schedule, loop, outputs."""

    optimizer: str = "galore_adamw"  #: a name from ``gradproj.optim.registry.METHODS``
    lr: float | None = None  #: learning rate of projected matrices (None: the recipe's)
    other_lr: float | None = None  #: learning rate of embeddings, norms, head (None: the recipe's)
    rank: int | None = None  #: projection rank (None: a quarter of the hidden size, the paper's ratio)
    update_proj_gap: int = 200  #: steps between basis refreshes
    scale: float | None = None  #: update scale (None: 0.25 GaLore, 1 Fira/APOLLO, 128 APOLLO-Mini)
    projector: str | None = None  #: svd | rsvd | dct | random (None: the optimizer's, random for APOLLO, else svd)
    proj_type: str = "std"  #: which side is projected (galore-torch's names)
    on_refresh: str = "keep"  #: what happens to the moments when the basis changes
    weight_decay: float = 0.0
    target_modules: str = ATTENTION_AND_MLP  #: regex of module names to project, or "all-linear"
    steps: int = 600  #: optimizer steps
    warmup: int | None = None  #: linear warmup steps (None: 10% of steps)
    min_lr_ratio: float = 0.1  #: the cosine decays to this fraction of the peak
    clip: float = 1.0  #: global gradient-norm clip (0: no clipping, the norm is still logged)
    batch_size: int = 16  #: sequences (or examples) per micro-batch
    grad_accum: int = 1  #: micro-batches per optimizer step
    layerwise: bool = False  #: step each parameter inside backward (gradient memory ~ one layer)
    low_rank_comm: bool = False  #: under torchrun, all-reduce P^T G instead of G between refreshes
    seed: int = 0
    device: str = "cpu"
    autocast: str = "auto"  #: auto (bf16 on CUDA, off on CPU) | bf16 | off
    eval_every: int = 200  #: steps between evaluations (0: only at the end)
    save_every: int = 200  #: steps between checkpoints (0: only at the end / on a signal)
    keep: int = 3  #: checkpoints kept
    checkpoints: bool = True  #: write checkpoints (False: none, for benchmark runs; a signal still saves one)
    log_every: int = 10  #: steps between log rows
    out: str | None = None  #: run folder (None: runs/<task>-<optimizer>-<time>)
    max_nonfinite: int = 5  #: consecutive non-finite steps that stop the run
    progress: bool = True
    tensorboard: bool = True  #: also write TensorBoard events (if tensorboard is installed)
    dynamics_every: int = 10  #: sample per-layer training dynamics every N steps (0: off); see gradproj.dynamics

    def __post_init__(self) -> None:
        get_method(self.optimizer)  # an unknown name fails here, listing the valid ones
        for name in ("steps", "batch_size", "grad_accum", "update_proj_gap", "max_nonfinite"):
            _positive(name, getattr(self, name))
        for name in ("eval_every", "save_every", "keep", "log_every", "clip", "weight_decay"):
            _positive(name, getattr(self, name), 0)
        if self.rank is not None:
            _positive("rank", self.rank)
        for name in ("lr", "other_lr", "scale"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; expected a number > 0")
        choices = {"projector": (None, *PROJECTORS), "proj_type": PROJ_TYPES, "on_refresh": ON_REFRESH}
        choices["autocast"] = AUTOCAST
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not valid; expected one of {', '.join(map(str, valid))}"
                )
        if self.warmup is not None and not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup={self.warmup!r} is not valid; expected 0 <= warmup < steps ({self.steps})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} is not valid; expected a number in [0, 1]")

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 10)

    #: Default learning rates are the recipe's times this factor (and ``OTHER_LR`` for the rest, if set).
    LR_FACTOR: ClassVar[float] = 1.0
    OTHER_LR: ClassVar[float | None] = None

    def optimizer_spec(self, default_rank: int = 128) -> OptimizerSpec:
        method = get_method(self.optimizer)
        return OptimizerSpec(
            name=self.optimizer,
            lr=self.lr if self.lr is not None else method.lr * self.LR_FACTOR,
            other_lr=self.other_lr if self.other_lr is not None else (self.OTHER_LR or method.other_lr),
            rank=self.rank if self.rank is not None else default_rank,
            update_proj_gap=self.update_proj_gap,
            scale=self.scale,
            projector=self.projector,
            proj_type=self.proj_type,
            on_refresh=self.on_refresh,
            weight_decay=self.weight_decay,
            target_modules=self.target_modules,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, **asdict(self)}

    def changed_on_resume(self, saved: dict[str, Any]) -> list[str]:
        """Fields that differ from a saved config and may not (lines 'name: saved -> now')."""
        now = self.to_dict()
        return [
            f"{f}: {saved.get(f)!r} -> {now[f]!r}"
            for f in [*(fl.name for fl in fields(self)), "kind"]
            if f not in RESUMABLE and saved.get(f) != now[f]
        ]


@dataclass(kw_only=True)
class PretrainConfig(TrainConfig):
    """Pre-training a causal LM from scratch."""

    model: str = "llama-5m"  #: a name from LLAMA_SHAPES or a Hugging Face config path/name
    data: str | None = None  #: None (embedded Shakespeare), a text file/folder, or hf:NAME[:CONFIG]
    tokenizer: str | None = None  #: None (BPE trained on the data, cached) or a Hugging Face tokenizer
    vocab_size: int = 4096  #: size of the trained BPE (ignored with --tokenizer)
    seq_len: int = 128
    eval_tokens: int = 65_536  #: held-out tokens per evaluation (fixed windows, same every time)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("vocab_size", "seq_len", "eval_tokens"):
            _positive(name, getattr(self, name), 2)


@dataclass(kw_only=True)
class FinetuneConfig(TrainConfig):
    """Fine-tuning a pretrained encoder for sequence classification.

    Default learning rates are 0.3x the pre-training recipe's for the matrices (GaLore 3e-3, AdamW
    3e-4) and 3e-4 for embeddings, norms and head: the best of a small sweep on BBC News
    (docs/BENCHMARKS.md); pretrained weights want gentler steps than a random init.
    """

    LR_FACTOR: ClassVar[float] = 0.3
    OTHER_LR: ClassVar[float | None] = 3e-4

    steps: int = 100
    eval_every: int = 50
    save_every: int = 50
    model: str | None = None  #: None (embedded all-MiniLM-L6-v2) or a Hugging Face model path/name
    task: str = "bbc-news"  #: bbc-news (embedded) or a GLUE task name (needs the network)
    max_length: int = 128  #: tokens per example (truncated)
    eval_examples: int = 0  #: held-out examples per evaluation (0: all)

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("max_length", self.max_length, 8)
