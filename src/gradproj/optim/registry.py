"""One registry of methods: every optimizer gradproj can build by name, ours and the peers'.

A :class:`Method` says how a name becomes an optimizer (a preset and its fixed options, torch's AdamW,
a peer package's class, or LoRA), its default learning rates and scale, and what it can do. The
trainer's ``--optimizer`` choices, the bench line-up, the demo, the memory planner's baselines, the
Hugging Face integration and the test parametrization all read this table; nothing else lists
methods. :func:`gradproj.optim.build.build_optimizer` turns a method and a model into an optimizer.

Adding a method is one entry here (and, for a new algorithm, its preset in
:mod:`gradproj.optim.presets`); from outside gradproj, :func:`register` adds both.

Example:
    >>> get_method("apollo_mini").fixed_rank, get_method("apollo_mini").preset
    (1, 'apollo_adamw')
    >>> [m.name for m in trainer_methods()][:3]
    ['adamw', 'adamw8bit', 'galore_adamw']
    >>> get_method("sgd")
    Traceback (most recent call last):
    ...
    ValueError: unknown optimizer 'sgd'; valid: adamw, adamw8bit, galore_adamw, ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .preset_table import PRESETS

Kind = Literal["preset", "torch", "peer", "lora"]


@dataclass(frozen=True, kw_only=True)
class Method:
    """How one name becomes an optimizer, its defaults and its capabilities.

    ``kind``: ``preset`` (a gradproj preset, projected or not), ``torch`` (``torch.optim.AdamW``),
    ``peer`` (another package's optimizer, at ``cls``) or ``lora`` (peft adapters trained with AdamW).
    """

    name: str
    kind: Kind
    summary: str  #: one line, for tables and ``--help``
    preset: str | None = None  #: a key of :data:`gradproj.optim.presets.PRESETS` (ours)
    cls: str | None = None  #: ``module:Class`` of a torch or peer optimizer
    package: str | None = None  #: the PyPI distribution a peer needs (``pip install ...``)
    projected: bool = True  #: whether attention/MLP matrices get a ``rank`` (a projected group)
    #: fixed keys of the projected group (a peer's in its own key names)
    group_options: dict[str, Any] = field(default_factory=dict)
    constructor: dict[str, Any] = field(default_factory=dict)  #: fixed constructor keywords
    peer_keys: dict[str, str] = field(default_factory=dict)  #: our group key -> the peer's name for it
    lr: float = 1e-2  #: default learning rate of the projected (attention/MLP) matrices
    other_lr: float = 1e-2  #: default learning rate of embeddings, norms and head
    scale: float | None = None  #: default update scale (None: the preset's own default)
    variant_of: str | None = None  #: a bench variant of this method (fixed options, no CLI name of its own)
    demo: bool = False  #: one of ``gradproj demo``'s methods
    baseline: bool = False  #: set beside every plan by ``gradproj memory``
    #: a peer that steps only the targeted matrices; torch's AdamW steps the rest (as the Alice/RACS paper does)
    adamw_on_rest: bool = False
    supports_layerwise: bool = True  #: can step inside backward (gradproj.layerwise)
    eight_bit: str | None = None  #: the same method with 8-bit moments (what the pre-flight check may suggest)
    resumable: bool = True  #: its state dict loads with ``weights_only=True`` (exact resume)
    #: the model's output head and input embedding (``"head"``, ``"embedding"``) moved from the rest into projected
    #: groups of their own with these options, at the matrices' rate (SCALE's head momentum and embedding scaling)
    own_groups: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def peer(self) -> bool:
        """Another package's implementation (or LoRA), not gradproj's."""
        return self.kind in ("peer", "lora")

    @property
    def supports_fsdp(self) -> bool:
        """Can step FSDP2 (``fully_shard``) parameters: torch's AdamW, and our presets whose rule, projector
        and residual policy have a row-sharded form (:func:`gradproj.optim.validate.sharding_blocker`)."""
        if self.kind == "torch":
            return True
        if self.kind != "preset" or self.preset is None:
            return False
        from ..rules import make_rule
        from .validate import sharding_blocker

        preset = PRESETS[self.preset]
        group = {"rank": 1, **preset.projection_defaults(), **self.group_options}
        return sharding_blocker(group, make_rule(group["rule"] or preset.RULE)) is None

    @property
    def external(self) -> bool:
        """Not gradproj's engine: torch's AdamW, a peer's optimizer or LoRA."""
        return self.kind != "preset"

    @property
    def fixed_rank(self) -> int | str | None:
        """The rank this method always uses (APOLLO-Mini: 1; ``"auto"``: allocated within a budget, by
        default the state at ``--rank``), or None when ``--rank`` decides."""
        rank = self.group_options.get("rank")
        return rank if rank is None or rank == "auto" else int(rank)

    @property
    def uses_rank(self) -> bool:
        """Whether ``--rank`` changes the method (RACS keeps no basis: its matrices ignore the rank; COSMOS's
        rule keeps its own)."""
        if not self.projected:
            return False
        if self.default_option("projector") != "identity":
            return True
        from ..rules import make_rule

        assert self.preset is not None
        return make_rule(self.default_option("rule") or PRESETS[self.preset].RULE).uses_rank

    def default_scale(self) -> float | None:
        """The scale a projected group gets unless told otherwise (None: the method has no scale)."""
        if not self.projected:
            return None
        if self.scale is not None:
            return self.scale
        return self.default_option("scale")

    def default_option(self, key: str) -> Any:
        """A projected group's ``key`` unless told otherwise: fixed by the method, else its preset's
        default (:meth:`~gradproj.optim.engine.ProjectedOptimizer.projection_defaults`); None without one."""
        if key in self.group_options:
            return self.group_options[key]
        if self.preset is None or not self.projected:
            return None
        return PRESETS[self.preset].projection_defaults()[key]

    def module(self) -> str | None:
        """The module that must import for this method to run (a peer's), or None."""
        if self.kind == "lora":
            return "peft"
        return self.cls.split(":")[0] if self.kind == "peer" and self.cls else None


_GALORE_KEYS = {"rank": "rank", "update_proj_gap": "update_proj_gap", "scale": "scale", "proj_type": "proj_type"}
_PEER = {"kind": "peer", "supports_layerwise": False, "resumable": False}
_FULL_PEER = {**_PEER, "projected": False, "lr": 1e-3}
_BF16_NS = {"ns_dtype": "bfloat16"}

# Learning rates: the best of the per-group sweep on Shakespeare (docs/BENCHMARKS.md, llama-5m); the
# GaLore paper uses 1e-2 for GaLore and 1e-3 for AdamW everywhere.
_ENTRIES = (
    Method(
        name="adamw",
        kind="torch",
        summary="torch.optim.AdamW (its fused kernel on CPU and CUDA)",
        cls="torch.optim:AdamW",
        preset="galore_adamw",  # layer-wise / FSDP: the engine without ranks, torch's AdamW bit for bit
        constructor={"eps": 1e-8},
        projected=False,
        lr=1e-3,
        demo=True,
        baseline=True,
        eight_bit="adamw8bit",
    ),
    Method(
        name="adamw8bit",
        kind="preset",
        summary="AdamW with block-wise 8-bit moments (gradproj)",
        preset="galore_adamw8bit",
        projected=False,
        lr=1e-3,
        baseline=True,
    ),
    Method(name="galore_adamw", kind="preset", summary="GaLore", preset="galore_adamw", demo=True,
           eight_bit="galore_adamw8bit"),
    Method(name="galore_adamw8bit", kind="preset", summary="GaLore, 8-bit moments", preset="galore_adamw8bit"),
    Method(
        name="galore_adafactor",
        kind="preset",
        summary="GaLore around Adafactor, fixed lr (relative_step and scale_parameter off)",
        preset="galore_adafactor",
        constructor={"relative_step": False, "scale_parameter": False},
    ),
    Method(name="fira_adamw", kind="preset", summary="Fira", preset="fira_adamw", lr=3e-3, demo=True),
    Method(name="apollo_adamw", kind="preset", summary="APOLLO", preset="apollo_adamw"),
    Method(
        name="apollo_mini",
        kind="preset",
        summary="APOLLO-Mini: rank 1, tensor-wise scaling",
        preset="apollo_adamw",
        group_options={"rank": 1, "scale_type": "tensor"},
        scale=128.0,
        lr=3e-3,
        demo=True,
    ),
    Method(name="alice", kind="preset", summary="Alice: tracked eigenbasis, switching, compensation",
           preset="alice", lr=3e-3, other_lr=3e-2),
    Method(name="alice0", kind="preset", summary="Alice-0: Alice without tracking", preset="alice0", lr=3e-3,
           other_lr=3e-2),
    Method(name="racs", kind="preset", summary="RACS: row- and column-scaled SGD on the matrices", preset="racs",
           lr=3e-2, other_lr=3e-2),
    Method(name="cosmos", kind="preset", summary="COSMOS: SOAP in a tracked leading subspace, Muon on the rest",
           preset="cosmos", lr=1e-3, other_lr=3e-2),
    Method(name="gradnorm_lorp", kind="preset",
           summary="GradNormLoRP: GaLore on the direction of each weight-normalised row", preset="gradnorm_lorp",
           eight_bit="gradnorm_lorp8bit"),
    Method(name="gradnorm_lorp8bit", kind="preset", summary="GradNormLoRP, 8-bit moments", preset="gradnorm_lorp8bit"),
    # the Muon family runs its Newton-Schulz iterations in bfloat16, as torch.optim.Muon does
    Method(name="muon", kind="preset", summary="Muon: orthogonalized Nesterov momentum (torch.optim.Muon's step)",
           preset="muon", group_options=_BF16_NS, lr=3e-3, other_lr=3e-2, eight_bit="muon8bit"),
    Method(name="muon8bit", kind="preset", summary="Muon, 8-bit momentum", preset="muon8bit", group_options=_BF16_NS,
           lr=3e-3, other_lr=3e-2),
    Method(name="subspace_muon", kind="preset", summary="Muon in GaLore's rank-r basis (r x n momentum)",
           preset="subspace_muon", group_options=_BF16_NS, lr=3e-3, other_lr=3e-2),
    Method(name="scale", kind="preset", summary="SCALE: column-normalized SGD, momentum on the head only",
           preset="scale", lr=1e-3, other_lr=3e-2,
           own_groups={"head": {"momentum": 0.9}, "embedding": {"norm_dim": 0}}),
    # bench variants: a method above with one option fixed
    *(
        Method(name=f"galore_adamw+{v}", kind="preset", summary=f"GaLore, {k}={v}", preset="galore_adamw",
               group_options={k: v}, variant_of="galore_adamw")
        for k, v in (("projector", "rsvd"), ("projector", "dct"), ("projector", "random"), ("on_refresh", "rotate"),
                     ("refresh_offset", "staggered"), ("update_proj_gap", "auto"))
    ),
    Method(name="galore_adamw+auto_rank", kind="preset", summary="GaLore, rank=auto (the state of --rank)",
           preset="galore_adamw", group_options={"rank": "auto"}, variant_of="galore_adamw"),
    Method(name="galore_adamw+auto+auto_rank", kind="preset", summary="GaLore, rank=auto and update_proj_gap=auto",
           preset="galore_adamw", group_options={"rank": "auto", "update_proj_gap": "auto"},
           variant_of="galore_adamw"),
    Method(name="alice+auto", kind="preset", summary="Alice, update_proj_gap=auto", preset="alice",
           group_options={"update_proj_gap": "auto"}, variant_of="alice", lr=3e-3, other_lr=3e-2),
    # Stable-SPAM's gradient policy (gradproj.optim.spikes) on a method: every group's gradients
    Method(name="adamw+stable_spam", kind="preset", summary="AdamW (the engine's), spike_policy=stable_spam",
           preset="galore_adamw", constructor={"eps": 1e-8, "spike_policy": "stable_spam"}, projected=False, lr=1e-3,
           variant_of="adamw"),
    Method(name="galore_adamw8bit+stable_spam", kind="preset", summary="GaLore 8-bit, spike_policy=stable_spam",
           preset="galore_adamw8bit", constructor={"spike_policy": "stable_spam"}, variant_of="galore_adamw8bit"),
    Method(name="alice+stable_spam", kind="preset", summary="Alice, spike_policy=stable_spam", preset="alice",
           constructor={"spike_policy": "stable_spam"}, variant_of="alice", lr=3e-3, other_lr=3e-2),
    Method(name="adamw+loop", kind="torch", summary="torch.optim.AdamW, for-loop (torch's default on a CPU)",
           cls="torch.optim:AdamW", constructor={"eps": 1e-8, "fused": False, "foreach": False}, projected=False,
           lr=1e-3, variant_of="adamw", supports_layerwise=False),
    Method(name="galore_adamw+loop", kind="preset", summary="GaLore, foreach=False (the per-parameter step)",
           preset="galore_adamw", constructor={"foreach": False}, variant_of="galore_adamw"),
    Method(name="galore_adamw+compile", kind="preset", summary="GaLore, compile=True (the fast path compiled)",
           preset="galore_adamw", constructor={"compile": True}, variant_of="galore_adamw"),
    Method(name="fira_adamw+loop", kind="preset", summary="Fira, foreach=False (the per-parameter step)",
           preset="fira_adamw", constructor={"foreach": False}, variant_of="fira_adamw", lr=3e-3),
    Method(name="apollo_adamw+loop", kind="preset", summary="APOLLO, foreach=False (the per-parameter step)",
           preset="apollo_adamw", constructor={"foreach": False}, variant_of="apollo_adamw"),
    Method(name="fira_adamw+rotate", kind="preset", summary="Fira, on_refresh=rotate", preset="fira_adamw",
           group_options={"on_refresh": "rotate"}, variant_of="fira_adamw", lr=3e-3),
    # peers
    Method(name="adamw8bit-bnb", summary="bitsandbytes AdamW8bit", cls="bitsandbytes.optim:AdamW8bit",
           package="bitsandbytes", **_FULL_PEER),  # type: ignore[arg-type]
    Method(name="adamw8bit-torchao", summary="torchao AdamW8bit", cls="torchao.optim:AdamW8bit",
           package="torchao", **_FULL_PEER),  # type: ignore[arg-type]
    Method(name="lora-peft", kind="lora", summary="peft LoRA, rank/2, alpha 2r", package="peft", lr=1e-2,
           baseline=True, supports_layerwise=False),
    Method(name="galore-torch", summary="galore-torch GaLoreAdamW", cls="galore_torch:GaLoreAdamW",
           package="galore-torch", peer_keys=_GALORE_KEYS, scale=0.25,
           **_PEER),  # type: ignore[arg-type]
    Method(name="fira", summary="fira FiraAdamW", cls="fira:FiraAdamW", package="fira",
           peer_keys={**_GALORE_KEYS, "scale": "alpha"}, scale=1.0, lr=3e-3,
           **_PEER),  # type: ignore[arg-type]
    Method(name="apollo-torch", summary="apollo-torch APOLLOAdamW", cls="apollo_torch:APOLLOAdamW",
           package="apollo-torch", peer_keys=_GALORE_KEYS, group_options={"proj": "random", "scale_type": "channel"},
           scale=1.0, **_PEER),  # type: ignore[arg-type]
    Method(name="alice-pytorch-optimizer", summary="pytorch_optimizer Alice on the matrices, AdamW on the rest",
           cls="pytorch_optimizer:Alice", package="pytorch-optimizer", adamw_on_rest=True, scale=0.3, lr=3e-3,
           other_lr=3e-2,
           peer_keys={"rank": "rank", "update_proj_gap": "update_interval", "scale": "alpha",
                      "leading_basis": "leading_basis"}, **_PEER),  # type: ignore[arg-type]
    Method(name="racs-pytorch-optimizer", summary="pytorch_optimizer RACS on the matrices, AdamW on the rest",
           cls="pytorch_optimizer:RACS", package="pytorch-optimizer", adamw_on_rest=True, scale=0.05, lr=1e-3,
           other_lr=3e-2,
           peer_keys={"scale": "alpha"}, **_PEER),  # type: ignore[arg-type]
    Method(name="muon-torch", summary="torch.optim.Muon on the matrices (bf16 Newton-Schulz), AdamW on the rest",
           cls="torch.optim:Muon", adamw_on_rest=True, group_options={"adjust_lr_fn": "match_rms_adamw"}, lr=3e-3,
           other_lr=3e-2, peer_keys={"momentum": "momentum", "ns_steps": "ns_steps"},
           **_PEER),  # type: ignore[arg-type]
    Method(name="stable-spam-pytorch-optimizer", summary="pytorch_optimizer StableSPAM (AdamW with Stable-SPAM)",
           cls="pytorch_optimizer:StableSPAM", package="pytorch-optimizer", **_FULL_PEER),  # type: ignore[arg-type]
    Method(name="apollo-torch-mini", summary="apollo-torch APOLLOAdamW, rank 1, tensor-wise",
           cls="apollo_torch:APOLLOAdamW", package="apollo-torch", peer_keys=_GALORE_KEYS,
           group_options={"rank": 1, "proj": "random", "scale_type": "tensor"}, scale=128.0, lr=3e-3, **_PEER),  # type: ignore[arg-type]
)  # fmt: skip

#: Every method by name, in the order tables and ``--help`` list them.
METHODS: dict[str, Method] = {m.name: m for m in _ENTRIES}


def register(method: Method, preset: type[Any] | None = None) -> Method:
    """Add ``method`` by its name (and ``preset``, the class of a new algorithm, as ``method.preset``): what a
    method defined outside gradproj needs to be built, trained and tested like ours. Names must be new.

    >>> register(METHODS["galore_adamw"])
    Traceback (most recent call last):
    ...
    ValueError: a method named 'galore_adamw' is registered already
    """
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is registered already")
    if preset is not None:
        if method.preset is None or method.preset in PRESETS:
            raise ValueError(f"preset name {method.preset!r} is empty or taken; registered: {tuple(PRESETS)}")
        PRESETS[method.preset] = preset
    elif method.kind == "preset" and method.preset not in PRESETS:
        raise ValueError(f"preset {method.preset!r} is not registered; pass its class as preset=")
    METHODS[method.name] = method
    return method


def fsdp_capable() -> tuple[str, ...]:
    """Our methods that step FSDP2-sharded parameters (variants such as ``+rotate`` left out).

    >>> {"alice", "racs", "fira_adamw"} <= set(fsdp_capable())
    True
    """
    return tuple(m.name for m in METHODS.values() if m.kind == "preset" and m.variant_of is None and m.supports_fsdp)


def get_method(name: str) -> Method:
    """The method called ``name``; the error lists the valid names.

    >>> get_method("fira_adamw").default_scale()
    1.0
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(METHODS)}") from None


def trainer_methods() -> list[Method]:
    """What ``gradproj pretrain --optimizer`` offers: our methods (variants are options of theirs)."""
    return [m for m in METHODS.values() if not m.peer and m.variant_of is None]


def demo_methods() -> list[Method]:
    """``gradproj demo``'s line-up."""
    return [m for m in METHODS.values() if m.demo]


def baseline_methods() -> list[Method]:
    """What ``gradproj memory`` compares every plan with."""
    return [m for m in METHODS.values() if m.baseline]
