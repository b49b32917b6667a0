"""The memory planner: weights, gradients, optimizer state and activations of a training config,
for gradproj's optimizers side by side with the registry's baselines: AdamW, 8-bit AdamW and LoRA at
comparable state (half the rank, as ``gradproj bench`` runs it).

How each number is obtained (docs/SCALE.md has the derivations and the measurements):

- The model is built on PyTorch's ``meta`` device (shapes, no memory), so any registered name or
  Hugging Face config works, up to 7B and beyond, in seconds.
- Optimizer state: the optimizer the trainer would build, on those meta parameters, and
  :func:`gradproj.optim.groups.state_bytes` per parameter: exact (equal to the bytes of a real
  run's state tensors; tested for every preset and projector). AdamW: two moments in the
  parameter dtype plus a 4-byte step per tensor, as torch allocates them.
- Gradients: every trainable parameter's gradient, in its dtype; layer-wise, the largest single
  gradient (each is stepped and freed before the next arrives; with ``grad_accum > 1`` see
  :mod:`gradproj.layerwise`: refresh steps hold full gradients, others low-rank sums).
- Activations (LLaMA-style decoders as in ``transformers``, SDPA attention): the bytes autograd
  saves for backward, counted tensor by tensor from the code, plus the loss head's backward
  temporaries; checked against PyTorch's ``MemTracker`` on CPU.
- FSDP (``fsdp=True``): FSDP2 shards weights, gradients and state on dim 0 across ``world_size``
  ranks, each rank holding ``ceil(m / world)`` rows of every tensor (the trainer's layout,
  :mod:`gradproj.train.sharded`). The peak adds the root unit's gathered weights (final norm and
  head: FSDP2 keeps them unsharded from their forward to the end of backward); a block's or the
  embedding's gathered weights live only while it runs.
- Peak: weights and state, plus the larger of the start of backward (activations, and the gradients
  of earlier micro-batches) and the optimizer step (gradients and the step's float32 temporaries
  for the largest parameter). The trainer measures it (``summary.json``'s ``"memory"``).

``gradproj memory`` takes the trainer's own flags (:class:`Setup.from_config`), so a plan and a
``gradproj pretrain`` with the same flags describe the same run; every run records both.

Example:
    >>> plans = plan(model="llama-60m", optimizer="galore_adamw", rank=128, batch=1, seq_len=256)
    >>> [p.method for p in plans]
    ['galore_adamw', 'adamw', 'adamw8bit', 'lora-peft']
    >>> plans[0].optimizer < plans[1].optimizer
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from .architectures import build_causal_lm, check_rank, default_rank, root_parameters
from .optim.build import OptimizerSpec, build_optimizer
from .optim.engine import ProjectedOptimizer
from .optim.external import lora_rank
from .optim.groups import ATTENTION_AND_MLP, group_state_bytes, state_bytes, target_weights
from .optim.precision import WEIGHT_DTYPES as DTYPES
from .optim.ranks import auto_rank
from .optim.registry import baseline_methods, get_method


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device for one method; ``total`` is the four kinds' plain sum, ``peak`` the most held at once
    (gradients and activations coexist only partly, and the step adds temporaries of its own)."""

    method: str
    weights: int
    gradients: int
    optimizer: int
    activations: int
    note: str = ""
    peak: int = 0  #: the most bytes alive at once (see the module docstring)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class Setup:
    """What the plan is for (the ``gradproj memory`` options)."""

    model: str = "llama-7b"
    optimizer: str = "galore_adamw8bit"
    rank: int | None = None  # None: a quarter of the hidden size
    layerwise: bool = False
    batch: int = 1
    seq_len: int = 2048
    dtype: str = "bf16"
    activation_checkpointing: bool = False
    world_size: int = 1
    fsdp: bool = False
    fsdp_replicate: int = 1  # HSDP: replicas of the shards (each rank holds 1 / (world / replicate) of the rows)
    vocab_size: int = 32000
    projector: str | None = None  # None: the optimizer's own (random for APOLLO, else svd)
    proj_type: str = "std"
    target_modules: str | None = None  # None: attention and MLP linears (the trainer's default)
    grad_accum: int = 1
    bf16_update: str = "nearest"  # kahan keeps a bf16 buffer per weight in the state
    optim: Any = None  # the trainer's OptimizerSpec, when planned from its config (wins over the fields above)

    @classmethod
    def from_config(cls, config: Any, *, vocab_size: int | None = None, world_size: int = 1) -> Setup:
        """The plan of a trainer config (:class:`gradproj.train.config.PretrainConfig`) on ``world_size``
        ranks: the same flags."""
        return cls(
            model=getattr(config, "model_name", None) or config.model or "",  # pre-training: --init-from's too
            optimizer=config.optim.name,
            rank=config.optim.rank,
            layerwise=config.layerwise,
            batch=config.batch_size,
            seq_len=getattr(config, "seq_len", None) or config.max_length,  # fine-tuning: examples' length
            dtype=config.dtype,
            activation_checkpointing=config.activation_checkpointing,
            world_size=world_size,
            fsdp=config.fsdp,
            fsdp_replicate=config.fsdp_replicate,
            vocab_size=vocab_size or config.vocab_size,
            grad_accum=config.grad_accum,
            bf16_update=config.weight_update if config.dtype == "bf16" else "nearest",
            optim=config.optim,
        )


