"""Every preset by the name the CLI, configs and the method registry use (:data:`PRESETS`).

Example:
    >>> PRESETS["muon"].__name__, PRESETS["galore_adamw"].__name__
    ('Muon', 'GaLoreAdamW')
"""

from __future__ import annotations

from typing import Any

from .muon_presets import SCALE, Muon, Muon8bit, SubspaceMuon
from .presets import (
    COSMOS,
    RACS,
    Alice,
    Alice0,
    APOLLOAdamW,
    FiraAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GradNormLoRP,
    GradNormLoRP8bit,
)

#: Every preset by the name the CLI and configs use.
PRESETS: dict[str, Any] = {  # name -> preset class; each takes its own keywords (lr, betas, ...)
    "galore_adamw": GaLoreAdamW,
    "galore_adamw8bit": GaLoreAdamW8bit,
    "galore_adafactor": GaLoreAdafactor,
    "fira_adamw": FiraAdamW,
    "apollo_adamw": APOLLOAdamW,
    "alice": Alice,
    "alice0": Alice0,
    "racs": RACS,
    "cosmos": COSMOS,
    "gradnorm_lorp": GradNormLoRP,
    "gradnorm_lorp8bit": GradNormLoRP8bit,
    "muon": Muon,
    "muon8bit": Muon8bit,
    "subspace_muon": SubspaceMuon,
    "scale": SCALE,
}
