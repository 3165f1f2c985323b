"""What a router knows about one replica: a small, frozen snapshot of its adapter residency and
its queue, and how to take one from an engine's planning core.

The router decides from snapshots, never from live engines: Ray Serve hands a custom router
the stats each replica last reported (``record_routing_stats()``), so they may be seconds old,
and the digital twin builds the very same snapshots from its simulated engines. Keeping the
router's input this small is what lets one router class serve both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the snapshot reads a core's public state; the router never needs the class
    from ..serve.core import ServeCore


@dataclass(frozen=True)
class ReplicaState:
    """One replica as the router sees it.

    ``on_device``: adapters in its device slots; ``on_host``: adapters in its host memory (the
    device ones included, as :class:`~paradapt.serve.cache.AdapterCache` counts them);
    ``free_slots``: device slots no running request holds, so a new adapter can take one now
    (evicting at most an idle resident) instead of waiting for a slot to drain; ``queued`` and
    ``running``: requests waiting and admitted; ``alive``: False once the replica is known dead
    (a dead replica is never chosen).
    """

    name: str
    on_device: frozenset[str] = frozenset()
    on_host: frozenset[str] = frozenset()
    free_slots: int = 0
    queued: int = 0
    running: int = 0
    alive: bool = True

    @property
    def load(self) -> int:
        """Requests the replica holds (waiting plus running): what balancing compares."""
        return self.queued + self.running

    def holds(self, adapter: str) -> bool:
        """Is ``adapter`` in this replica's memory (device or host)? A request there loads nothing
        from disk: what the routers count as a cache hit."""
        return adapter in self.on_device or adapter in self.on_host


def replica_state(name: str, core: ServeCore, *, alive: bool = True) -> ReplicaState:
    """The snapshot of an engine's planning core (the real engine's, or the twin's ``SimEngine``).

    Only public reads of the cache and the scheduler, so the real replica (reporting its
    routing stats) and the twin describe themselves identically.
    """
    cache = core.cache
    held = len(core.scheduler.running_adapters)
    return ReplicaState(
        name=name,
        on_device=frozenset(cache.on_device),
        on_host=frozenset(cache.on_host),
        free_slots=max(0, cache.max_slots - held),
        queued=core.num_waiting,
        running=core.num_running,
        alive=alive,
    )
