"""Build any registered method (:mod:`gradproj.optim.registry`) for a model: one parameter split for
every method, ours and the peers', so that they train the same matrices at the same rates.

Attention and MLP matrices (``target_modules``) form the first group, at ``lr``; embeddings, norms and
the head the other, at ``other_lr``. Projected methods give the first group a ``rank``.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16))
    >>> spec = OptimizerSpec(name="galore_adamw", rank=4, target_modules="1")
    >>> type(build_optimizer(model, spec)).__name__
    'GaLoreAdamW'
    >>> OptimizerSpec(name="apollo_mini", rank=64).resolved_rank
    1
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adaptive import AUTO
from .external import lora_optimizer, peer_optimizer
from .fast import fused_adamw_supported
from .groups import param_groups
from .precision import LOW_PRECISION
from .preset_table import PRESETS
from .ranks import AUTO_RANK, parse_budget
from .spec import DEFAULT_RANK, OptimizerSpec, reference_rank

__all__ = ["DEFAULT_RANK", "OptimizerSpec", "budget_bytes", "build_optimizer", "reference_rank"]


def build_optimizer(
    model: nn.Module,
    spec: OptimizerSpec,
    *,
    summary: bool = False,
    layerwise: bool = False,
    bf16_update: str = "nearest",
    nonfinite: str = "skip",
) -> torch.optim.Optimizer:
    """The optimizer ``spec`` names, over ``model``'s trainable parameters.

    ``nonfinite`` is our engine's (``"checked"`` where the caller skips non-finite steps itself, as the
    trainer does from the clipped gradient norm); torch's and the peers' optimizers check nothing.

    ``layerwise`` (stepping inside backward) and a gradient policy (``spec.spike_policy``) need a gradproj
    optimizer: torch's AdamW is then replaced by the engine without ranks, which is torch's AdamW bit for
    bit (tested). So it is for a model with bf16 weights: the engine keeps float32 moments and rounds each
    step by ``bf16_update`` (:mod:`gradproj.optim.precision`), where torch's AdamW would keep bf16 moments.
    """
    method = spec.method
    if layerwise and not method.supports_layerwise:
        raise ValueError(f"--optimizer {method.name} cannot step layer-wise; use one of gradproj's own methods")
    low_precision = any(p.dtype in LOW_PRECISION for p in model.parameters())
    if method.peer and bf16_update != "nearest":
        raise ValueError(
            f"--bf16-update {bf16_update} needs one of gradproj's optimizers; --optimizer {method.name} rounds "
            "its own updates (use --bf16-update nearest)"
        )
    if method.peer and spec.refresh_offset != "aligned":
        raise ValueError(
            f"--refresh-offset {spec.refresh_offset} needs one of gradproj's optimizers; --optimizer {method.name} "
            "refreshes every matrix on the same step (use --refresh-offset aligned)"
        )
    if method.peer and spec.rank == AUTO_RANK:
        raise ValueError(
            f"--rank auto needs one of gradproj's optimizers; --optimizer {method.name} keeps one fixed rank "
            "(give --rank a number)"
        )
    if method.peer and spec.group_options().get("update_proj_gap") == AUTO:
        raise ValueError(
            f"--update-proj-gap auto needs one of gradproj's optimizers; --optimizer {method.name} refreshes on a "
            "fixed gap (give --update-proj-gap a number of steps)"
        )
    if method.peer and spec.policy_options():
        raise ValueError(
            f"--spike-policy {spec.spike_policy} needs one of gradproj's optimizers; --optimizer {method.name} "
            "reads its gradients as they are (use --spike-policy none, or the peer stable-spam-pytorch-optimizer)"
        )
    if method.kind == "lora":
        return lora_optimizer(model, spec, DEFAULT_RANK)
    if method.kind == "peer":
        return peer_optimizer(spec, _groups(model, spec, summary=False, names=False))
    if method.kind == "torch" and not layerwise and not low_precision and not spec.policy_options():
        groups = _groups(model, spec, summary=summary, names=False)
        # torch's fastest kernel where it has one (its own default on a CPU is the for-loop)
        kernel = {"fused": fused_adamw_supported([p for g in groups for p in g["params"]]), **method.constructor}
        return torch.optim.AdamW(groups, lr=spec.matrix_lr, weight_decay=spec.weight_decay, **kernel)
    if method.preset is None:  # a kernel variant of torch's AdamW (adamw+loop): torch's own, or nothing
        raise ValueError(
            f"--optimizer {method.name} is torch's AdamW with fixed kernel options, which keeps bf16 moments for "
            "bf16 weights; use --optimizer adamw (the engine's AdamW, float32 moments) for them"
        )
    groups = _groups(model, spec, summary=summary, names=True)
    preset = PRESETS[method.preset]
    options = {"bf16_update": bf16_update, "nonfinite": nonfinite, **spec.policy_options(), **method.constructor}
    return preset(groups, lr=spec.matrix_lr, weight_decay=spec.weight_decay, **options)


def _groups(model: nn.Module, spec: OptimizerSpec, *, summary: bool, names: bool) -> list[dict[str, Any]]:
    """[targeted matrices (with ``rank`` if projected), the rest], each with its learning rate."""
    options = spec.group_options() if spec.projected else {}
    groups = param_groups(model, target_modules=spec.target_modules, rank=spec.resolved_rank or 1, **options)
    if not spec.projected:
        del groups[0]["rank"]
    elif spec.resolved_rank == AUTO_RANK:
        groups[0]["state_budget"] = budget_bytes(spec, groups[0])
    groups[0]["lr"] = spec.matrix_lr
    for group in groups[1:]:
        group["lr"] = spec.rest_lr
    if spec.projected and spec.method.own_groups:
        groups = own_groups(model, groups, spec.method.own_groups)
    if summary:
        from .groups import format_summary

        preset = PRESETS[spec.method.preset] if spec.method.preset else None
        defaults = preset.projection_defaults() if preset is not None else {}
        shown = [{**defaults, **g} if "rank" in g else g for g in groups]  # the preset's rule and basis
        print(format_summary(shown, preset.RULE if preset is not None else "adam"))
    if not names:  # torch < 2.6 and the peers do not know the key
        for group in groups:
            group.pop("param_names", None)
    return groups


def own_groups(
    model: nn.Module, groups: list[dict[str, Any]], roles: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """``groups`` with the model's output head and input embedding (the keys of ``roles``: ``"head"``,
    ``"embedding"``; a tied pair counts as the head) taken from the rest into projected groups of their own:
    the matrices' options and rate, then the role's options (SCALE's).

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    >>> split = own_groups(model, param_groups(model, rank=4), {"head": {"momentum": 0.9}, "embedding": {}})
    >>> [g["param_names"] for g in split[1:3]], split[1]["momentum"], split[1]["rank"]
    ([['lm_head.weight'], ['model.embed_tokens.weight']], 0.9, 4)
    """
    getters = {"head": "get_output_embeddings", "embedding": "get_input_embeddings"}
    named = {id(p): name for g in groups[1:] for p, name in zip(g["params"], g.get("param_names", ()), strict=False)}
    matrices = {k: v for k, v in groups[0].items() if k not in ("params", "param_names")}
    own: list[dict[str, Any]] = []
    for role, options in roles.items():
        module = getattr(model, getters[role], lambda: None)()
        weight = getattr(module, "weight", None)
        if weight is None or any(weight is g["params"][0] for g in own):
            continue
        names = {"param_names": [named[id(weight)]]} if id(weight) in named else {}
        own.append({**matrices, "params": [weight], **names, **options})
    taken = {id(g["params"][0]) for g in own}
    for group in groups[1:]:
        keep = [i for i, p in enumerate(group["params"]) if id(p) not in taken]
        group["params"] = [group["params"][i] for i in keep]
        if "param_names" in group:
            group["param_names"] = [group["param_names"][i] for i in keep]
    return [groups[0], *own, *(g for g in groups[1:] if g["params"])]


def budget_bytes(spec: OptimizerSpec, group: dict[str, Any]) -> int:
    """``spec.state_budget`` in bytes for the projected ``group``: as given, or its fraction of the state the
    method keeps at the fixed rank it names (``0.75x@128``; ``0.75x``: :data:`DEFAULT_RANK`).

    >>> import torch
    >>> from dataclasses import replace
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    >>> spec = OptimizerSpec(name="galore_adamw", rank="auto", state_budget="0.5x@8", target_modules="0")
    >>> group = _groups(model, spec, summary=False, names=False)[0]
    >>> group["state_budget"], budget_bytes(replace(spec, state_budget="1x@8"), group)  # (8*32 + 2*8*32) * 4
    (1536, 3072)
    """
    from .groups import state_bytes

    assert spec.budget is not None
    budget = parse_budget(spec.budget)
    if isinstance(budget, int):
        return budget
    fraction, rank = budget
    preset = PRESETS[spec.method.preset or "galore_adamw"]
    fixed = {**preset.projection_defaults(), **group, "rank": rank or DEFAULT_RANK}
    return int(fraction * sum(state_bytes(p, fixed, preset.RULE) for p in group["params"]))
