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
  ranks, each rank holding ``ceil(m / world)`` rows of every tensor.

Example:
    >>> plans = plan(model="llama-60m", optimizer="galore_adamw", rank=128, batch=1, seq_len=256)
    >>> [p.method for p in plans]
    ['galore_adamw', 'adamw', 'adamw8bit', 'lora-peft']
    >>> plans[0].optimizer < plans[1].optimizer
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .optim.groups import ATTENTION_AND_MLP, target_weights
from .optim.registry import baseline_methods, get_method

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device for one method; ``total`` is their sum (an upper bound: gradients and
    activations coexist only partly during backward)."""

    method: str
    weights: int
    gradients: int
    optimizer: int
    activations: int
    note: str = ""

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
    vocab_size: int = 32000
    projector: str | None = None  # None: the optimizer's own (random for APOLLO, else svd)
    proj_type: str = "std"
    target_modules: str | None = None  # None: attention and MLP linears (the trainer's default)


def meta_model(setup: Setup) -> nn.Module:
    """The model on the meta device, in the setup's dtype: shapes without memory."""
    from .train.models import build_causal_lm

    if setup.dtype not in DTYPES:
        raise ValueError(f"dtype={setup.dtype!r} is not one of {', '.join(DTYPES)}")
    with torch.device("meta"):
        model = build_causal_lm(setup.model, vocab_size=setup.vocab_size, seq_len=setup.seq_len)
    return model.to(DTYPES[setup.dtype])


def _rows(p: torch.Tensor, setup: Setup) -> float:
    """The fraction of ``p`` one rank holds: FSDP2 shards dim 0, padded to a multiple of world."""
    if not setup.fsdp or setup.world_size == 1:
        return 1.0
    rows = p.shape[0] if p.dim() else 1
    return math.ceil(rows / setup.world_size) / rows


def optimizer_state_bytes(model: nn.Module, setup: Setup, method: str) -> int:
    """Exact state bytes of the optimizer the trainer builds for ``method`` (a registry name)."""
    from .optim.build import build_optimizer
    from .optim.engine import ProjectedOptimizer
    from .optim.groups import state_bytes

    optimizer = build_optimizer(model, _spec(model, setup, method))
    total = 0.0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if isinstance(optimizer, ProjectedOptimizer):
                size = state_bytes(p, group, optimizer.rule.name)
            else:  # torch.optim.AdamW: exp_avg and exp_avg_sq like p, a float32 step tensor
                size = 2 * p.numel() * p.element_size() + 4
            total += size * _rows(p, setup)
    return int(total)


def _spec(model: nn.Module, setup: Setup, method: str) -> Any:
    from .optim.build import OptimizerSpec
    from .train.models import default_rank

    return OptimizerSpec(
        name=method,
        rank=setup.rank if setup.rank is not None else default_rank(model),
        projector=setup.projector,
        proj_type=setup.proj_type,
        target_modules=setup.target_modules or ATTENTION_AND_MLP,
    )


def gradient_bytes(model: nn.Module, setup: Setup) -> int:
    """Gradients alive at once: all of them, or the largest one with layer-wise updates."""
    sizes = [p.numel() * p.element_size() * _rows(p, setup) for p in model.parameters() if p.requires_grad]
    return int(max(sizes) if setup.layerwise else sum(sizes))


def weight_bytes(model: nn.Module, setup: Setup) -> int:
    return int(sum(p.numel() * p.element_size() * _rows(p, setup) for p in model.parameters()))


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
    e = torch.tensor([], dtype=DTYPES[setup.dtype]).element_size()
    h, f, a = config.hidden_size, config.intermediate_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or a
    h_kv, d, layers, vocab = h * kv // a, h // a, config.num_hidden_layers, config.vocab_size
    norm = (4 + 2 * e) * h + 4
    per_layer = 2 * norm + e * (2 * h + 2 * h_kv) + 4 * a + 4 * e * f
    model_level = 16 + 2 * e * d / setup.batch + norm + 4 * vocab
    head_temporaries = 2 * 4 * vocab
    if setup.activation_checkpointing:
        per_token = layers * e * h + model_level + max(head_temporaries, per_layer)
    else:
        per_token = layers * per_layer + model_level + head_temporaries
    return int(per_token * setup.batch * setup.seq_len)


