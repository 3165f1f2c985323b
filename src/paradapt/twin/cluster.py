"""The twin of a cluster: N simulated engines behind one router, on one simulated timeline.

Each replica is a :class:`~paradapt.twin.sim.SimEngine` (the real engine's scheduler and
adapter cache on a clock priced by the cost model), each with every adapter of the workload on
its disk tier (shared storage). The router is the same object the Ray deployment will use
(:mod:`paradapt.cluster.router`); it decides from :class:`~paradapt.cluster.state.ReplicaState`
snapshots built from each simulated engine's real cache and scheduler state
(:func:`~paradapt.cluster.state.replica_state`), just as a real replica reports them.

The timeline: replicas run in parallel, so each engine keeps its own clock, and they meet at
every arrival. Before routing a request that arrives at ``t``, every replica runs its steps
that start before ``t`` (an idle one jumps to ``t``); the router then sees the replicas as
they are, and the chosen engine queues the request. A replica in the middle of a step at ``t``
queues it when the step ends, exactly as the single-engine replay does
(:func:`paradapt.twin.replay.replay`), so a one-replica cluster gives the single-engine twin's
numbers. ``stats_period`` > 0 models stale stats: the router gets snapshots refreshed only
that often (Ray replicas report routing stats periodically), while the engines run on.

Behind Ray Serve (the cost model's ``ray`` section, :class:`~paradapt.twin.costmodel.RayCost`):
every replica step costs Ray's per-token time more, and replicas sharing one machine
(``shared``) share its cores with each other and with Ray's own processes. When their demand
in the window (busy replicas x ``replica_cpu`` + ``outside_cpu`` x tokens/s) passes the cores,
every step and move is stretched by the one factor that brings it down to the cores (found by
bisection, each try a full simulation): the operating system shares the cores out in time.

Metrics: the whole cluster through :func:`~paradapt.twin.metrics.summarize` (the same
definitions as one engine: throughput, TTFT, TPOT, served fractions, ...), each replica over
the requests it was sent, plus the cluster's own: requests and load per replica, load
imbalance, the router's hit rate and counters, and starved adapters.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ..cluster.router import Router, RouterStats
from ..cluster.state import ReplicaState, replica_state
from ..errors import ConfigError
from ..serve.cache import CacheStats
from ..serve.core import EngineConfig
from ..serve.workload import Workload, WorkloadRequest, WorkloadSpec
from .costmodel import CostModel, RayCost
from .metrics import TwinResult, summarize
from .replay import ReplayLog, collect, step_event
from .sim import SimBackend, SimEngine, engine_config


@dataclass
class ClusterResult:
    """Metrics of one simulated cluster run.

    ``result``: the whole cluster (all replicas' steps and requests, one engine's definitions);
    ``replicas``: each replica's metrics over the requests routed to it; ``requests``: requests
    routed to each replica; ``load``: tokens (prompt + output) routed to each replica;
    ``imbalance``: max over mean of ``load`` (1.0 is perfectly even); ``hit_rate``: the router's
    (adapter requests sent to a replica already holding the adapter); ``router``: its counters;
    ``starved``: adapters with requests of which none finished by the end of the run.
    """

    result: TwinResult
    replicas: dict[str, TwinResult]
    requests: dict[str, int]
    load: dict[str, int]
    imbalance: float
    hit_rate: float
    router: RouterStats
    starved: tuple[str, ...]
    sim_seconds: float = 0.0
    slowdown: float = 1.0  # steps and moves stretched by sharing the machine's cores (1: not)
    cores_used: float | None = None  # behind Ray: the cores the window's work wanted (RayCost.demand)

    def table(self) -> str:
        """A printable summary: the cluster's line, then one line per replica."""
        r = self.result
        split = " / ".join(str(n) for n in self.requests.values())
        lines = [
            f"cluster             {len(self.replicas)} replicas, {r.requests} requests ({split}), "
            f"{r.finished} finished",
            f"throughput          {r.throughput:.1f} tok/s  (ideal {r.ideal_throughput:.1f})",
            f"router              hit rate {self.hit_rate:.2f}, {self.router.spills} spills, "
            f"{self.router.replacements} re-placements",
            f"load imbalance      {self.imbalance:.2f} (max/mean tokens per replica)",
            f"starved adapters    {len(self.starved)}",
        ]
        for name, m in self.replicas.items():
            lines.append(f"  {name:<18}{self.requests[name]} requests, {m.throughput:.1f} tok/s, {m.loads} loads")
        return "\n".join(lines)


