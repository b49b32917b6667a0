"""Named presets: each picks an update rule, a residual policy and defaults. None re-implements
Adam; they all run :class:`~gradproj.optim.engine.ProjectedOptimizer`.

Projection options (``update_proj_gap``, ``scale``, ``proj_type``, ``projector``, ``on_refresh``,
``scale_type``, ``growth_limit``, ``oversample``, ``power_iters``, ``seed``) may be passed as
keywords to set the default of every group with ``rank``, or per group.

Example:
    >>> import torch, gradproj
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32))
    >>> groups = [{"params": [model[0].weight], "rank": 4, "update_proj_gap": 10, "scale": 0.25},
    ...           {"params": [model[0].bias, *model[1].parameters()]}]
    >>> opt = gradproj.GaLoreAdamW(groups, lr=1e-2)
    >>> model(torch.randn(8, 16)).square().mean().backward()
    >>> opt.step()
    >>> opt.state[model[0].weight]["exp_avg"].shape   # m x rank: the low-rank moment of a tall weight
    torch.Size([32, 4])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from ..rules.adafactor import RELATIVE_LR
from .engine import ProjectedOptimizer
from .validate import check_betas

Betas = tuple[float, float]


def engine_options(nonfinite: str, bf16_update: str, foreach: bool | None, compile: bool) -> dict[str, Any]:
    """The engine's own keywords, which every preset takes and passes on unchanged."""
    return {"nonfinite": nonfinite, "bf16_update": bf16_update, "foreach": foreach, "compile": compile}


class GaLoreAdamW(ProjectedOptimizer):
    """GaLore (Zhao et al., 2024): AdamW on ``P^T G``, update ``scale * P u``.

    ``GaLoreAdamW(groups, eps=1e-6, projector="svd", on_refresh="keep")`` with ``weight_decay=0``
    reproduces ``galore_torch.GaLoreAdamW``; ``weight_decay`` here is decoupled AdamW decay
    applied before the update (galore-torch applies it after, to the updated weight).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        nonfinite: str = "skip",
        bf16_update: str = "nearest",
        foreach: bool | None = None,
        compile: bool = False,
        **projection: Any,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        options = engine_options(nonfinite, bf16_update, foreach, compile)
        super().__init__(params, defaults, rule=self.RULE, projection={**self.PROJECTION, **projection}, **options)


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLore with block-wise 8-bit Adam moments (bitsandbytes' quantization) in every group;
    moments under 4096 elements stay float32."""

    RULE = "adam8bit"


class GradNormLoRP(GaLoreAdamW):
    """GradNormLoRP (Huang et al., 2025): each matrix with ``rank`` written row by row as ``W = g v / ||v||``,
    GaLore on the direction ``v`` (its basis from the direction's gradient) and AdamW on the magnitudes
    ``g`` at ``lr * scale``; the reparametrisation lives in the optimizer (4 numbers of state per row), so the
    model, its memory and its export are unchanged. See :mod:`gradproj.optim.weight_norm`.

    Any GaLore group may set ``weight_norm=True`` instead; this preset sets it for every projected group.
    """

    PROJECTION: ClassVar[dict[str, Any]] = {"residual": "none", "weight_norm": True}


class GradNormLoRP8bit(GradNormLoRP):
    """GradNormLoRP with GaLore's block-wise 8-bit moments of ``R`` (the paper's 8-bit variant); the
    magnitudes' moments stay in the step's dtype."""

    RULE = "adam8bit"


class FiraAdamW(GaLoreAdamW):
    """Fira (Chen et al., 2024): GaLore plus the norm-scaled residual ``phi (G - P P^T G)``
    with the norm-growth limiter. ``scale`` defaults to 1 (the setting where the released
    ``fira`` package and we coincide; see :mod:`gradproj.optim.residual`)."""

    PROJECTION: ClassVar[dict[str, Any]] = {"residual": "fira", "scale": 1.0}


