"""Serving engine: pure-Python policy (workload, adapter cache, scheduler) and the model side
(Runner, sampling, Engine).

The policy modules (workload, cache, scheduler, and ``core``: ``ServeCore``, ``EngineConfig``)
import no torch, so the digital twin (issue 6) runs the very same code against a simulated
clock, and ``import paradapt.serve`` stays cheap (tests/core/test_imports.py); the model side
(``Engine``, ``EncoderEngine``, ``Runner``, ``SamplingParams``, ...) is imported on first use.
``hf_paged`` is the one module that uses transformers' private continuous-batching API.

The HTTP server (the ``[serve]`` extra) is six modules: ``app`` (``create_app``, the routes),
``engine_thread`` (the thread that alone steps the engine), ``protocol`` (the OpenAI wire
format), ``security`` (API key, Host check, body bound, access log), ``limits`` (bounds
checked before expensive work) and ``metrics`` (Prometheus text, with prometheus-client).
"""

from .cache import AdapterCache, AdapterPinnedError, CacheStats, MemoryBudget, Move, Residency
from .core import AdapterLoadError, EngineConfig, ServeCore
from .scheduler import (
    PrefillChunk,
    QueueFullError,
    Request,
    RequestState,
    RequestTooLargeError,
    ScheduledStep,
    Scheduler,
    SchedulerConfig,
)
from .workload import AdapterSpec, Workload, WorkloadRequest, WorkloadSpec, adapter_probabilities, generate

_LAZY = {
    "AdapterStore": "engine",
    "EncoderEngine": "engine",
    "Engine": "engine",
    "RequestHandle": "engine",
    "IncrementalDetokenizer": "detokenize",
    "NonFiniteLogitsError": "runner",
    "Runner": "runner",
    "SamplingParams": "sampling",
    "create_app": "app",  # needs the [serve] extra (fastapi, uvicorn)
}


def __getattr__(name: str):
    """The model-side classes, imported on first use (they need torch and transformers)."""
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{mod}", __name__), name)


__all__ = [
    *_LAZY,
    "AdapterCache",
    "AdapterLoadError",
    "EngineConfig",
    "ServeCore",
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
    "ScheduledStep",
    "Workload",
    "WorkloadRequest",
    "WorkloadSpec",
    "adapter_probabilities",
    "generate",
]
