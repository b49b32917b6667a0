"""The projected optimizer, its presets, parameter grouping and reference twins."""

from .defaults import PROJECTION_DEFAULTS
from .engine import ProjectedOptimizer
from .groups import format_summary, param_groups, state_bytes, summarize
from .presets import (
    COSMOS,
    PRESETS,
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
    "APOLLOAdamW",
    "Alice",
    "Alice0",
    "FiraAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GradNormLoRP",
    "GradNormLoRP8bit",
    "ProjectedOptimizer",
    "format_summary",
    "param_groups",
    "state_bytes",
    "summarize",
]
