"""Training: configuration, the loop, checkpoints, the learning-rate schedule, distributed helpers."""

from ramba.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from ramba.train.config import ConfigError, ConfigTypeError, TrainConfig, describe, load_config
from ramba.train.loop import Trainer, train
from ramba.train.schedule import WarmupCosine
from ramba.train.step import TrainStep, make_optimizer

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
    "Trainer",
    "TrainStep",
    "make_optimizer",
    "WarmupCosine",
]
