"""Training adapters on a frozen base: data loading, the loop, and the ``paradapt train`` command.

``train(config)`` runs a whole YAML-configured run (``paradapt train CONFIG.yaml``);
``Trainer`` is the loop itself, for adapters already added to a model;
``ParadaptTrainer`` (from ``paradapt.train.hf``, imported on first use) is a
``transformers.Trainer`` that trains and saves adapters only.
"""

from .config import RunConfig, load_config
from .loop import Task, TrainArgs, Trainer
from .run import Interrupted, TrainResult, load_mixture, train

__all__ = [
    "Interrupted",
    "ParadaptTrainer",
    "RunConfig",
    "Task",
    "TrainArgs",
    "TrainResult",
    "Trainer",
    "load_config",
    "load_mixture",
    "train",
]


def __getattr__(name: str):
    """``ParadaptTrainer`` on first use: importing ``transformers.Trainer`` is slow."""
    if name == "ParadaptTrainer":
        from .hf import ParadaptTrainer

        return ParadaptTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
