"""Scale-out (issue 18): routing requests across many paradapt engines by adapter.

Pure Python: no Ray import here. The routers decide from small replica snapshots
(:class:`ReplicaState`), so a Ray Serve deployment and the digital twin
(:mod:`paradapt.twin.cluster`) drive the same code.
"""

from .router import (
    RESIDENCY_SCORES,
    ROUTERS,
    AdapterRouter,
    MultiplexRouter,
    NoReplicaError,
    RandomRouter,
    Router,
    RouterStats,
    make_router,
    residency_score,
    two_choices,
)
from .state import ReplicaState, replica_state

__all__ = [
    "RESIDENCY_SCORES",
    "ROUTERS",
    "AdapterRouter",
    "MultiplexRouter",
    "NoReplicaError",
    "RandomRouter",
    "ReplicaState",
    "Router",
    "RouterStats",
    "replica_state",
    "residency_score",
    "make_router",
    "two_choices",
]
