"""gradproj: full-parameter training in the memory of a low-rank method.

Example:
    >>> import torch, gradproj
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> opt = gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=4), lr=1e-2)
"""

from .layerwise import LayerwiseStepper, attach_layerwise
from .optim import (
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
    ProjectedOptimizer,
    format_summary,
    param_groups,
    state_bytes,
)

__version__ = "0.1.0"

__all__ = [
    "COSMOS",
    "PRESETS",
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
    "LayerwiseStepper",
    "ProjectedOptimizer",
    "__version__",
    "attach_layerwise",
    "format_summary",
    "param_groups",
    "state_bytes",
]
