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
    SCALE,
    Alice,
    Alice0,
    APOLLOAdamW,
    FiraAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GradNormLoRP,
    GradNormLoRP8bit,
    Muon,
    Muon8bit,
    ProjectedOptimizer,
    SubspaceMuon,
    format_summary,
    param_groups,
    state_bytes,
)

__version__ = "0.1.0"

__all__ = [
    "COSMOS",
    "PRESETS",
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
    "LayerwiseStepper",
    "Muon",
    "Muon8bit",
    "ProjectedOptimizer",
    "SubspaceMuon",
    "__version__",
    "attach_layerwise",
    "format_summary",
    "param_groups",
    "state_bytes",
]
