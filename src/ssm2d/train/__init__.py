"""Training and evaluation: config, engine, checkpoints, distributed runs, comparisons."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .compare import compare, format_table
from .config import ConfigError, TrainConfig, load_config, parse_override
from .distributed import shutdown_distributed
from .engine import NonFiniteLossError, evaluate, train_one_epoch
from .inference import evaluate_checkpoint, load_trained_model
from .trainer import build_model, train

__all__ = [
    "CheckpointError",
    "ConfigError",
    "NonFiniteLossError",
    "TrainConfig",
    "build_model",
    "compare",
    "evaluate",
    "evaluate_checkpoint",
    "format_table",
    "load_checkpoint",
    "load_config",
    "load_trained_model",
    "parse_override",
    "save_checkpoint",
    "shutdown_distributed",
    "train",
    "train_one_epoch",
]
