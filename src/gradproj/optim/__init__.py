"""The projected optimizer, its presets, parameter grouping and reference twins."""

from .engine import PROJECTION_DEFAULTS, ProjectedOptimizer
from .groups import format_summary, param_groups, state_bytes, summarize
from .presets import PRESETS, APOLLOAdamW, FiraAdamW, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit

__all__ = [
    "PRESETS",
    "PROJECTION_DEFAULTS",
    "APOLLOAdamW",
    "FiraAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "ProjectedOptimizer",
    "format_summary",
    "param_groups",
    "state_bytes",
    "summarize",
]
