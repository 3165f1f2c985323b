"""The digital twin of the serving engine (issue 6).

``simulate(spec, cost, max_served=S, max_slots=K)`` runs the engine's own scheduler and
adapter-cache code (:class:`paradapt.serve.core.ServeCore`) on a simulated clock, each step
and adapter move priced by a :class:`CostModel` fitted on this machine (``paradapt profile``).
Importing this package needs no torch; profiling does (:mod:`paradapt.twin.profile`).
``simulate_cluster(spec, cost, router, replicas=N, ...)`` runs N such engines behind one router
(:mod:`paradapt.cluster.router`, issue 18). See docs/twin.md.
"""

from .cluster import ClusterResult, simulate_cluster
from .costmodel import CostModel, CostModelMismatch, machine_fingerprint, model_fingerprint
from .metrics import TwinResult, summarize
from .replay import RealBackend, ReplayLog, replay
from .sim import ENGINE_KNOBS, SimBackend, SimEngine, engine_config, simulate

__all__ = [
    "ENGINE_KNOBS",
    "ClusterResult",
    "CostModel",
    "CostModelMismatch",
    "RealBackend",
    "ReplayLog",
    "SimBackend",
    "SimEngine",
    "TwinResult",
    "engine_config",
    "machine_fingerprint",
    "model_fingerprint",
    "replay",
    "simulate",
    "simulate_cluster",
    "summarize",
]