@dataclass
class _Replica:
    """One simulated engine, its log, and whether its snapshot is out of date."""

    name: str
    backend: SimBackend
    log: ReplayLog
    routed: list[WorkloadRequest] = field(default_factory=list)
    dirty: bool = True
    state: ReplicaState | None = None
    busy: float = 0.0  # seconds of steps (moves included) inside the window

    def _busy(self, start: float, end: float) -> None:
        self.busy += max(0.0, min(end, self.log.window) - max(start, 0.0))

    def advance(self, until: float, *, jump: bool = True) -> None:
        """Run the steps that start before ``until``; then, if ``jump``, an idle (or stuck)
        engine waits until ``until``, as the single-engine replay waits for the next arrival."""
        b = self.backend
        while b.now() < until and b.has_work():
            start = b.now()
            step = b.step()
            self._busy(start, b.now())
            self.dirty = True  # even an empty step may have prefetched into host memory
            if step.empty:
                break
            self.log.steps.append(step_event(b.now(), step))
        if jump:
            b.wait_until(until)

    def submit(self, req: WorkloadRequest) -> None:
        self.log.requests[self.backend.submit(req)] = req
        self.routed.append(req)
        self.dirty = True

    def snapshot(self) -> ReplicaState:
        """The replica's state as a router sees it (rebuilt only when it changed)."""
        if self.dirty or self.state is None:
            self.state = replica_state(self.name, self.backend.engine)
            self.dirty = False
        return self.state


def simulate_cluster(
    spec: WorkloadSpec | Workload,
    cost: CostModel,
    router: Router,
    *,
    replicas: int,
    max_served: int,
    max_slots: int,
    drain: float = 0.0,
    stats_period: float = 0.0,
    slo_ttft: float | None = None,
    slo_tpot: float | None = None,
    server: bool = True,
    placement: Sequence[Sequence[str]] | None = None,
    ray: bool = True,
    shared: bool = True,
    **engine_knobs: Any,
) -> ClusterResult:
    """Run ``spec``'s workload on ``replicas`` simulated engines behind ``router``.

    Each engine has ``max_served`` host and ``max_slots`` device adapters and the other
    :class:`~paradapt.serve.core.EngineConfig` knobs given (``queue_bound`` defaults to the
    request count, as in :func:`~paradapt.twin.sim.simulate`). ``stats_period``: seconds between
    the router's snapshot refreshes (0: fresh for every request). ``router`` should be fresh:
    its counters are reported as they stand at the end. ``server=False``: replicas without
    the cost model's HTTP server costs (as :func:`~paradapt.twin.sim.simulate`).

    ``placement``: the adapters each replica holds when the window opens (``placement[i]`` for
    ``replica-i``, hottest first; :func:`paradapt.twin.cluster_plan.place_adapters`): each
    engine starts with the first ``max_slots`` on its device and the first ``max_served`` in
    host memory (:meth:`~paradapt.twin.sim.SimEngine.preload`), and the router starts from it
    (:meth:`~paradapt.cluster.router.Router.preplace`; only :class:`AdapterRouter` remembers it).
    None: every replica starts cold and the router remembers nothing.

    ``ray``: price each replica behind Ray Serve with the cost model's ``ray`` section, if it
    has one (and ``server``); ``shared``: the replicas share the cores of the machine it was
    measured on (``paradapt serve --replicas N`` on one machine), so Ray's processes and the
    other replicas slow them down when there are too few (``ClusterResult.slowdown``).
    """
    if not isinstance(replicas, int) or replicas < 1:
        raise ConfigError("replicas", f"must be an integer >= 1, got {replicas!r}")
    if stats_period < 0:
        raise ConfigError("stats_period", f"must be >= 0 seconds, got {stats_period!r}")
    t0 = time.perf_counter()
    workload = spec if isinstance(spec, Workload) else spec.generate()
    engine_knobs.setdefault("queue_bound", max(1, len(workload.requests)))
    config = engine_config(max_served, max_slots, **engine_knobs)
    rc = cost.ray if (ray and server) else None
    setup = _Setup(workload, cost, config, workload.duration + drain, server, rc, placement, stats_period)

    def trial(scale: float) -> float:  # on a copy: tries leave the caller's router untouched
        nodes = _run(setup, replicas, copy.deepcopy(router), scale)
        return _demand(rc, nodes, summarize(_merge([n.log for n in nodes], workload)).throughput, scale)

    scale = _shared_scale(trial, rc) if rc is not None and shared else 1.0
    nodes = _run(setup, replicas, router, scale)
    result = _cluster_result(workload, nodes, router, slo_ttft, slo_tpot)
    result.sim_seconds = time.perf_counter() - t0
    result.slowdown = scale
    if rc is not None:
        result.cores_used = _demand(rc, nodes, result.result.throughput, scale)
    return result


@dataclass
class _Setup:
    """What every simulation of one cluster run shares."""

    workload: Workload
    cost: CostModel
    config: EngineConfig
    stop: float
    server: bool
    ray: RayCost | None
    placement: Sequence[Sequence[str]] | None
    stats_period: float


def _run(setup: _Setup, replicas: int, router: Router, scale: float) -> list[_Replica]:
    """One simulation: route every request as it arrives, then let every replica finish."""
    w = setup.workload
    nodes = [_replica(f"replica-{i}", setup, scale) for i in range(replicas)]
    by_name = {n.name: n for n in nodes}
    if setup.placement is not None:
        _start_from(setup.placement, nodes, router)
    states: list[ReplicaState] = []
    refreshed = float("-inf")
    for req in w.requests:
        for n in nodes:
            n.advance(req.arrival)
        if not states or req.arrival - refreshed >= setup.stats_period:
            states, refreshed = [n.snapshot() for n in nodes], req.arrival
        by_name[router.choose(req.adapter, states)].submit(req)
    for n in nodes:
        n.advance(setup.stop, jump=False)
        collect(n.log, n.backend)
    return nodes