def meta_model(setup: Setup) -> nn.Module:
    """The model on the meta device, in the setup's dtype: shapes without memory."""
    if setup.dtype not in DTYPES:
        raise ValueError(f"dtype={setup.dtype!r} is not one of {', '.join(DTYPES)}")
    with torch.device("meta"):
        model = build_causal_lm(setup.model, vocab_size=setup.vocab_size, seq_len=setup.seq_len)
    return model.to(DTYPES[setup.dtype])


def _rows(p: torch.Tensor, setup: Setup) -> float:
    """The fraction of ``p`` one rank holds: FSDP2 shards dim 0, padded to a multiple of world."""
    shards = setup.world_size // setup.fsdp_replicate
    if not setup.fsdp or shards <= 1:
        return 1.0
    rows = p.shape[0] if p.dim() else 1
    return math.ceil(rows / shards) / rows


def optimizer_state_bytes(model: nn.Module, setup: Setup, method: str) -> int:
    """Exact state bytes of the optimizer the trainer builds for ``method`` (a registry name)."""
    optimizer = build_optimizer(model, _spec(model, setup, method), bf16_update=_rounding(setup, method))
    total = 0.0
    for group in optimizer.param_groups:
        if isinstance(optimizer, ProjectedOptimizer) and auto_rank(group):  # one process: no FSDP2 rows
            total += group_state_bytes(group, optimizer.rule.name)
            continue
        for p in group["params"]:
            if isinstance(optimizer, ProjectedOptimizer):
                size = state_bytes(p, group, optimizer.rule.name)
            else:  # torch.optim.AdamW: exp_avg and exp_avg_sq like p, a float32 step tensor
                size = 2 * p.numel() * p.element_size() + 4
            total += size * _rows(p, setup)
    return int(total)


def _rounding(setup: Setup, method: str) -> str:
    return setup.bf16_update if not get_method(method).peer else "nearest"


def _spec(model: nn.Module, setup: Setup, method: str) -> Any:

    if setup.optim is not None:
        spec = replace(setup.optim, name=method).at_default_rank(default_rank(model))
        # a baseline of a rank-auto run is planned at the fixed rank its budget is measured against
        return spec if method == setup.optimizer else spec.fixed_rank_twin(default_rank(model))
    return OptimizerSpec(
        name=method,
        rank=setup.rank if setup.rank is not None else default_rank(model),
        projector=setup.projector,
        proj_type=setup.proj_type,
        target_modules=setup.target_modules or ATTENTION_AND_MLP,
    )


def gradient_bytes(model: nn.Module, setup: Setup) -> int:
    """Gradients alive at once: all of them, or the largest one with layer-wise updates (with
    ``grad_accum > 1`` a refresh step keeps every full gradient until the last micro-batch)."""
    sizes = [p.numel() * p.element_size() * _rows(p, setup) for p in model.parameters() if p.requires_grad]
    return int(max(sizes) if setup.layerwise and setup.grad_accum == 1 else sum(sizes))


#: float32 bytes per element of the largest parameter that one step holds besides the state: the
#: update (and, for bf16 weights, the float32 copies of the weight and the gradient, and the random bits)
STEP_TEMPORARIES = {"fp32": 8, "bf16": 16}


def peak_bytes(model: nn.Module, setup: Setup, weights: int, gradients: int, state: int, activations: int) -> int:
    """The planned peak: weights and state, plus the largest of the start of backward (activations and
    the gradients earlier micro-batches left), its end (gradients, and with checkpointing the first
    block recomputed) and the step (gradients and its temporaries); under FSDP2 backward also holds
    the root unit's gathered weights."""
    held = gradients if setup.grad_accum > 1 else 0
    gathered = gathered_root_bytes(model) if setup.fsdp else 0
    largest = max((p.numel() * _rows(p, setup) for p in model.parameters() if p.requires_grad), default=0)
    temporaries = int(STEP_TEMPORARIES[setup.dtype] * largest)
    config = getattr(model, "config", None)
    recompute = recompute_bytes(config, setup) if planned_activations(model, setup) is not None else 0
    backward = max(activations + held, gradients + recompute) + gathered
    return weights + state + max(backward, gradients + temporaries)


