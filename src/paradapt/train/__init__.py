"""Training adapters on a frozen base: data loading, the loop, and the ``paradapt train`` command.

``train(config)`` runs a whole YAML-configured run (``paradapt train CONFIG.yaml``);
``Trainer`` is the loop itself, for adapters already added to a model.
"""

from .config import RunConfig, load_config
from .loop import Task, TrainArgs, Trainer
from .run import Interrupted, TrainResult, train

__all__ = ["Interrupted", "RunConfig", "Task", "TrainArgs", "TrainResult", "Trainer", "load_config", "train"]
