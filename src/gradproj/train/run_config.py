"""What every run's configuration shares (:class:`TrainConfig`: optimizer, schedule, loop, outputs), the
``--help`` sections its fields are listed under, and how a saved configuration is read back (``upgrade``)
and compared on ``--resume``. The tasks' own configurations are :mod:`gradproj.train.config`'s.

Example:
    >>> SECTIONS[1], AUTOCAST
    ('optimizer', ('auto', 'bf16', 'off'))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar

from ..optim.build import OptimizerSpec
from ..options import check, flatten, meta, option

AUTOCAST = ("auto", "bf16", "off")
LOOP, OUTPUTS, DATA, MEMORY = "schedule and loop", "outputs", "model and data", "memory and precision"
SCALE = "several processes (torchrun)"
#: The ``--help`` sections, in the order they are listed.
SECTIONS = (DATA, "optimizer", MEMORY, SCALE, LOOP, OUTPUTS)


def _dtypes() -> tuple[str, ...]:
    from ..optim.precision import WEIGHT_DTYPES

    return tuple(WEIGHT_DTYPES)


def _bf16_updates() -> tuple[str, ...]:
    from ..optim.precision import BF16_UPDATES

    return BF16_UPDATES


def _bf16_update_help() -> str:
    from ..optim.precision import DEFAULT_BF16_UPDATE

    return (
        "with --dtype bf16: how each step's float32 result is rounded into the weights: nearest (pure bf16, small "
        "updates are lost), stochastic (unbiased, no memory), kahan (a bf16 compensation buffer per weight, "
        f"counted in the state) (default {DEFAULT_BF16_UPDATE}: the best measured, docs/BENCHMARKS.md)"
    )


#: the pre-training model when neither ``--model`` nor ``--init-from`` names one
DEFAULT_MODEL = "llama-5m"


def _llama_shapes() -> str:
    from .models import LLAMA_SHAPES

    return f"{', '.join(LLAMA_SHAPES)}, or a Hugging Face config path/name"


@dataclass(kw_only=True)
class TrainConfig:
    """What every run shares: optimizer, schedule, loop, outputs."""

    optim: OptimizerSpec = option(
        default_factory=OptimizerSpec, help="the optimizer and its options", group="optimizer", planned=True
    )
    steps: int = option(600, help="optimizer steps", minimum=1, group=LOOP, resumable=True)
    warmup: int | None = option(
        None, help="linear warmup steps before the cosine (default: 10% of steps)", minimum=0, group=LOOP
    )
    min_lr_ratio: float = option(0.1, help="the cosine decays to this fraction of the peak", minimum=0, group=LOOP)
    clip: float = option(
        1.0, help="global gradient-norm clip, 0 = off (the norm is still logged)", minimum=0, group=LOOP
    )
    batch_size: int = option(
        16,
        help="sequences (or examples) per micro-batch and rank (a memory setting: with --global-batch fixed, --resume "
        "may change it)",
        minimum=1,
        group=LOOP,
        planned=True,
        resumable=True,
    )
    grad_accum: int = option(
        1,
        help="micro-batches per optimizer step (derived from --global-batch when the number of ranks changes)",
        minimum=1,
        group=LOOP,
        planned=True,
        resumable=True,
    )
    global_batch: int | None = option(
        None,
        help="sequences (or examples) per optimizer step over all ranks (default --batch-size x --grad-accum x ranks, "
        "recorded at the start): the run's maths; on another number of ranks --grad-accum (and if need be "
        "--batch-size) is derived from it, so every world size computes the same steps on the same data",
        minimum=1,
        group=LOOP,
    )
    welore: bool = option(
        False,
        help="train only the low-rank components' factors (and the norms) of a model `gradproj compress` wrote "
        "(WeLore); embeddings, head and dense matrices are frozen, and the exported model has the factors merged "
        "back",
        group=DATA,
    )
    layerwise: bool = option(
        False,
        help="step each parameter inside backward: gradient memory of about one layer; clipping bounds by the "
        "previous step's and the running norm (docs/SCALE.md)",
        group=MEMORY,
        planned=True,
    )
    dtype: str = option(
        "fp32",
        help="the weights' dtype; the optimizer keeps float32 moments (8-bit codes for 8-bit methods) either way",
        choices=_dtypes,
        group=MEMORY,
        planned=True,
    )
    bf16_update: str | None = option(
        None,
        help=_bf16_update_help,
        choices=_bf16_updates,
        group=MEMORY,
        planned=True,
    )
    activation_checkpointing: bool = option(
        False,
        help="keep only each transformer block's input and recompute the block in backward "
        "(transformers' gradient checkpointing): activation memory of about one block, one more forward per block "
        "(its measured cost: docs/SCALE.md)",
        group=MEMORY,
        planned=True,
    )
    preflight: bool = option(
        True,
        help="on CUDA, do not compare the memory plan with the device's free memory before the first step",
        group=MEMORY,
    )
    low_rank_comm: bool = option(
        False, help="DDP: all-reduce the low-rank P^T G between basis refreshes instead of G", group=SCALE
    )
    fsdp: bool = option(
        False,
        help="shard weights, gradients and optimizer state over the ranks with PyTorch's FSDP2 (fully_shard on the "
        "embeddings, each transformer block and the root) and save sharded checkpoints (torch.distributed.checkpoint) "
        "that resume on any number of ranks; without torchrun: one process, one shard (docs/SCALE.md)",
        group=SCALE,
        planned=True,
    )
    fsdp_replicate: int = option(
        1,
        help="with --fsdp: HSDP, N replicas of a model sharded over ranks / N (a 2-D mesh: shard within a node, "
        "replicate across nodes; gradients all-reduced across replicas); --resume may change it",
        minimum=1,
        group=SCALE,
        planned=True,
        resumable=True,
    )
    seed: int = option(0, help="model, data order and basis seed", group=LOOP)
    device: str = option("cpu", help="cpu, cuda, cuda:1 ...", group=LOOP)
    autocast: str = option("auto", help="auto: bf16 on CUDA, off on CPU", choices=AUTOCAST, group=LOOP)
    max_nonfinite: int = option(
        5, help="consecutive NaN/Inf steps (each skipped) that stop the run", minimum=1, group=LOOP, resumable=True
    )
    eval_every: int = option(
        200, help="steps between evaluations, 0 = at the end only", minimum=0, group=OUTPUTS, resumable=True
    )
    save_every: int = option(
        200, help="steps between checkpoints, 0 = at the end only", minimum=0, group=OUTPUTS, resumable=True
    )
    keep: int = option(3, help="checkpoints kept", minimum=0, group=OUTPUTS, resumable=True)
    checkpoints: bool = option(
        True,
        help="no checkpoints at all, not even at the end (benchmark runs; a signal still saves one)",
        group=OUTPUTS,
        resumable=True,
    )
    export: bool = option(
        True,
        help="no final model folder (RUN/model, a Hugging Face folder; gradproj export writes one later)",
        group=OUTPUTS,
        resumable=True,
    )
    log_every: int = option(10, help="steps between log rows", minimum=1, group=OUTPUTS, resumable=True)
    out: str | None = option(
        None, help="run folder (default runs/<command>-<optimizer>-<time>)", group=OUTPUTS, resumable=True
    )
    progress: bool = option(True, help="no progress bar", group=OUTPUTS, resumable=True)
    tensorboard: bool = option(True, help="CSV/JSONL logs only (no TensorBoard events)", group=OUTPUTS, resumable=True)
    dynamics_every: int = option(
        10,
        help="sample per-layer training dynamics (captured energy, subspace drift, stable rank, spikes) every N "
        "steps and at every basis refresh into dynamics.jsonl; 0 = off (see gradproj report)",
        minimum=0,
        group=OUTPUTS,
        resumable=True,
    )

    def __post_init__(self) -> None:
        if isinstance(self.optim, dict):  # from JSON (config.json, a checkpoint's meta)
            self.optim = OptimizerSpec(**self.optim)
        check(self)
        if self.warmup is not None and not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup={self.warmup!r} is not valid; expected 0 <= warmup < steps ({self.steps})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} is not valid; expected a number in [0, 1]")
        if self.bf16_update is not None and self.dtype != "bf16":
            raise ValueError(
                f"--bf16-update {self.bf16_update} needs --dtype bf16 (with --dtype {self.dtype} every update is "
                "added in full precision); drop --bf16-update or add --dtype bf16"
            )
        if self.welore:
            self._check_welore()
        if self.fsdp:
            self._check_fsdp()
        elif self.fsdp_replicate > 1:
            raise ValueError(f"--fsdp-replicate {self.fsdp_replicate} needs --fsdp (it replicates FSDP2 shards)")

    def _check_welore(self) -> None:
        """What ``--welore`` needs: a compressed model to start from (the task's) and one of our optimizers."""
        if self.optim.method.peer:
            raise ValueError(
                f"--welore with --optimizer {self.optim.method.name}: the components' factors train with one of "
                "gradproj's optimizers or adamw"
            )

    def _check_fsdp(self) -> None:
        """What FSDP2 does not combine with, named with what to use instead."""
        from ..optim.registry import fsdp_capable

        method = self.optim.method
        if not method.supports_fsdp:
            raise ValueError(
                f"--fsdp with --optimizer {method.name}: it cannot step FSDP2-sharded parameters; use one of "
                f"{', '.join(fsdp_capable())} or adamw, or drop --fsdp (DDP under torchrun)"
            )
        if self.low_rank_comm:
            raise ValueError(
                "--low-rank-comm is DDP's (it replaces DDP's all-reduce); FSDP2 reduce-scatters each rank's rows of "
                "the gradient instead: drop one of --fsdp and --low-rank-comm"
            )
        if self.layerwise:
            raise ValueError(
                "--layerwise with --fsdp: not supported yet (FSDP2 hands over reduced gradient shards after backward, "
                "already 1/world of the gradients per rank); use --fsdp alone, or --layerwise with DDP or one process"
            )

    @property
    def weight_update(self) -> str:
        """How bf16 weights round each step (``--bf16-update``, or the measured default)."""
        from ..optim.precision import DEFAULT_BF16_UPDATE

        return self.bf16_update or DEFAULT_BF16_UPDATE

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 10)

    #: Fields a run resolves when it starts and records (None given: keep the recorded value on resume).
    RESOLVED_AT_START: ClassVar[tuple[str, ...]] = ("global_batch",)

    #: Default learning rates are the method's times this factor (and ``OTHER_LR`` for the rest, if set).
    LR_FACTOR: ClassVar[float] = 1.0
    OTHER_LR: ClassVar[float | None] = None
    #: what a command adds to an inherited field's help (the flags that field needs beside it there)
    FIELD_HELP: ClassVar[dict[str, str]] = {}

    def optimizer_spec(self, default_rank: int | None = None) -> OptimizerSpec:
        """The optimizer this run builds: its rates resolved (the method's defaults, scaled for
        fine-tuning) and its rank (``default_rank`` when none was given: the trainer's hidden / 4)."""
        spec, method = self.optim, self.optim.method
        if default_rank is not None:
            spec = spec.at_default_rank(default_rank)  # rank auto: "0.75x" of the state at that rank
        return replace(
            spec,
            lr=spec.lr if spec.lr is not None else method.lr * self.LR_FACTOR,
            other_lr=spec.other_lr if spec.other_lr is not None else (self.OTHER_LR or method.other_lr),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (config.json, a checkpoint's meta): the kind, every field, the optimizer nested."""
        return {"kind": type(self).__name__, **asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The config ``to_dict`` wrote (``kind`` ignored; a flat optimizer of older runs accepted)."""
        values = upgrade(values)
        return cls(**{k: v for k, v in values.items() if k != "kind"})

    def changed_on_resume(self, saved: dict[str, Any], resolved: dict[str, Any] | None = None) -> list[str]:
        """Settings that differ from a saved config and may not (lines 'name: saved -> now'). ``resolved``: what
        a setting the run left unset (None) resolved to when it started (``optim.rank``: the model's default),
        which a resumed run may name explicitly and which the message shows."""
        before, now = flatten(upgrade(saved)), flatten(self.to_dict())
        # the saved run's unset settings, as they resolved (left unset again, they are unchanged)
        defaults = {k: v for k, v in (resolved or {}).items() if before.get(k) is None and v is not None}
        before.update(defaults)
        return [
            f"{key}: {before[key]!r}{' (its default)' if key in defaults else ''} -> {value!r}"
            for key, value in now.items()
            # a setting newer than the saved run (absent from it) took its default: nothing to compare
            if key in before
            and before[key] != value
            and not (key in defaults and value is None)
            and not (key in _own(type(self)) and _resumable(type(self), key))
        ]


def _own(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def _resumable(cls: type, name: str) -> bool:
    return bool(meta(cls, name).get("resumable"))


def upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """A saved config in today's layout: runs saved before the optimizer was nested kept its options
    (``optimizer``, ``lr``, ...) at the top level."""
    if "optim" in values or "optimizer" not in values:
        return dict(values)
    names = {f.name for f in fields(OptimizerSpec)}
    flat = dict(values)
    optim = {"name": flat.pop("optimizer")}
    optim.update({k: flat.pop(k) for k in list(flat) if k in names})
    return {**flat, "optim": optim}