class APOLLOAdamW(GaLoreAdamW):
    """APOLLO (Zhu et al., 2024): the raw gradient scaled channel-wise (or tensor-wise with
    ``scale_type="tensor"``) by ``||u|| / ||R||`` from a random low-rank Adam, times
    ``sqrt(scale)``, with the norm-growth limiter. APOLLO-Mini: ``rank=1, scale_type="tensor",
    scale=128``."""

    PROJECTION: ClassVar[dict[str, Any]] = {"residual": "apollo", "projector": "random", "scale": 1.0}


class Alice(GaLoreAdamW):
    """Alice (Gong et al., 2025, arXiv 2502.07752, Alg. 1-3): Adam without bias correction in a
    tracked low-rank eigenbasis, switching refreshes and compensation of the discarded part.

    The basis is the leading eigenvectors of ``track_beta * P Q P^T + (1 - track_beta) G G^T``
    (``projector="eigh"``; ``Q`` the moving average of ``R R^T``); a refresh keeps ``leading_basis``
    of them and draws the rest from the complement (``switching``); the update is
    ``scale * (P u + compensation_scale * C)`` (``residual="alice"``, see :mod:`gradproj.optim.residual`).

    ``betas`` are the subspace moments' ``(beta1, beta2)`` (default ``(0.9, 0.9)``), optionally with the
    tracking decay third, as ``pytorch_optimizer.Alice`` takes them; groups without ``rank``
    run AdamW with ``rest_betas`` (``(0.9, 0.999)``: Adam's, not the subspace's short ``beta2``, which
    costs embeddings and norms 10% perplexity on our llama-1m check). Other defaults are the paper's
    (lr 0.02, scale 0.3, compensation 0.4, 40 of 256 leading directions, gap 200).
    """

    PROJECTION: ClassVar[dict[str, Any]] = {
        "projector": "eigh",
        "track_beta": 0.999,
        "switching": True,
        "residual": "alice",
        "bias_correction": False,
        "scale": 0.3,
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        betas: tuple[float, ...] = (0.9, 0.9),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        rest_betas: Betas = (0.9, 0.999),
        nonfinite: str = "skip",
        bf16_update: str = "nearest",
        foreach: bool | None = None,
        compile: bool = False,
        **projection: Any,
    ) -> None:
        check_betas(betas, lengths=(2, 3))  # now: a model with no projected group would never read them
        if len(betas) == 3:
            projection.setdefault("track_beta", float(betas[2]))
        self._subspace_betas = (float(betas[0]), float(betas[1]))  # before torch adds the groups
        super().__init__(
            params,
            lr,
            rest_betas,
            eps,
            weight_decay,
            nonfinite=nonfinite,
            bf16_update=bf16_update,
            foreach=foreach,
            compile=compile,
            **projection,
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "rank" in param_group:  # the subspace moments' betas, unless the group sets its own
            param_group.setdefault("betas", self._subspace_betas)
        super().add_param_group(param_group)


class Alice0(Alice):
    """Alice without tracking (the paper's Alice-0): the eigenbasis of the current ``G G^T``, found
    from the last basis by one step of subspace iteration, with switching and compensation."""

    PROJECTION: ClassVar[dict[str, Any]] = {**Alice.PROJECTION, "track_beta": 0.0}


class TorchAdamWDefaults(GaLoreAdamW):
    """A preset whose groups without ``rank`` run AdamW at torch.optim.AdamW's defaults (``lr=1e-3``,
    ``eps=1e-8``), as the papers of the methods that step whole matrices otherwise (RACS, Muon) prescribe."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        nonfinite: str = "skip",
        bf16_update: str = "nearest",
        foreach: bool | None = None,
        compile: bool = False,
        **projection: Any,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            nonfinite=nonfinite,
            bf16_update=bf16_update,
            foreach=foreach,
            compile=compile,
            **projection,
        )


class RACS(TorchAdamWDefaults):
    """RACS (Gong et al., 2025, Alg. 1): row- and column-scaled SGD on every matrix with ``rank``
    (the rank itself is unused: RACS keeps one number per row and per column, no basis), AdamW on
    the other groups. ``scale`` is the paper's ``alpha`` (0.05), ``growth_limit`` its ``gamma``,
    ``betas[0]`` its ``beta``. See :mod:`gradproj.rules.racs`.
    """

    PROJECTION: ClassVar[dict[str, Any]] = {"projector": "identity", "rule": "racs", "scale": 0.05}


class COSMOS(Alice):
    """COSMOS (Liu et al., 2025, arXiv 2502.17410, Alg. 1): on every matrix with ``rank``, SOAP's
    preconditioning in a tracked rank-``r`` leading eigenbasis of the gradient and Muon's orthogonalized
    momentum on the rest of it, the sum scaled to unit RMS, so ``lr`` is each step's RMS; AdamW (with
    ``rest_betas``) on the other groups. See :mod:`gradproj.rules.cosmos`.

    ``betas`` are ``(beta1, beta2)`` of the matrices (default ``(0.9, 0.95)``, the authors'), optionally
    with the basis tracking's decay third (``track_beta``, default ``0.95``: the paper ties it to
    ``beta2``); ``muon_scale`` is the paper's ``gamma`` (0.2, the authors' code); ``nesterov=True`` steps
    along Nesterov's momentum, as the authors' current code does by default. State per ``m x n`` matrix: the full first
    moment, the ``d x r`` basis, ``r x r`` covariance and ``r x o`` second moment.
    """

    PROJECTION: ClassVar[dict[str, Any]] = {
        "projector": "identity",
        "rule": "cosmos",
        "scale": 1.0,
        "track_beta": 0.95,
        "muon_scale": 0.2,
        "nesterov": False,
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, ...] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        rest_betas: Betas = (0.9, 0.999),
        nonfinite: str = "skip",
        bf16_update: str = "nearest",
        foreach: bool | None = None,
        compile: bool = False,
        **projection: Any,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            rest_betas=rest_betas,
            nonfinite=nonfinite,
            bf16_update=bf16_update,
            foreach=foreach,
            compile=compile,
            **projection,
        )


class GaLoreAdafactor(ProjectedOptimizer):
    """GaLore around Adafactor, with ``transformers.Adafactor``'s arguments and defaults
    (relative step size, parameter scaling, factored second moment, update clipping).

    ``lr`` is a number in every group, so torch's LR schedulers work: with ``relative_step=False`` it is
    the step size; with ``relative_step=True`` (the default) it scales the relative step
    ``min(1e-2, 1/sqrt(t))`` by ``lr / 1e-2``: the default ``lr=None`` means ``1e-2``, transformers' step
    exactly, and a group's own ``lr`` or a scheduler's factor scales that group's steps. (transformers
    refuses an ``lr`` beside ``relative_step=True`` and ignores a group's; ``torch.optim.Adafactor`` takes
    ``lr`` as the ceiling of ``1/sqrt(t)`` instead, which a decaying schedule stops moving once
    ``1/sqrt(t)`` is below it.)

    >>> import torch, gradproj
    >>> w = torch.nn.Parameter(torch.randn(8, 6))
    >>> opt = gradproj.GaLoreAdafactor([{"params": [w], "rank": 2}])
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)  # half the relative step
    >>> opt.param_groups[0]["lr"]
    0.005
    """

    RULE = "adafactor"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        nonfinite: str = "skip",
        bf16_update: str = "nearest",
        foreach: bool | None = None,
        compile: bool = False,
        **projection: Any,
    ) -> None:
        if lr is None and not relative_step:
            raise ValueError("lr=None needs relative_step=True; pass a learning rate")
        if lr is None:
            lr = RELATIVE_LR  # the relative step as transformers takes it
        if warmup_init and not relative_step:
            raise ValueError("warmup_init=True requires relative_step=True")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"beta1={beta1!r} is not valid; expected None or a number in [0, 1)")
        defaults = {
            "lr": lr,
            "eps": eps,
            "clip_threshold": clip_threshold,
            "decay_rate": decay_rate,
            "beta1": beta1,
            "weight_decay": weight_decay,
            "scale_parameter": scale_parameter,
            "relative_step": relative_step,
            "warmup_init": warmup_init,
        }
        options = engine_options(nonfinite, bf16_update, foreach, compile)
        super().__init__(params, defaults, rule=self.RULE, projection={**self.PROJECTION, **projection}, **options)
