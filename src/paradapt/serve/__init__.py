"""Serving engine: pure-Python policy (workload, adapter cache, scheduler); the model runner comes next.

The policy modules import no torch, so the digital twin (issue 6) runs the very same code
against a simulated clock.
"""

from .cache import AdapterCache, AdapterPinnedError, CacheStats, MemoryBudget, Move, Residency
from .scheduler import (
    PrefillChunk,
    QueueFullError,
    Request,
    RequestState,
    RequestTooLargeError,
    Scheduler,
    SchedulerConfig,
    StepPlan,
)
from .workload import AdapterSpec, Workload, WorkloadRequest, WorkloadSpec, adapter_probabilities, generate

__all__ = [
    "AdapterCache",
    "AdapterPinnedError",
    "AdapterSpec",
    "CacheStats",
    "MemoryBudget",
    "Move",
    "PrefillChunk",
    "QueueFullError",
    "Request",
    "RequestState",
    "RequestTooLargeError",
    "Residency",
    "Scheduler",
    "SchedulerConfig",
    "StepPlan",
    "Workload",
    "WorkloadRequest",
    "WorkloadSpec",
    "adapter_probabilities",
    "generate",
]
