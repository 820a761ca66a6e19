"""Training: configuration, the loop, checkpoints, the learning-rate schedule, distributed helpers."""

from ramba.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from ramba.train.config import ConfigError, ConfigTypeError, TrainConfig, describe, load_config
from ramba.train.loop import train
from ramba.train.schedule import WarmupCosine

__all__ = [
    "TrainConfig",
    "load_config",
    "describe",
    "ConfigError",
    "ConfigTypeError",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "verify_checkpoint",
    "train",
    "WarmupCosine",
]
