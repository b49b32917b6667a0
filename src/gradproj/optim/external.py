"""Optimizers built from other packages on gradproj's parameter split: the peers (galore-torch, Fira,
APOLLO, pytorch-optimizer, bitsandbytes, torchao), LoRA through peft, and :class:`Joined`, which steps a peer
and torch's AdamW as one optimizer. :func:`gradproj.optim.build.build_optimizer` is the way in.

Example:
    >>> lora_rank(64)  # the LoRA rank whose Adam state matches GaLore's at rank 64
    32
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..projection.projectors import leading_count
from .groups import target_weights

if TYPE_CHECKING:
    from .build import OptimizerSpec


def peer_optimizer(spec: OptimizerSpec, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """A peer package's optimizer on ``groups`` (the split of :func:`gradproj.optim.build.build_optimizer`:
    [targeted matrices, the rest]); its group keys renamed as the peer names them."""
    method = spec.method
    assert method.cls is not None
    module, cls_name = method.cls.split(":")
    optimizer_class = getattr(importlib.import_module(module), cls_name)
    if spec.projected:
        rank = spec.resolved_rank
        assert isinstance(rank, int)  # rank auto is refused for peers
        ours = {**spec.group_options(), "rank": rank}
        ours["leading_basis"] = leading_count(ours, rank)
        keys = {theirs: ours[key] for key, theirs in method.peer_keys.items() if key in ours}  # rule keys: if given
        groups[0] = {"params": groups[0]["params"], "lr": spec.matrix_lr, **keys, **method.group_options}
        groups.reverse()  # the peers' own examples list the unprojected group first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method.adamw_on_rest:  # the peer sees only the matrices (reversed: last); torch's AdamW the rest
            peer = optimizer_class(groups[-1:], lr=spec.matrix_lr, weight_decay=spec.weight_decay)
            rest = torch.optim.AdamW(groups[:-1], lr=spec.rest_lr, weight_decay=spec.weight_decay)
            return Joined(peer, rest)
        built: torch.optim.Optimizer = optimizer_class(groups, lr=spec.matrix_lr, weight_decay=spec.weight_decay)
    return built


class Joined(torch.optim.Optimizer):
    """Optimizers over disjoint parameters, stepped as one: their group dicts are this one's
    ``param_groups`` (so a scheduler sets every learning rate), their states one view, and ``step``
    steps each in turn. (torch has no such class; the peers that need it have no resumable state.)

    Example:
        >>> a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
        >>> opt = Joined(torch.optim.SGD([a], lr=1.0), torch.optim.AdamW([b], lr=0.1, weight_decay=0.0))
        >>> a.grad, b.grad = torch.ones(2), torch.ones(2)
        >>> opt.step(); [round(a[0].item(), 3), round(b[0].item(), 3)]
        [0.0, 0.9]
    """

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers
        super().__init__([p for o in optimizers for g in o.param_groups for p in g["params"]], {})
        self.param_groups = [g for o in optimizers for g in o.param_groups]  # the same dicts, not copies

    @property  # type: ignore[override]
    def state(self) -> dict[Any, Any]:  # type: ignore[override]
        """Every child's per-parameter state (the same dicts), read-only here: the children own it."""
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    @state.setter
    def state(self, value: Any) -> None:  # torch's __init__ assigns an empty state; the children keep theirs
        pass

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            optimizer.load_state_dict(state)


def lora_rank(rank: int) -> int:
    """LoRA rank whose Adam state matches GaLore's at ``rank``: GaLore keeps ``2 r n`` numbers for an
    ``m x n`` matrix (``m <= n``), LoRA ``2 r' (m + n)``; ``r' = r / 2`` is equal for square matrices
    and within 30% for LLaMA's MLP shapes."""
    return max(1, rank // 2)


def lora_optimizer(model: nn.Module, spec: OptimizerSpec, default_rank: int) -> torch.optim.Optimizer:
    """LoRA through peft on the targeted matrices: adapters at ``lr``, embeddings/norms/head in full at
    ``other_lr`` (as in the GaLore paper's LoRA baseline), frozen base matrices; ``default_rank``: the GaLore
    rank whose state it matches when ``spec`` names none."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = target_weights(model, spec.target_modules)
    frozen = {id(w) for w in targets.values()}
    names = sorted({name.rsplit(".", 2)[-2] for name in targets})  # module suffixes: q_proj, up_proj, ...
    assert not isinstance(spec.rank, str)  # rank auto is refused for LoRA by build_optimizer, as for the peers
    r = lora_rank(spec.rank if spec.rank is not None else default_rank)
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=names), model)
    adapters, rest = [], []
    for name, p in model.named_parameters():
        if "lora_" in name:
            adapters.append(p.requires_grad_(True))
        elif id(p) in frozen:
            p.requires_grad_(False)
        else:
            rest.append(p.requires_grad_(True))
    groups = [{"params": adapters, "lr": spec.matrix_lr}, {"params": rest, "lr": spec.rest_lr}]
    return torch.optim.AdamW(groups, lr=spec.matrix_lr, weight_decay=spec.weight_decay)