def weight_bytes(model: nn.Module, setup: Setup) -> int:
    """This rank's weights (its shards under FSDP2)."""
    return int(sum(p.numel() * p.element_size() * _rows(p, setup) for p in model.parameters()))


def gathered_root_bytes(model: nn.Module) -> int:
    """Bytes of the root FSDP2 unit's weights, whole (:func:`gradproj.architectures.root_parameters`)."""
    return sum(p.numel() * p.element_size() for p in root_parameters(model))


def activation_bytes(config: Any, setup: Setup) -> int:
    """Peak activation bytes of one forward/backward of a LLaMA-style ``transformers`` decoder.

    Per token, with element size ``e`` and ``h``, ``f``, ``a`` heads, ``h_kv`` = h * kv_heads / a:

    - each RMSNorm saves its float32 input copy (``4h``; the input itself when e = 4), ``rsqrt``
      (4 bytes), its normalized ``e*h`` and its output ``e*h``: ``(4 + 2e) h + 4``;
    - attention saves the rotated q and k, v and the output (``e (2h + 2 h_kv)``) and SDPA's
      float32 log-sum-exp (``4a``); RoPE's products save only cos/sin, shared by all layers;
    - the SwiGLU MLP saves gate, silu(gate), up and their product: ``4 e f``;
    - the model saves token ids and labels (16 bytes), cos/sin (``2 e d / batch``, d = h / a), the
      final norm, and the loss's float32 log-softmax (``4V``); its backward adds two float32
      ``V``-wide temporaries.

    With activation checkpointing each layer keeps only its input (``e h``) and one layer's
    activations are alive again while it is recomputed.
    """
    per_layer, inputs, model_level, head_temporaries = _per_token_terms(config, setup)
    if setup.activation_checkpointing:
        per_token = inputs + model_level + max(head_temporaries, per_layer)
    else:
        per_token = config.num_hidden_layers * per_layer + model_level + head_temporaries
    return int(per_token * setup.batch * setup.seq_len)


def recompute_bytes(config: Any, setup: Setup) -> int:
    """With activation checkpointing, what backward still holds beside the gradients when it reaches
    the first block: every block's saved input and that block's recomputed activations."""
    per_layer, inputs, _, _ = _per_token_terms(config, setup)
    return int((inputs + per_layer) * setup.batch * setup.seq_len) if setup.activation_checkpointing else 0


def _per_token_terms(config: Any, setup: Setup) -> tuple[float, float, float, float]:
    """Bytes per token: one block's saved activations, every block's input (what checkpointing keeps),
    the model level and the loss head's backward temporaries (see :func:`activation_bytes`)."""
    e = torch.tensor([], dtype=DTYPES[setup.dtype]).element_size()
    h, f, a = config.hidden_size, config.intermediate_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or a
    h_kv, d, layers, vocab = h * kv // a, h // a, config.num_hidden_layers, config.vocab_size
    norm = (4 + 2 * e) * h + 4
    per_layer = 2 * norm + e * (2 * h + 2 * h_kv) + 4 * a + 4 * e * f
    model_level = 16 + 2 * e * d / setup.batch + norm + 4 * vocab
    return per_layer, layers * e * h, model_level, 2 * 4 * vocab


def lora_plan(model: nn.Module, setup: Setup, activations: int, method: str) -> MemoryPlan:
    """LoRA as the bench builds it (:func:`gradproj.optim.external.lora_rank`: the rank whose Adam state
    matches GaLore's) on the same targets (peft defaults: float32 adapters, AdamW on them, everything
    else frozen). Activations are taken equal to full training's (not modelled)."""

    rank = lora_rank(_spec(model, setup, "galore_adamw").fixed_rank_twin(default_rank(model)).rank)
    targets = target_weights(model, setup.target_modules or ATTENTION_AND_MLP).values()
    adapters = sum(rank * (w.shape[0] + w.shape[1]) for w in targets)
    if setup.fsdp:
        adapters = math.ceil(adapters / setup.world_size)
    weights, gradients, state = (
        weight_bytes(model, setup) + 4 * adapters,
        4 * adapters,
        2 * 4 * adapters + 8 * len(targets),
    )
    return MemoryPlan(
        method=method,
        weights=weights,
        gradients=gradients,
        optimizer=state,
        activations=activations,
        note=f"rank {rank}; adapters only are trained",
        peak=weights + state + activations + gradients,
    )