def lora_plan(model: nn.Module, setup: Setup, activations: int, method: str) -> MemoryPlan:
    """LoRA as the bench builds it (:func:`gradproj.optim.build.lora_rank`: the rank whose Adam state
    matches GaLore's) on the same targets (peft defaults: float32 adapters, AdamW on them, everything
    else frozen). Activations are taken equal to full training's (not modelled)."""
    from .optim.build import lora_rank
    from .train.models import default_rank

    rank = lora_rank(setup.rank if setup.rank is not None else default_rank(model))
    targets = target_weights(model, setup.target_modules or ATTENTION_AND_MLP).values()
    adapters = sum(rank * (w.shape[0] + w.shape[1]) for w in targets)
    if setup.fsdp:
        adapters = math.ceil(adapters / setup.world_size)
    return MemoryPlan(
        method=method,
        weights=weight_bytes(model, setup) + 4 * adapters,
        gradients=4 * adapters,
        optimizer=2 * 4 * adapters + 4 * 2 * len(targets),
        activations=activations,
        note=f"rank {rank}; adapters only are trained",
    )


def plan(**options: Any) -> list[MemoryPlan]:
    """Plans for ``options['optimizer']`` and the baselines; options are :class:`Setup`'s fields."""
    setup = Setup(**options)
    if setup.world_size < 1 or setup.batch < 1 or setup.seq_len < 1:
        raise ValueError("world_size, batch and seq_len must be >= 1")
    model = meta_model(setup)
    spec = _spec(model, setup, setup.optimizer)
    if spec.projected and spec.method.fixed_rank is None:
        from .train.models import check_rank

        check_rank(model, spec.target_modules, spec.rank)
    activations = activation_bytes(model.config, setup) if _is_llama_like(model.config) else 0
    plans = []
    for method in (setup.optimizer, *(b.name for b in baseline_methods() if b.name != setup.optimizer)):
        if get_method(method).kind == "lora":
            plans.append(lora_plan(model, setup, activations, method))
            continue
        rank = _spec(model, setup, method).resolved_rank
        notes = [f"rank {rank}"] if rank is not None and get_method(method).uses_rank else []
        if setup.layerwise:
            notes.append("layer-wise")
        plans.append(
            MemoryPlan(
                method=method,
                weights=weight_bytes(model, setup),
                gradients=gradient_bytes(model, setup),
                optimizer=optimizer_state_bytes(model, setup, method),
                activations=activations,
                note=", ".join(notes),
            )
        )
    return plans


def _is_llama_like(config: Any) -> bool:
    return all(hasattr(config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads"))


def format_plans(plans: list[MemoryPlan], setup: Setup) -> str:
    """A table in GiB, the requested method first, ratios to AdamW's total."""
    adamw = next(p for p in plans if p.method == "adamw")
    head = f"{'method':<18}{'weights':>9}{'grads':>9}{'optim':>9}{'activ.':>9}{'total':>9}{'vs AdamW':>10}  note"
    lines = [head]
    for p in plans:
        gib = [x / 2**30 for x in (p.weights, p.gradients, p.optimizer, p.activations, p.total)]
        cells = "".join(f"{x:>9.2f}" for x in gib)
        lines.append(f"{p.method:<18}{cells}{p.total / adamw.total:>9.0%}   {p.note}")
    scope = f"per rank of {setup.world_size} (FSDP2)" if setup.fsdp else "per device"
    ckpt = ", activation checkpointing" if setup.activation_checkpointing else ""
    lines.append(
        f"GiB {scope}; {setup.model} in {setup.dtype}, batch {setup.batch} x {setup.seq_len} tokens{ckpt}. "
        "Total is an upper bound (gradients and activations overlap only partly)."
    )
    return "\n".join(lines)
