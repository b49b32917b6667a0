"""gradproj's optimizers as entries of PyTorch's own optimizer-test database.

torch ships the machinery its generic optimizer tests run on (``torch.testing._internal.common_optimizers``:
``OptimizerInfo`` describes an optimizer class, its constructor inputs, the schedulers to try and what it
supports; ``OptimizerInput`` one configuration; ``ErrorOptimizerInput`` one that must be refused). This
module builds one ``OptimizerInfo`` per preset of :data:`gradproj.PRESETS`, with configurations drawn from
the owners of each enumeration (projectors, ``proj_type``, ``on_refresh``, the fast path's ``foreach``), so
that a preset or projector added there is covered by ``tests/test_torch_contract.py`` with no edit here.

A configuration's ``rank`` (and the other keys of :data:`GROUP_KEYS`) belongs to a parameter group, not
to the constructor: :func:`construct` puts the 2-D parameters in a group with them and the rest in a group
without, as ``gradproj.param_groups`` does for a model.
"""

from __future__ import annotations

from typing import Any

import torch

# torch's test utilities freeze torch.backends' flags when imported (its test processes set them once);
# nothing in gradproj's suite may depend on that, so they are unfrozen again below.
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    _get_optim_inputs_including_global_cliquey_kwargs,
    get_error_inputs_for_all_optims,
)

import gradproj
from gradproj.optim.fast import blocker
from gradproj.optim.validate import combination_error
from gradproj.projection import PROJ_TYPES, PROJECTORS
from gradproj.rules import make_rule

torch.backends.__allow_nonbracketed_mutation_flag = True  # type: ignore[attr-defined]

#: keys a configuration sets on the group of 2-D parameters instead of passing to the constructor
GROUP_KEYS = ("rank",)


def _compatible(preset: type[gradproj.ProjectedOptimizer], options: dict[str, Any]) -> bool:
    """Whether a projected group of ``preset`` with ``options`` is one the preset accepts."""
    return combination_error({**preset.projection_defaults(), **options}) is None


def _fast_path_refuses(preset: type[gradproj.ProjectedOptimizer], kwargs: dict[str, Any]) -> bool:
    """Whether ``foreach=True`` refuses one of the configuration's groups (a rule or feature without a batched
    step), asked of the fast path's own :func:`blocker` on a sample matrix."""
    defaults = preset.projection_defaults()
    projected = "rank" in kwargs
    group = {**defaults, **kwargs} if projected else {}
    rule = make_rule((group.get("rule") if projected else None) or preset.RULE)
    rest = make_rule(preset.RULE)
    sample = torch.zeros(4, 3)
    return blocker(sample, group, rule) is not None or blocker(sample, {}, rest) is not None


def configurations(preset_name: str) -> list[OptimizerInput]:
    """The preset's configurations, without the fast-path flag: full-rank groups only (the preset's base rule),
    with decay; and a projected group with every projector the preset takes, a refresh every 3 steps."""
    preset = gradproj.PRESETS[preset_name]
    inputs = [
        OptimizerInput(params=None, kwargs={}, desc="no rank"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="no rank, weight_decay"),
    ]
    for projector in PROJECTORS:
        options = {"rank": 2, "update_proj_gap": 3, "projector": projector}
        if _compatible(preset, options):
            inputs.append(OptimizerInput(params=None, kwargs=options, desc=f"rank 2, {projector}"))
    decayed = {"rank": 2, "update_proj_gap": 3, "weight_decay": 0.1, "on_refresh": "rotate"}
    if _compatible(preset, decayed):
        inputs.append(OptimizerInput(params=None, kwargs=decayed, desc="rank 2, weight_decay, rotate"))
    if preset_name == "galore_adamw":  # the sides and the step-time features, once
        for proj_type in PROJ_TYPES:
            options = {"rank": 2, "update_proj_gap": 3, "proj_type": proj_type}
            inputs.append(OptimizerInput(params=None, kwargs=options, desc=f"rank 2, proj_type {proj_type}"))
        adaptive = {"rank": 2, "update_proj_gap": "auto", "min_gap": 2, "max_gap": 6, "check_every": 2}
        inputs.append(OptimizerInput(params=None, kwargs=adaptive, desc="rank 2, adaptive refresh"))
        policed = {"rank": 2, "update_proj_gap": 3, "spike_policy": "stable_spam"}
        inputs.append(OptimizerInput(params=None, kwargs=policed, desc="rank 2, stable_spam"))
    return inputs