def plan(**options: Any) -> list[MemoryPlan]:
    """Plans for ``options['optimizer']`` and the baselines; options are :class:`Setup`'s fields."""
    return plan_setup(Setup(**options))


def plan_setup(setup: Setup) -> list[MemoryPlan]:
    """Plans for ``setup.optimizer`` and the baselines (:func:`plan` with a :class:`Setup`)."""
    if setup.world_size < 1 or setup.batch < 1 or setup.seq_len < 1:
        raise ValueError("world_size, batch and seq_len must be >= 1")
    model = meta_model(setup)
    spec = _spec(model, setup, setup.optimizer)
    if spec.projected and spec.method.fixed_rank is None and isinstance(spec.rank, int):
        check_rank(model, spec.target_modules, spec.rank)
    methods = (setup.optimizer, *(b.name for b in baseline_methods() if b.name != setup.optimizer))
    return [plan_model(model, setup, method) for method in methods]


def plan_model(model: nn.Module, setup: Setup, method: str | None = None) -> MemoryPlan:
    """The plan of ``method`` (default: the setup's) on ``model``, whose parameters may be on the meta
    device (the planner) or real (the trainer, before its first step: optimizer state is created lazily)."""
    method = method or setup.optimizer
    if get_method(method).kind == "lora":  # counted from the shapes: building peft's adapters would change the model
        return lora_plan(model, setup, planned_activations(model, setup) or 0, method)
    rank = _spec(model, setup, method).resolved_rank
    notes = [f"rank {rank}"] if rank is not None and get_method(method).uses_rank else []
    if setup.layerwise:
        notes.append("layer-wise")
    if setup.dtype == "bf16":
        notes.append(f"bf16 update {_rounding(setup, method)}")
    weights, gradients = weight_bytes(model, setup), gradient_bytes(model, setup)
    state, activations = optimizer_state_bytes(model, setup, method), planned_activations(model, setup) or 0
    return MemoryPlan(
        method=method,
        weights=weights,
        gradients=gradients,
        optimizer=state,
        activations=activations,
        note=", ".join(notes),
        peak=peak_bytes(model, setup, weights, gradients, state, activations),
    )


#: ``model_type`` of the decoders whose activations :func:`activation_bytes` counts (transformers' LLaMA code)
MODELLED_DECODERS = ("llama",)


def planned_activations(model: nn.Module, setup: Setup) -> int | None:
    """:func:`activation_bytes` for a LLaMA-style decoder; None for models it does not model (encoders)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in MODELLED_DECODERS:
        return None
    return activation_bytes(config, setup)


def format_plans(plans: list[MemoryPlan], setup: Setup) -> str:
    """A table of each method's bytes (GiB, or MiB when AdamW's peak is under 1 GiB), the requested
    method first: the four kinds, their plain sum, and the peak, which the ratio to AdamW compares."""
    adamw = next(p for p in plans if p.method == "adamw")
    baseline = adamw.peak or adamw.total
    unit, size = ("GiB", 2**30) if baseline >= 2**30 else ("MiB", 2**20)
    columns = "".join(f"{name:>9}" for name in ("weights", "grads", "optim", "activ.", "sum", "peak"))
    head = f"{'method':<18}{columns}{'vs AdamW':>10}  note"
    lines = [head]
    for p in plans:
        peak = p.peak or p.total
        values = (p.weights, p.gradients, p.optimizer, p.activations, p.total, peak)
        cells = "".join(f"{x / size:>9.2f}" for x in values)
        lines.append(f"{p.method:<18}{cells}{peak / baseline:>9.0%}   {p.note}")
    scope = f"per rank of {setup.world_size} (FSDP2)" if setup.fsdp else "per device"
    ckpt = ", activation checkpointing" if setup.activation_checkpointing else ""
    lines.append(
        f"{unit} {scope}; {setup.model} in {setup.dtype}, batch {setup.batch} x {setup.seq_len} tokens{ckpt}. "
        "Sum: the four kinds added up. Peak: the most held at once, which the trainer measures (weights and "
        "state, plus the larger of backward's activations and the step's gradients and float32 temporaries), "
        "so it can be above or below the sum; vs AdamW compares peaks."
    )
    return "\n".join(lines)
