"""Training applications: pre-training and fine-tuning with any gradproj optimizer, resumable.

Example:
    >>> from gradproj.train import PretrainConfig
    >>> PretrainConfig(model="llama-tiny", steps=5).optimizer
    'galore_adamw'
"""

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import FinetuneConfig, PretrainConfig, TrainConfig
from .loop import Interrupted, NonFiniteError, RunResult, Trainer, lr_factor
from .pretrain import PretrainTask, pretrain

__all__ = [
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
