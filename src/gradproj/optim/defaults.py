"""What every projected group gets for the keys it does not set: :data:`PROJECTION_DEFAULTS`, owned here so
that the engine, the group helpers and the builders read one table (the presets override some keys:
``ProjectedOptimizer.PROJECTION``).

Example:
    >>> from gradproj.optim.defaults import PROJECTION_DEFAULTS
    >>> PROJECTION_DEFAULTS["update_proj_gap"], PROJECTION_DEFAULTS["projector"], PROJECTION_DEFAULTS["max_rank"]
    (200, 'svd', 256)
"""

from __future__ import annotations

from typing import Any

from ..rules import rule_defaults
from .features import projected_defaults

#: Defaults filled into every group that has ``rank`` (and only those).
PROJECTION_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "projector": "svd",
    "on_refresh": "keep",
    "residual": "none",
    "scale_type": "channel",
    "growth_limit": 1.01,
    "oversample": 10,
    "power_iters": 2,
    "seed": 0,
    "switching": False,  # a refresh keeps leading_basis leading directions and draws the rest (Alice)
    "leading_basis": None,  # None: 40/256 of the rank (the paper's share)
    "track_beta": 0.0,  # the eigh projector's moving average of R R^T (Alice's tracking; 0: none)
    "compensation_scale": 0.4,  # residual="alice": alpha_c
    "compensation_beta": 0.9,  # residual="alice": decay of the per-channel discarded energy
    "bias_correction": True,  # Adam rules' bias correction in the low-rank space (Alice: off)
    "rule": None,  # the rule of this group's R (None: the optimizer's; RACS: "racs", COSMOS: "cosmos")
    "muon_scale": 0.2,  # rule="cosmos": gamma, the weight of the Muon step on the rest of the momentum
    "nesterov": False,  # rule="cosmos"/"muon": Nesterov's momentum (COSMOS's paper: off; the Muon presets: on)
    # the rules' own keys (options_type): muon's momentum, ns_steps, adjust_lr_fn, ns_dtype; colnorm's norm_dim
    **rule_defaults(),
    # the step features' keys (optim/features.py): refresh_offset, weight_norm (GradNormLoRP), update_proj_gap="auto"'s
    # min_gap, max_gap, energy_threshold, check_every, rank="auto"'s state_budget, max_rank, energy_target
    **projected_defaults(),
}
