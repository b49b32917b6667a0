"""The Muon family as presets of the one engine: Muon (torch.optim.Muon's step on every matrix with ``rank``,
AdamW on the rest), its 8-bit buffer, a subspace Muon (the momentum kept and orthogonalized in GaLore's
rank-``r`` basis) and SCALE (column-normalized SGD, momentum on the output head only).

Like RACS and COSMOS, the full-matrix members pair their rule with the identity projector: the group's
``rank`` is unused. The rule's keys (``momentum``, ``ns_steps``, ``adjust_lr_fn``, ``ns_dtype``, ``nesterov``;
SCALE's ``norm_dim``) are group keys, passed as keywords for every projected group or per group.

Example:
    >>> import torch, gradproj
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32))
    >>> opt = gradproj.Muon(gradproj.param_groups(model, target_modules="0", rank=4), lr=1e-3)
    >>> model(torch.randn(8, 16)).square().mean().backward()
    >>> opt.step()
    >>> opt.state[model[0].weight]["momentum_buffer"].shape    # the whole matrix's buffer: torch's key
    torch.Size([32, 16])
"""

from __future__ import annotations

from typing import Any, ClassVar

from .presets import TorchAdamWDefaults


class Muon(TorchAdamWDefaults):
    """Muon (Jordan et al. 2024; Moonshot's RMS-matched step, Liu et al. 2025): on every matrix with ``rank``,
    Nesterov momentum (0.95) orthogonalized by five Newton-Schulz iterations, step ``lr * 0.2 sqrt(max(m, n))``,
    decoupled decay; AdamW (``betas``, ``eps``) on the other groups, as torch.optim.Muon's docs prescribe. With
    ``ns_dtype="bfloat16"`` (torch's; the default is the step's dtype) and the same rates, the matrices step as
    ``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")`` does and the rest as ``torch.optim.AdamW(fused=True)``,
    bit for bit (tested). See :mod:`gradproj.rules.muon`.
    """

    PROJECTION: ClassVar[dict[str, Any]] = {"projector": "identity", "rule": "muon", "scale": 1.0, "nesterov": True}


class Muon8bit(Muon):
    """:class:`Muon` with the momentum buffer in block-wise 8-bit codes: a quarter of Muon's state on the
    matrices (an eighth of AdamW's)."""

    PROJECTION: ClassVar[dict[str, Any]] = {**Muon.PROJECTION, "rule": "muon8bit"}


class SubspaceMuon(Muon):
    """Muon in GaLore's basis (ours): each matrix's gradient projected to rank ``r`` (``R = P^T G``, refreshed
    every ``update_proj_gap`` steps from the SVD), Muon's momentum kept there (``r x n``) and orthogonalized
    there, the update ``scale * P O`` with the step ``lr * 0.2 sqrt(max(r, n))`` (Muon's rule on ``R`` as a
    matrix). State per matrix: GaLore's basis and one ``r x n`` buffer, Adam's second moment dropped.
    """

    PROJECTION: ClassVar[dict[str, Any]] = {"rule": "muon", "scale": 1.0, "nesterov": True}


class SCALE(Muon):
    """SCALE (Glentis et al. 2025, arXiv 2506.16659): on every matrix with ``rank``, SGD on the gradient with each
    output unit's row scaled to unit RMS (``norm_dim=1``), no momentum and no state; a group may keep
    momentum (``momentum=0.9``, the paper's output head) or scale over rows instead (``norm_dim=0``, its token
    embedding). AdamW on the other groups (the norms). ``gradproj.optim.build`` gives the head and the embedding
    their groups; by hand::

        groups = [{"params": blocks, "rank": 1}, {"params": [head], "rank": 1, "momentum": 0.9},
                  {"params": [embedding], "rank": 1, "norm_dim": 0}, {"params": norms}]
    """

    PROJECTION: ClassVar[dict[str, Any]] = {"projector": "identity", "rule": "colnorm", "scale": 1.0, "momentum": 0.0}