def optim_inputs(preset_name: str) -> list[OptimizerInput]:
    """Every configuration with each of the fast-path flag's values: torch's helper adds ``foreach=False``
    (the per-parameter ground truth) and ``foreach=True`` (dropped where the fast path refuses a group);
    ``foreach=None``, the default, is the configuration as given."""
    preset = gradproj.PRESETS[preset_name]
    info = OptimizerInfo(
        preset, optim_inputs_func=lambda device, dtype=None: configurations(preset_name), supported_impls=("foreach",)
    )
    flagged = _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, info)
    kept = [i for i in flagged if not (i.kwargs.get("foreach") and _fast_path_refuses(preset, i.kwargs))]
    return [*configurations(preset_name), *kept]


def error_inputs(preset_name: str, device: str, dtype: torch.dtype) -> list[ErrorOptimizerInput]:
    """What every torch optimizer refuses (torch's own list), and what ours refuse besides, each with the words
    the refusal must use."""
    weight = torch.nn.Parameter(torch.randn(4, 3, device=device, dtype=dtype))
    complex_weight = torch.nn.Parameter(torch.randn(4, 3, device=device, dtype=torch.complex64))

    def refused(params: Any, kwargs: dict[str, Any], desc: str, regex: str) -> ErrorOptimizerInput:
        return ErrorOptimizerInput(
            OptimizerInput(params=params, kwargs=kwargs, desc=desc), error_type=ValueError, error_regex=regex
        )

    ours = [
        refused([weight], {"lr": -1e-3}, "negative lr", r"lr=-0\.001 is not valid; expected a number >= 0"),
        refused([weight], {"lr": torch.tensor([1e-3, 1e-3])}, "two-element lr", r"Tensor lr must be 1-element"),
        refused([weight], {"weight_decay": -0.1}, "negative weight_decay", r"weight_decay=-0\.1 is not valid"),
        refused(
            [("w", complex_weight)],
            {},
            "complex parameter",
            r"^w is torch\.complex64; gradproj's optimizers step real parameters only",
        ),
        refused([{"params": [weight], "rank": 0}], {}, "rank 0", r"rank=0 is not valid; expected an integer >= 1"),
        refused(
            [{"params": [("v", torch.nn.Parameter(torch.randn(5)))], "rank": 2}],
            {},
            "a vector in a rank group",
            r"v has shape \(5,\); a group with 'rank' takes 2-D weight matrices only",
        ),
        refused([weight], {"nonfinite": "ignore"}, "unknown nonfinite", r"nonfinite='ignore' is not valid"),
    ]
    if preset_name != "galore_adafactor":  # Adafactor's betas are decay_rate and beta1
        ours.append(refused([weight], {"betas": (1.0, 0.999)}, "beta1 = 1", r"betas\[0\]=1\.0 is not valid"))
    step_errors = [
        ErrorOptimizerInput(
            OptimizerInput(params=[weight], kwargs={}, desc="a sparse gradient"),
            error_on=OptimizerErrorEnum.STEP_ERROR,
            error_type=RuntimeError,
            error_regex=r"has a sparse gradient \(torch.sparse_coo\), which is not supported: use a dense embedding",
        )
    ]
    return [*get_error_inputs_for_all_optims(device, dtype), *ours, *step_errors]


def _info(name: str) -> OptimizerInfo:
    return OptimizerInfo(
        gradproj.PRESETS[name],
        optim_inputs_func=lambda device, dtype=None: optim_inputs(name),
        optim_error_inputs_func=lambda device, dtype: error_inputs(name, device, dtype),
        supported_impls=("foreach",),
        supports_complex=False,
        supports_sparse=False,
        scheduler_inputs=(
            [lambda opt: torch.optim.lr_scheduler.StepLR(opt, gamma=0.9, step_size=10)],
            [lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt)],
            [lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))],
            [
                lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5),
                lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20),
            ],
        ),
    )


#: one entry per preset, in the order of :data:`gradproj.PRESETS`
OPTIM_DB: list[OptimizerInfo] = [_info(name) for name in gradproj.PRESETS]


def construct(
    info: OptimizerInfo,
    params: list[torch.Tensor],
    optim_input: OptimizerInput,
    *,
    split: bool = False,
    **extra: Any,
) -> torch.optim.Optimizer:
    """The optimizer of ``optim_input`` over ``params``: the 2-D ones in a group with its :data:`GROUP_KEYS`
    (when it sets any, or when ``split``), the others in a group without; ``extra`` overrides constructor
    keywords."""
    kwargs = {**optim_input.kwargs, **extra}
    group = {k: kwargs.pop(k) for k in GROUP_KEYS if k in kwargs}
    if not group and not split:
        return info.optim_cls(params, **kwargs)
    matrices = [p for p in params if p.dim() == 2]
    rest = [p for p in params if p.dim() != 2]
    groups = [{"params": matrices, **group}, *([{"params": rest}] if rest else [])]
    return info.optim_cls(groups, **kwargs)


def ids(infos: list[OptimizerInfo]) -> list[str]:
    return [info.name for info in infos]
