"""The projected optimizer, its presets, parameter grouping and reference twins."""

from .defaults import PROJECTION_DEFAULTS
from .engine import ProjectedOptimizer
from .groups import format_summary, param_groups, state_bytes, summarize
from .muon_presets import SCALE, Muon, Muon8bit, SubspaceMuon
from .preset_table import PRESETS
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

__all__ = [
    "COSMOS",
    "PRESETS",
    "PROJECTION_DEFAULTS",
    "RACS",
    "SCALE",
    "APOLLOAdamW",
    "Alice",
    "Alice0",
    "FiraAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GradNormLoRP",
    "GradNormLoRP8bit",
    "Muon",
    "Muon8bit",
    "ProjectedOptimizer",
    "SubspaceMuon",
    "format_summary",
    "param_groups",
    "state_bytes",
    "summarize",
]
