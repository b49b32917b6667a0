"""Training applications: pre-training and fine-tuning with any gradproj optimizer, resumable.

Example:
    >>> from gradproj.train import PretrainConfig
    >>> PretrainConfig(model="llama-tiny", steps=5).optim.name
    'galore_adamw'
"""

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import FinetuneConfig, PretrainConfig, TrainConfig
from .loop import Trainer
from .pretrain import PretrainTask, pretrain
from .progress import Callback, Interrupted, NonFiniteError, RunResult, lr_factor

__all__ = [
    "Callback",
    "CheckpointError",
    "FinetuneConfig",
    "Interrupted",
    "NonFiniteError",
    "PretrainConfig",
    "PretrainTask",
    "RunResult",
    "TrainConfig",
    "Trainer",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_factor",
    "pretrain",
    "save_checkpoint",
]