def _demand(rc: RayCost, nodes: list[_Replica], tokens_per_s: float, scale: float) -> float:
    """Cores the run wants in its window: its replicas' busy share (each at ``1 / scale`` of its
    speed) times a busy replica's cores, and Ray's other processes for its tokens/s."""
    busy = sum(n.busy for n in nodes) / nodes[0].log.window / scale
    return rc.demand(busy, tokens_per_s)


def _shared_scale(demand: Callable[[float], float], rc: RayCost, tries: int = 10) -> float:
    """The smallest stretch of every step at which the run's demand fits ``rc.cores`` (1.0 when
    it fits at full speed): bisection, demand falling as the replicas slow down."""
    first = demand(1.0)
    if first <= rc.cores:
        return 1.0
    return crossing(demand, rc.cores, 1.0, first / rc.cores, tries=tries, limit=64.0)[1]


def crossing(
    f: Callable[[float], float], level: float, lo: float, hi: float, *, tries: int, limit: float
) -> tuple[float, float]:
    """Where ``f``, falling as its argument grows and above ``level`` at ``lo``, comes down to
    ``level``: ``hi`` doubles (up to ``limit``) until ``f(hi) <= level``, then ``tries`` halvings
    of the bracket; returns it (``f`` above ``level`` at its low end, not at its high end)."""
    while f(hi) > level and hi < limit:
        lo, hi = hi, 2 * hi
    for _ in range(tries):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > level else (lo, mid)
    return lo, hi


def _start_from(placement: Sequence[Sequence[str]], nodes: list[_Replica], router: Router) -> None:
    """Warm each replica's cache with its share of ``placement`` and hand the router the map."""
    if isinstance(placement, (str, bytes)) or len(placement) != len(nodes):
        got = "a string" if isinstance(placement, (str, bytes)) else f"{len(placement)} lists"
        raise ConfigError("placement", f"needs one list of adapters per replica ({len(nodes)}), got {got}")
    for node, adapters in zip(nodes, placement, strict=True):
        node.backend.engine.preload(adapters)
    router.preplace({n.name: list(adapters) for n, adapters in zip(nodes, placement, strict=True)})


def _replica(name: str, setup: _Setup, scale: float) -> _Replica:
    """A fresh simulated engine with every adapter of the workload on its disk tier (shared storage)."""
    w = setup.workload
    engine = SimEngine(w, setup.cost, setup.config, server=setup.server, ray=setup.ray, scale=scale)
    return _Replica(name, SimBackend(engine), ReplayLog(w, w.duration, setup.stop))


def _cluster_result(
    workload: Workload, nodes: list[_Replica], router: Router, slo_ttft: float | None, slo_tpot: float | None
) -> ClusterResult:
    """Summarize the whole cluster and each replica; count the cluster's own metrics."""
    merged = _merge([n.log for n in nodes], workload)
    per: dict[str, TwinResult] = {}
    for n in nodes:
        n.log.workload = Workload(None, workload.adapters, tuple(n.routed), workload.duration)
        per[n.name] = summarize(n.log, slo_ttft, slo_tpot)
    load = {n.name: sum(r.prompt_len + r.output_len for r in n.routed) for n in nodes}
    mean = sum(load.values()) / len(load)
    return ClusterResult(
        result=summarize(merged, slo_ttft, slo_tpot),
        replicas=per,
        requests={n.name: len(n.routed) for n in nodes},
        load=load,
        imbalance=max(load.values()) / mean if mean else float("nan"),
        hit_rate=router.stats.hit_rate,
        router=router.stats,
        starved=_starved(merged),
    )


def _merge(logs: list[ReplayLog], workload: Workload) -> ReplayLog:
    """One log of every replica's requests, steps (in order of their ends) and summed cache stats."""
    merged = ReplayLog(workload, logs[0].window, logs[0].stop)
    for log in logs:
        merged.requests.update(log.requests)
        merged.first.update(log.first)
        merged.finished.update(log.finished)
        merged.steps.extend(log.steps)
        merged.end = max(merged.end, log.end)
    merged.steps.sort(key=lambda ev: ev.end)
    merged.stats = CacheStats(
        **{f.name: sum(getattr(log.stats, f.name) for log in logs) for f in fields(CacheStats)}
    )
    return merged


def _starved(log: ReplayLog) -> tuple[str, ...]:
    """Adapters with requests in the run of which none finished by its end (window + drain)."""
    asked = {r.adapter for r in log.requests.values() if r.adapter is not None}
    served = {log.requests[rid].adapter for rid, t in log.finished.items() if t <= log.stop}
    return tuple(sorted(asked - served))
