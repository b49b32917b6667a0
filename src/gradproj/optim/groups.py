"""``param_groups``: split a model's parameters into projected and full-rank groups.

Example:
    >>> import torch, gradproj
    >>> model = torch.nn.Sequential(torch.nn.Embedding(100, 32), torch.nn.Linear(32, 64), torch.nn.Linear(64, 32))
    >>> groups = gradproj.param_groups(model, target_modules="all-linear", rank=8)
    >>> [len(g["params"]) for g in groups], groups[0]["rank"]
    ([2, 3], 8)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..projection.projectors import get_projector, layout_of
from ..projection.sides import low_rank_shape
from ..rules import make_rule
from ..rules.limiter import limiter_bytes
from .defaults import PROJECTION_DEFAULTS
from .features import features_of
from .precision import compute_dtype
from .ranks import auto_rank, cap
from .residuals import RESIDUALS

Target = str | Sequence[str]

#: The GaLore paper's targets: attention and MLP linears of LLaMA-style decoders and BERT-style encoders
#: (embeddings, norms and the head stay full rank). The trainer's default ``target_modules``.
ATTENTION_AND_MLP = r"(self_attn|attention|mlp|intermediate|output\.dense)"


#: Module names never projected unless asked for: output heads (as in the GaLore paper).
DEFAULT_EXCLUDE = ("lm_head", "classifier", "score")


def _matches_entry(module_name: str, entry: str) -> bool:
    """A list entry names a module, a suffix of its qualified name, or one of its path components."""
    return module_name == entry or module_name.endswith("." + entry) or entry in module_name.split(".")


def _matches(module_name: str, target: Target) -> bool:
    if isinstance(target, str):
        return target == "all-linear" or re.search(target, module_name) is not None
    return any(_matches_entry(module_name, entry) for entry in target)


def _matrices(module: nn.Module) -> tuple[str, ...]:
    """The names of the matrices a linear module holds: ``weight`` for ``nn.Linear``, what a module declares as
    ``projected_weights``, none for the rest."""
    declared: tuple[str, ...] | None = getattr(module, "projected_weights", None)
    if declared is not None:
        return declared
    return ("weight",) if isinstance(module, nn.Linear) else ()


def target_weights(
    model: nn.Module, target: Target = ATTENTION_AND_MLP, exclude: Sequence[str] = DEFAULT_EXCLUDE
) -> dict[str, torch.Tensor]:
    """The 2-D ``weight`` of every ``nn.Linear`` whose qualified name matches ``target``, by parameter name; a
    module that declares the matrices it stands for as ``projected_weights`` (a low-rank component under
    fine-tuning, :class:`gradproj.welore.LowRankLinear`: its two factors) gives those.

    Raises:
        ValueError: naming every list entry (or the pattern) that matches no linear module outside
            ``exclude``, and listing the model's linear modules.
    """
    linears = {
        name: module
        for name, module in model.named_modules()
        if _matrices(module) and not any(re.search(pattern, name) for pattern in exclude)
    }
    if isinstance(target, str):
        entries, unmatched = [target], [] if any(_matches(n, target) for n in linears) else [target]
    else:
        entries = list(target)
        unmatched = [e for e in entries if not any(_matches_entry(n, e) for n in linears)]
    if unmatched:
        every = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        listing = f"linear modules in this model: {every[:20]}{' ...' if len(every) > 20 else ''}"
        which = "" if len(unmatched) == len(entries) else f": {', '.join(map(repr, unmatched))}"
        raise ValueError(
            f"target_modules={target!r}{which} matched no nn.Linear weight (excluding {list(exclude)}); {listing}"
        )
    weights = {}
    for name, module in linears.items():
        if _matches(name, target):
            prefix = f"{name}." if name else ""
            weights.update({prefix + f: getattr(module, f) for f in _matrices(module)})
    return weights


def param_groups(
    model: nn.Module,
    *,
    target_modules: Target = "all-linear",
    rank: int | str = 128,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    summary: bool = False,
    **projection: Any,
) -> list[dict[str, Any]]:
    """Groups for any gradproj optimizer: targeted linear weights get ``rank``, the rest is full.

    Args:
        model: the module to train (only parameters with ``requires_grad`` are included).
        target_modules: ``"all-linear"``, a regular expression searched in module names, or a
            list of names/suffixes (``["q_proj", "v_proj", "mlp"]``, as in Hugging Face).
        rank: projection rank of the targeted weights (clamped per matrix by the optimizer).
        exclude: regular expressions of module names never projected (output heads by default,
            as in the GaLore paper).
        summary: print where each parameter went and the bytes of Adam state each group holds.
        **projection: any group key (``update_proj_gap``, ``scale``, ``proj_type``, ``projector``...).

    Raises:
        ValueError: if the pattern, or any entry of the list, matches no linear layer (the message
            names it and lists what exists).

    >>> import torch
    >>> try:
    ...     param_groups(torch.nn.Sequential(torch.nn.Linear(4, 4)), target_modules=["0", "q_proj"])
    ... except ValueError as error:
    ...     print(str(error).split(" (")[0])
    target_modules=['0', 'q_proj']: 'q_proj' matched no nn.Linear weight
    """
    unknown = set(projection) - set(PROJECTION_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown projection option(s) {sorted(unknown)}; valid: {sorted(PROJECTION_DEFAULTS)}")
    targeted = {n: p for n, p in target_weights(model, target_modules, exclude).items() if p.requires_grad}
    if not targeted:
        raise ValueError(f"target_modules={target_modules!r} matched only frozen weights (requires_grad=False)")
    ids = {id(p) for p in targeted.values()}
    rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids]
    groups: list[dict[str, Any]] = [
        {"params": list(targeted.values()), "param_names": list(targeted), "rank": rank, **projection},
    ]
    if rest:
        groups.append({"params": [p for _, p in rest], "param_names": [n for n, _ in rest]})
    if summary:
        print(format_summary(groups))
    return groups


@dataclass(frozen=True)
class GroupReport:
    """Counts, shapes and state bytes of one group."""

    projected: bool
    count: int
    numel: int
    state_bytes: int
    shapes: tuple[tuple[int, ...], ...]


def state_bytes(p: torch.Tensor, group: dict[str, Any], rule: str = "adam") -> int:
    """Exact bytes of optimizer state ``p`` will hold under ``rule`` (or the group's own ``rule``) in ``group``.

    Counts moment tensors (in the step's dtype: float32 for bf16 weights), basis tensors (in the
    weight's dtype) or indices, Alice's tracked covariance and per-channel energies, the growth
    limiter's scalar, a bf16 weight's kahan compensation buffer and what the group's step features keep (a
    gradient policy's statistics, a refresh schedule's signal, a weight-normalised matrix's four numbers per
    row); plain ints are not counted.
    Matches the tensors a real optimizer allocates (tested).
    """
    from .precision import compensated

    wide = compute_dtype(p.dtype)
    buffer = p.numel() * p.element_size() if compensated(p, group) else 0
    features = features_of(group)
    buffer += features.policy.state_bytes(tuple(p.shape), group, wide)  # every group may run a gradient policy
    if "rank" not in group:
        return make_rule(group.get("rule") or rule).state_bytes(tuple(p.shape), wide) + buffer
    options = {**PROJECTION_DEFAULTS, **group}
    update_rule = make_rule(options["rule"] or rule)
    shape = (int(p.shape[0]), int(p.shape[1]))
    layout = layout_of(shape, options, p.dtype, p.device)
    floats, ints = get_projector(options["projector"]).state_numel(layout, options)
    extra = RESIDUALS[options["residual"]].state_bytes(shape, layout.side, limiter_bytes(wide))
    extra += sum(f.state_bytes(shape, options, wide) for f in (features.schedule, features.reparametrisation))
    return (
        update_rule.state_bytes(low_rank_shape(shape, layout.rank, layout.side), wide, options)
        + floats * p.element_size()
        + ints * 8
        + extra
        + buffer
    )


def rank_bytes(p: torch.Tensor, group: dict[str, Any], rule: str = "adam") -> tuple[int, int]:
    """``rank="auto"``: ``(base, per_rank)``, so that ``p`` holds ``base + per_rank * r`` bytes of state at rank
    ``r``: :func:`state_bytes` at that rank (a refresh schedule's signal included) and its spectrum (one number
    per direction up to its cap, in the step's dtype)."""
    one, two = (state_bytes(p, {**group, "rank": r}, rule) for r in (1, 2))
    item = compute_dtype(p.dtype).itemsize  # the spectrum is kept in the step's dtype
    return 2 * one - two + item * cap_of(p, group), two - one


def budget_costs(group: dict[str, Any], rule: str) -> dict[torch.Tensor, tuple[int, int]]:
    """``rank="auto"``: each matrix's :func:`rank_bytes`, once the group's ``state_budget`` is known to hold rank 1
    everywhere and its rule to be one whose moments can be resized; otherwise a ``ValueError`` that says why."""
    if rule != "adam":
        raise ValueError(f"rank='auto' resizes Adam's moments; the {rule} rule is not supported yet (use adam)")
    costs = {p: rank_bytes(p, group, rule) for p in group["params"]}
    least = sum(base + per for base, per in costs.values())
    if group["state_budget"] < least:
        raise ValueError(
            f"state_budget={group['state_budget']} bytes is smaller than rank 1 everywhere: these "
            f"{len(costs)} matrices need at least {least} bytes (use state_budget >= {least})"
        )
    return costs


def group_state_bytes(group: dict[str, Any], rule: str = "adam") -> int:
    """Bytes of state ``group``'s parameters will hold; ``rank="auto"``: at most its ``state_budget`` (what
    every matrix at its cap would hold, if less)."""
    if "rank" in group and auto_rank(group):
        at_cap = 0
        for p in group["params"]:
            base, per = rank_bytes(p, group, rule)
            at_cap += base + per * cap_of(p, group)
        return min(at_cap, int(group["state_budget"]))
    return sum(state_bytes(p, group, rule) for p in group["params"])


def cap_of(p: torch.Tensor, group: dict[str, Any]) -> int:
    """The most rank ``p`` may take in a ``rank="auto"`` group."""
    return cap(group, (int(p.shape[0]), int(p.shape[1])))


def summarize(groups: list[dict[str, Any]], rule: str = "adam") -> list[GroupReport]:
    """One :class:`GroupReport` per group."""
    return [
        GroupReport(
            projected="rank" in g,
            count=len(g["params"]),
            numel=sum(p.numel() for p in g["params"]),
            state_bytes=group_state_bytes({**PROJECTION_DEFAULTS, **g} if "rank" in g else g, rule),
            shapes=tuple(sorted({tuple(p.shape) for p in g["params"]})),
        )
        for g in groups
    ]


def format_summary(groups: list[dict[str, Any]], rule: str = "adam") -> str:
    """A short table of what went where and the optimizer state each group will hold."""
    lines = ["group  kind        params  elements      state (MiB)  shapes"]
    notes = []
    for i, report in enumerate(summarize(groups, rule)):
        projector = groups[i].get("projector", PROJECTION_DEFAULTS["projector"])
        kind = "full" if not report.projected else "matrices" if projector == "identity" else _rank_kind(groups[i])
        shapes = ", ".join("x".join(map(str, s)) for s in report.shapes[:4])
        lines.append(
            f"{i:<6} {kind:<11} {report.count:>6}  {report.numel:>12,}  {report.state_bytes / 2**20:>11.2f}  {shapes}"
        )
        if report.projected and kind != f"rank {groups[i]['rank']}" and projector != "identity":
            notes.append(f"group {i}: rank={groups[i]['rank']} asked; a matrix uses at most min(m, n)")
    return "\n".join([*lines, *notes])


def _rank_kind(group: dict[str, Any]) -> str:
    """``rank R`` as the group's matrices use it: each at most its smaller side (``rank 64`` for rank=128 on
    64-wide matrices, ``rank 64-128`` when some are clipped), ``rank auto`` as such."""
    if auto_rank(group):
        return f"rank {group['rank']}"
    used = sorted({min(group["rank"], *p.shape) for p in group["params"]})
    return f"rank {used[0]}" if len(used) == 1 else f"rank {used[0]}-{used[-1]}"
