"""Which replica serves a request: routing by adapter across many engines (issue 18).

Pure Python and deterministic given a seed, so the same router object can sit behind a Ray
Serve deployment (its custom ``RequestRouter``) and inside the digital twin
(:mod:`paradapt.twin.cluster`), where it decides from simulated replicas' state. A router sees
only :class:`~paradapt.cluster.state.ReplicaState` snapshots, which may be stale, plus what it
remembers of its own decisions.

Three routers share one interface, ``choose(adapter, replicas) -> replica name``:

* :class:`AdapterRouter`, paradapt's policy: sticky -> residency -> bounded spill -> fewest
  adapters; the base model's requests balance freely (power of two choices);
* :class:`MultiplexRouter`, a model of Ray Serve's default model multiplexing, the baseline;
* :class:`RandomRouter`, the floor.

The facts the policy is built on (collected in issue 18): users of Ray Serve, AIBrix, llm-d
and vLLM report a hot adapter stuck on one replica, eviction thrash when each replica holds
few adapters, routing on stale stats, and ``/v1/models`` differing between replicas (ray
#48741, #65691, aibrix #1675, llm-d-router #709, vllm #12174). llm-d scores pods by adapter
residency (active 1.0, free slot 0.8, queued 0.6); AIBrix places an adapter on the replica
holding the fewest; dLoRA places adapters to minimise the maximum replica load, replicating
hot ones. Measured with a toy Ray deployment (2 replicas, 6 skewed adapters): Ray's default
multiplexing gave a 0.68 cache-hit rate and a 93/27 request split, a router that remembers
where it sent each adapter 0.87.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import ConfigError, ParadaptError
from .state import ReplicaState

#: Residency scores (higher is better) for placing an adapter the router has not placed yet.
#: ``device`` is llm-d's "active" (1.0): the request runs at once. ``host`` has no llm-d
#: counterpart (llm-d has no host tier); it ranks between active and a free slot because it
#: costs a host -> device copy but no disk read. ``free_slot`` is llm-d's 0.8: the adapter can
#: be loaded without waiting for a running adapter's slot to drain. llm-d's "queued" (0.6, the
#: adapter is waiting to load there) needs no score here: the router remembers where it sent
#: each adapter (the sticky rule), which is fresher than any reported queue.
RESIDENCY_SCORES = {"device": 1.0, "host": 0.9, "free_slot": 0.8, "none": 0.0}


class NoReplicaError(ParadaptError, RuntimeError):
    """No live replica to route to (every replica is dead or none is known)."""


@dataclass
class RouterStats:
    """What a router did: requests routed, cache hits, spills and re-placements.

    ``hits``: adapter requests sent to a replica whose snapshot already held the adapter (device
    or host), so nothing had to come from disk; ``spills``: extra replicas given to a hot
    adapter; ``replacements``: adapters placed anew because every replica they were on died.
    """

    requests: int = 0
    adapter_requests: int = 0
    hits: int = 0
    spills: int = 0
    replacements: int = 0

    @property
    def hit_rate(self) -> float:
        """Hits over adapter requests (NaN before any adapter request)."""
        return self.hits / self.adapter_requests if self.adapter_requests else float("nan")


def residency_score(adapter: str, replica: ReplicaState) -> float:
    """How ready ``replica`` is to serve ``adapter`` now (:data:`RESIDENCY_SCORES`)."""
    if adapter in replica.on_device:
        return RESIDENCY_SCORES["device"]
    if adapter in replica.on_host:
        return RESIDENCY_SCORES["host"]
    if replica.free_slots > 0:
        return RESIDENCY_SCORES["free_slot"]
    return RESIDENCY_SCORES["none"]


def two_choices(rng: random.Random, replicas: Sequence[ReplicaState]) -> ReplicaState:
    """Power of two choices: the less loaded of two replicas drawn at random (the first on a tie).

    Why not simply the least loaded: stats are stale, and every request routed on the same stale
    snapshot would pile onto the same "least loaded" replica; two random draws spread them while
    still avoiding the busy ones (Mitzenmacher; Ray Serve's default router does the same).
    """
    if len(replicas) == 1:
        return replicas[0]
    a, b = rng.sample(list(replicas), 2)
    return b if b.load < a.load else a


class Router(ABC):
    """The interface the Ray deployment and the twin drive: ``choose`` per request, ``forget``
    when an adapter is unloaded cluster-wide. ``stats`` counts alike for every router, so
    their hit rates compare."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.stats = RouterStats()

    def choose(self, adapter: str | None, replicas: Sequence[ReplicaState]) -> str:
        """The name of the replica that serves a request for ``adapter`` (None: the base model).

        Dead replicas are never chosen: a request sent to one fails (in the issue's run, a replica
        killed with SIGKILL under load failed 4 of 240 requests with 500).
        Raises :class:`NoReplicaError` when none is alive.
        """
        alive = [r for r in replicas if r.alive]
        if not alive:
            raise NoReplicaError(f"no live replica among {len(replicas)} known")
        chosen = self._pick(adapter, alive, replicas)
        self.stats.requests += 1
        if adapter is not None:
            self.stats.adapter_requests += 1
            self.stats.hits += chosen.holds(adapter)
        return chosen.name

    def forget(self, adapter: str) -> None:
        """``adapter`` was unloaded everywhere: drop what the router remembers of it (the
        baselines remember nothing)."""
        return None

    def preplace(self, placement: Mapping[str, Sequence[str]]) -> None:
        """Start from a planned placement (``replica name -> adapters it holds``, hottest first),
        as if the router had sent each adapter there: the cluster planner's
        (:mod:`paradapt.twin.cluster_plan`). The baselines remember nothing, so they ignore it
        (they still see the replicas' warm caches in their snapshots)."""
        return None

    @abstractmethod
    def _pick(
        self, adapter: str | None, alive: list[ReplicaState], replicas: Sequence[ReplicaState]
    ) -> ReplicaState:
        """The chosen replica among ``alive`` (never empty); ``replicas`` also has the dead ones."""


class RandomRouter(Router):
    """Uniformly random over live replicas: the floor every policy must beat."""

    def _pick(self, adapter, alive, replicas):
        return self.rng.choice(alive)


class MultiplexRouter(Router):
    """A model of Ray Serve's default model multiplexing (``@serve.multiplexed``), the baseline.

    Ray's router prefers the replicas that already hold the model id, choosing between them by
    power of two choices on queue length; when none holds it, it takes the replicas holding the
    fewest models; each replica evicts its least recently used model when full (in the twin, the
    engine's own :class:`~paradapt.serve.cache.AdapterCache` does that). Preferring holders
    whatever their queues is how a hot adapter stays stuck on one replica (the toy deployment's
    93/27 split), and choosing by the replicas' reported models alone is routing on stale stats.
    """

    def _pick(self, adapter, alive, replicas):
        if adapter is None:
            return two_choices(self.rng, alive)
        holders = [r for r in alive if r.holds(adapter)]
        if holders:
            return two_choices(self.rng, holders)
        fewest = min(len(r.on_host | r.on_device) for r in alive)
        return two_choices(self.rng, [r for r in alive if len(r.on_host | r.on_device) == fewest])


class AdapterRouter(Router):
    """paradapt's policy: sticky -> residency -> bounded spill -> fewest adapters.

    For a request for an adapter, in order:

    1. **Sticky.** If the router placed the adapter before, it goes to one of the replicas it
       was sent to (the least loaded of them), whatever the stats say. The router's memory of
       its own decisions is exact and current; the replicas' reported residency may be seconds
       old (routing on stale stats is one of the complaints). The toy Ray deployment measured
       0.87 hits for remembering against 0.68 for Ray's multiplexing.
    2. **Residency**, for an adapter not placed yet (or re-placed): the replica that can run it
       soonest by :func:`residency_score`, device > host > a free slot. Residency comes from
       the replicas' own cache state, so it also covers what another router instance (Ray runs
       one per proxy) placed.
    3. **Bounded spill.** When every replica of a *hot* adapter has more than ``spill_queue``
       requests waiting, the adapter gets one more replica, up to ``max_replicas_per_adapter``,
       and this request goes there. Without it a hot adapter is stuck on one replica while
       others idle (the complaint, and the 93/27 split); without the bound a hot adapter
       spreads everywhere and every replica thrashes its cache (the other complaint). dLoRA
       replicates hot adapters for the same reason: to minimise the maximum replica load.
       Two guards keep spills for imbalance, not overload: the adapter must be hot (at least
       a fair replica's share, ``1 / live replicas``, of the router's last ``hot_window``
       adapter requests), and the new replica must itself be below the threshold. Without
       them a saturated cluster spilled every adapter it saw to ``max_replicas_per_adapter``
       replicas (1,299 spills on 8 replicas x 1,000 adapters in the twin) and its hit rate
       fell below Ray's multiplexing, for no gain: every replica was as busy.
    4. **Fewest adapters**, to break residency ties: the replica the router has placed the
       fewest adapters on (AIBrix's placement rule), then the least loaded, then by name. It
       spreads adapters so each replica's cache holds its share, not everyone's.

    Base-model requests need no adapter, so they balance freely (:func:`two_choices`). A
    replica seen dead (or gone from the snapshot list) is dropped from every placement; an
    adapter left with no replica is placed anew (a re-placement).
    """

    def __init__(
        self, seed: int = 0, *, spill_queue: int = 8, max_replicas_per_adapter: int = 4, hot_window: int = 256
    ):
        super().__init__(seed)
        if not isinstance(spill_queue, int) or spill_queue < 0:
            raise ConfigError("spill_queue", f"must be an integer >= 0, got {spill_queue!r}")
        if not isinstance(max_replicas_per_adapter, int) or max_replicas_per_adapter < 1:
            raise ConfigError(
                "max_replicas_per_adapter", f"must be an integer >= 1, got {max_replicas_per_adapter!r}"
            )
        if not isinstance(hot_window, int) or hot_window < 1:
            raise ConfigError("hot_window", f"must be an integer >= 1, got {hot_window!r}")
        self.spill_queue = spill_queue
        self.max_replicas_per_adapter = max_replicas_per_adapter
        self._placed: dict[str, list[str]] = {}  # adapter -> its replicas, in the order placed
        self._count: Counter[str] = Counter()  # replica -> adapters placed on it
        self._orphans: set[str] = set()  # adapters whose every replica died
        self._recent: deque[str] = deque(maxlen=hot_window)  # the latest adapter requests routed
        self._recent_count: Counter[str] = Counter()

    def placements(self, adapter: str) -> tuple[str, ...]:
        """The replicas the router sends ``adapter`` to, in the order it placed them."""
        return tuple(self._placed.get(adapter, ()))

    def forget(self, adapter: str) -> None:
        for name in self._placed.pop(adapter, ()):
            self._count[name] -= 1
        self._orphans.discard(adapter)

    def preplace(self, placement: Mapping[str, Sequence[str]]) -> None:
        """Remember each adapter on the replicas ``placement`` lists it under (in the mapping's
        order of replicas), after any placement it already has. Sticky routing then spreads a
        replicated adapter over all of them from its first request, instead of waiting for its
        replicas' queues to pass ``spill_queue``, and ``max_replicas_per_adapter`` bounds spills
        only, not a planned placement (dLoRA places a hot adapter on as many replicas as its
        load needs)."""
        for replica, adapters in placement.items():
            for adapter in adapters:
                names = self._placed.setdefault(adapter, [])
                if replica not in names:
                    names.append(replica)
                    self._count[replica] += 1

    def _pick(self, adapter, alive, replicas):
        self._drop_dead({r.name for r in alive})
        if adapter is None:
            return two_choices(self.rng, alive)
        self._note(adapter)
        by_name = {r.name: r for r in alive}
        mine = [by_name[n] for n in self._placed.get(adapter, ())]
        if not mine:
            return self._place(adapter, alive)
        if self._should_spill(adapter, mine, len(alive)):
            idle = [r for r in alive if r.name not in self._placed[adapter] and not self._busy(r)]
            if idle:
                self.stats.spills += 1
                return self._place(adapter, idle)
        return min(mine, key=lambda r: r.load)  # min keeps the first placed on a tie

    def is_hot(self, adapter: str, live: int) -> bool:
        """Has ``adapter`` at least a fair replica's share (``1 / live``) of the recent requests?"""
        return live * self._recent_count[adapter] >= len(self._recent)

    def _busy(self, r: ReplicaState) -> bool:
        return r.queued > self.spill_queue

    def _should_spill(self, adapter: str, mine: list[ReplicaState], live: int) -> bool:
        """Every replica of a hot adapter is busy, and it may have one more."""
        if len(mine) >= self.max_replicas_per_adapter or not all(self._busy(r) for r in mine):
            return False
        return self.is_hot(adapter, live)

    def _note(self, adapter: str) -> None:
        """Count ``adapter`` in the sliding window of recent adapter requests (for hotness)."""
        if len(self._recent) == self._recent.maxlen:
            old = self._recent[0]
            self._recent_count[old] -= 1
            if not self._recent_count[old]:
                del self._recent_count[old]
        self._recent.append(adapter)
        self._recent_count[adapter] += 1

    def _place(self, adapter: str, candidates: list[ReplicaState]) -> ReplicaState:
        """Put ``adapter`` on one more replica: best residency, then fewest adapters, then load."""
        best = min(
            candidates, key=lambda r: (-residency_score(adapter, r), self._count[r.name], r.load, r.name)
        )
        if adapter in self._orphans:
            self._orphans.discard(adapter)
            self.stats.replacements += 1
        self._placed.setdefault(adapter, []).append(best.name)
        self._count[best.name] += 1
        return best

    def _drop_dead(self, live: set[str]) -> None:
        """Forget placements on replicas that are not live; adapters left with none become orphans."""
        gone = [n for n, c in self._count.items() if c > 0 and n not in live]
        if not gone:
            return
        for adapter, names in list(self._placed.items()):
            kept = [n for n in names if n not in gone]
            if len(kept) == len(names):
                continue
            if kept:
                self._placed[adapter] = kept
            else:
                del self._placed[adapter]
                self._orphans.add(adapter)
        for n in gone:
            del self._count[n]



#: The routers by the name ``paradapt serve --replicas --router`` and the benchmarks use.
ROUTERS: dict[str, type[Router]] = {"adapter": AdapterRouter, "multiplex": MultiplexRouter, "random": RandomRouter}


def make_router(name: str, seed: int = 0) -> Router:
    """The router called ``name`` in :data:`ROUTERS` (a ConfigError naming ``router`` otherwise)."""
    if name not in ROUTERS:
        raise ConfigError("router", f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}")
    return ROUTERS[name](seed)
