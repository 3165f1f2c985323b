"""The cluster planner behind ``paradapt plan --replicas``: how many replicas, each engine's
``(max_served, max_slots)``, and which adapters each replica holds, for a workload, in the twin.

Three decisions, each checked in the cluster twin (:func:`~paradapt.twin.cluster.simulate_cluster`,
the real :class:`~paradapt.cluster.router.AdapterRouter` in front of N simulated engines):

1. **Placement** (:func:`place_adapters`), dLoRA's and AIBrix's idea in a small greedy: every
   adapter gets enough replicas that no copy carries more than ``max_share`` (half) of one
   replica's fair share of the load, so the hottest adapters are replicated and a hot adapter
   never pins one replica (a user complaint the issue collects); then, hottest first, each copy
   goes to the replica with the least expected load so far that does not hold it yet
   (longest-processing-time scheduling: the maximum load stays near the mean), ties to the
   replica holding the fewest adapters (AIBrix's rule). Every adapter is placed, the ones with
   no traffic too. In the twin each replica starts with its share warm and the router starts
   from the map (``simulate_cluster(placement=...)``).
2. **Replica count**: with ``replicas=N`` the plan is for N; with a target throughput it is the
   smallest N (up to ``max_replicas``) whose twin run meets it (:func:`met`): a guess from one
   replica's saturated capacity, proportional steps up while the target is missed, then
   bisection between the largest N that missed and the smallest that met.
3. **Knobs**: each engine's ``(max_served, max_slots)`` (the same on every replica, as
   ``paradapt serve --replicas`` passes one set of flags to all), refined at the chosen N by the
   single-engine planner's hill climb (:func:`paradapt.twin.configurator.refine`) over its grid
   (:func:`paradapt.twin.search.config_grid`, here up to the adapters the busiest replica
   holds), with the cluster's throughput as the objective and meeting the target as the
   starvation test; if the refined knobs meet it, one replica fewer is tried again.

The target is an *offered load* in tokens/s (prompt + output): the workload's traffic is
scaled to offer it (:func:`scale_to_target`), keeping its mix (popularity, lengths, kinds),
and a plan meets it when the cluster serves at least 90 % of it within the window
(Agullo et al.'s starvation-free, the single-engine planner's test) and no adapter with requests
is left without a finished one by the end of the drain. Every twin run is counted and bounded
(``max_runs``), and the plan lists them.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..cluster.router import AdapterRouter
from ..errors import ConfigError
from ..serve.workload import Workload, WorkloadSpec
from .cluster import ClusterResult, simulate_cluster
from .configurator import refine
from .costmodel import CostModel
from .metrics import STARVATION_SHARE
from .search import Trial, config_grid
from .sim import simulate

MAX_SHARE = 0.5  # no copy of an adapter carries more than half a replica's fair share of the load
MAX_RUNS = 16  # twin runs a plan may spend (the capacity probe included)
REFINE_EVALS = 6  # of which the knob refinement at the chosen replica count
DRAIN_SHARE = 0.25  # runs drain a quarter of the window, so a late request can still finish
SCALE_ITERATIONS, SCALE_TOL = 4, 0.01  # a scaled spec's draw offers the target within 1 % (or 4 tries)
SERVED_CAP = 1024  # the knob grid's host adapters stop here (more host copies than that is memory, not speed)
SHOWN_REPLICAS = 8  # replicas the printed summary lists one by one
START_SERVED, START_SLOTS = 64, 16  # where the knob search starts (then refined in the twin)


# -- placement -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Which adapters each replica holds at start, and what load that puts on it.

    ``replicas[i]``: replica-i's adapters, hottest first; ``load[i]``: its expected tokens/s
    (each adapter's load split evenly over its copies); ``copies``: replicas per adapter.
    """

    replicas: tuple[tuple[str, ...], ...]
    load: tuple[float, ...]
    copies: dict[str, int]

    @property
    def imbalance(self) -> float:
        """Max over mean expected load (1.0: perfectly even; NaN with no load)."""
        mean = sum(self.load) / len(self.load)
        return max(self.load) / mean if mean > 0 else float("nan")

    @property
    def replicated(self) -> dict[str, int]:
        """The adapters placed on more than one replica, and on how many."""
        return {a: c for a, c in self.copies.items() if c > 1}

    def holders(self, adapter: str) -> tuple[int, ...]:
        """The indices of the replicas holding ``adapter``."""
        return tuple(i for i, names in enumerate(self.replicas) if adapter in names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "replicas": [list(names) for names in self.replicas],
            "load": list(self.load),
            "imbalance": self.imbalance,
            "replicated": self.replicated,
        }


def adapter_loads(workload: WorkloadSpec | Workload) -> dict[str, float]:
    """Expected tokens/s of each adapter: a spec's power-law shares of its rate times its mean
    request length; a trace's (or a spec-less workload's) counted from its requests. Adapters
    without traffic are listed with 0, so a placement covers them too."""
    spec = workload if isinstance(workload, WorkloadSpec) else workload.spec
    if spec is not None:
        per_request = sum(spec.input_len) / 2 + sum(spec.output_len) / 2
        return {a: r * per_request for a, r in spec.adapter_rates().items()}
    loads = {a.name: 0.0 for a in workload.adapters}
    for r in workload.requests:
        if r.adapter is not None:
            loads[r.adapter] = loads.get(r.adapter, 0.0) + (r.prompt_len + r.output_len) / workload.duration
    return loads


def place_adapters(loads: Mapping[str, float], replicas: int, *, max_share: float = MAX_SHARE) -> Placement:
    """The greedy placement of the module docstring: copies by load, then the least loaded replica.

    ``loads``: expected load per adapter (any unit, e.g. :func:`adapter_loads`); ``max_share``:
    the most of a replica's fair share (total / replicas) one copy may carry. Deterministic:
    ties go to the adapter name, then the replica index.
    """
    if not isinstance(replicas, int) or replicas < 1:
        raise ConfigError("replicas", f"must be an integer >= 1, got {replicas!r}")
    if not max_share > 0:
        raise ConfigError("max_share", f"must be positive, got {max_share!r}")
    if not loads:  # base-model traffic only: nothing to place, the replicas balance it freely
        return Placement(tuple(() for _ in range(replicas)), (0.0,) * replicas, {})
    total = sum(loads.values())
    per_copy_cap = max_share * total / replicas
    copies = {
        a: min(replicas, max(1, math.ceil(v / per_copy_cap))) if per_copy_cap > 0 else 1
        for a, v in loads.items()
    }
    held: list[list[str]] = [[] for _ in range(replicas)]
    load = [0.0] * replicas
    heap = [(0.0, 0, i) for i in range(replicas)]  # (load, adapters held, index): the least loaded first
    for a in sorted(loads, key=lambda a: (-loads[a] / copies[a], a)):
        share = loads[a] / copies[a]
        chosen = [heapq.heappop(heap) for _ in range(copies[a])]  # distinct replicas, least loaded
        for _, count, i in chosen:
            held[i].append(a)
            load[i] += share
            heapq.heappush(heap, (load[i], count + 1, i))
    hottest = {i: sorted(names, key=lambda a: (-loads[a], a)) for i, names in enumerate(held)}
    return Placement(tuple(tuple(hottest[i]) for i in range(replicas)), tuple(load), copies)


# -- the load to plan for --------------------------------------------------------------------------


def offered_load(workload: Workload) -> float:
    """The workload's ideal throughput: every token of every request over the window (tokens/s)."""
    return workload.offered_tokens() / workload.duration


def scale_to_target(workload: WorkloadSpec | Workload, target: float) -> tuple[Workload, float]:
    """``workload`` with its traffic scaled to offer ``target`` tokens/s, and the factor applied.

    A spec (or a workload generated from one) keeps its window and gets ``rate x factor``,
    corrected a few times for the randomness of the draw (within 1 % of the target); a trace keeps its requests
    and has its arrivals (and window) compressed by the factor, so it offers the target exactly.
    """
    if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
        raise ConfigError("target_throughput", f"must be a positive number of tokens/s, got {target!r}")
    base = workload.generate() if isinstance(workload, WorkloadSpec) else workload
    if not base.requests:
        raise ConfigError("workload", "has no requests in its window: nothing to scale to a target")
    factor = target / offered_load(base)
    if base.spec is not None:  # a new draw offers a little more or less: correct the rate a few times
        scaled = base
        for _ in range(SCALE_ITERATIONS):
            scaled = dataclasses.replace(base.spec, rate=base.spec.rate * factor).generate()
            if not scaled.requests or abs(offered_load(scaled) / target - 1) <= SCALE_TOL:
                break
            factor *= target / offered_load(scaled)
        return scaled, factor
    requests = tuple(dataclasses.replace(r, arrival=r.arrival / factor) for r in base.requests)
    return Workload(None, base.adapters, requests, base.duration / factor), factor


# -- the plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterTrial:
    """One twin run of the search: a cluster size and knobs, and what the twin predicted."""

    replicas: int
    max_served: int
    max_slots: int
    throughput: float
    met: bool
    hit_rate: float
    imbalance: float
    starved: int


@dataclass
class ClusterPlan:
    """The recommendation: replica count, each engine's knobs, the placement, and the twin's
    prediction there (``result``). ``met``: the plan meets its target (:func:`met`);
    ``offered``: the load planned for (tokens/s); ``target``: the target asked for (None: the
    workload as given); ``scale``: the factor applied to the workload's traffic; ``trials``:
    every twin run of the search, in order (``probe``: whether a capacity probe ran too)."""

    replicas: int
    max_served: int
    max_slots: int
    placement: Placement
    result: ClusterResult
    met: bool
    offered: float
    target: float | None
    scale: float
    searched: bool
    max_replicas: int
    trials: list[ClusterTrial] = field(default_factory=list)
    probe: bool = False

    @property
    def twin_runs(self) -> int:
        """Twin runs the plan spent: the cluster runs plus the capacity probe."""
        return len(self.trials) + int(self.probe)

    def summary(self) -> str:
        """The recommendation as printed by ``paradapt plan --replicas``."""
        r = self.result.result
        goal = f"target {self.target:,.1f} tokens/s" if self.target is not None else "the workload as given"
        verdict = "MET" if self.met else "NOT MET"
        how = f"searched 1..{self.max_replicas}" if self.searched else "given"
        replicated = sorted(self.placement.replicated.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(f"{a} x{c}" for a, c in replicated[:5]) + (" ..." if len(replicated) > 5 else "")
        sizes = [len(names) for names in self.placement.replicas]
        lines = [
            f"plan for {goal}: {verdict} (offered {self.offered:,.1f} tokens/s"
            + (f", the workload's traffic x{self.scale:.3g})" if self.scale != 1.0 else ")"),
            f"replicas            {self.replicas} ({how})",
            f"per replica         --max-served {self.max_served} --max-slots {self.max_slots}",
            f"placement           {sum(sizes)} adapter copies, {min(sizes)}-{max(sizes)} per replica; "
            f"{len(replicated)} adapters replicated" + (f" ({shown})" if replicated else ""),
            f"                    expected load imbalance {self.placement.imbalance:.2f} (max/mean)",
            f"predicted           {r.throughput:,.1f} tokens/s ({r.throughput / r.ideal_throughput:.1%} of "
            f"offered, >= {STARVATION_SHARE:.0%} needed), TTFT p50 {r.ttft_p50:.3f} s"
            if r.ideal_throughput
            else "predicted           no requests",
            f"                    hit rate {self.result.hit_rate:.2f}, load imbalance {self.result.imbalance:.2f} "
            f"(max/mean tokens routed), starved adapters {len(self.result.starved)}"
            + (
                f" ({', '.join(self.result.starved[:5])}{' ...' if len(self.result.starved) > 5 else ''})"
                if self.result.starved
                else ""
            ),
            f"twin runs           {self.twin_runs}" + (" (1 capacity probe)" if self.probe else ""),
        ]
        lines += self._replica_lines()
        return "\n".join(lines)

    def _replica_lines(self, shown: int = SHOWN_REPLICAS) -> list[str]:
        """One line per replica (the first ``shown``): its adapters, hottest first, and its load."""
        p = self.placement
        lines = []
        for i, names in enumerate(p.replicas[:shown]):
            head = ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
            lines.append(
                f"  replica-{i:<10}{len(names)} adapters, {p.load[i]:,.1f} tokens/s expected: {head}"
            )
        if len(p.replicas) > shown:
            lines.append(f"  ... {len(p.replicas) - shown} more replicas (--json lists every one)")
        return lines

    def to_dict(self) -> dict[str, Any]:
        r = self.result.result
        return {
            "replicas": self.replicas,
            "max_served": self.max_served,
            "max_slots": self.max_slots,
            "met": self.met,
            "target": self.target,
            "offered": self.offered,
            "scale": self.scale,
            "searched": self.searched,
            "max_replicas": self.max_replicas,
            "predicted": {
                "throughput": r.throughput,
                "ideal_throughput": r.ideal_throughput,
                "starvation_free": r.starvation_free,
                "hit_rate": self.result.hit_rate,
                "imbalance": self.result.imbalance,
                "starved": list(self.result.starved),
                "requests": dict(self.result.requests),
                "ttft_p50": r.ttft_p50,
                "ttft_p90": r.ttft_p90,
                "tpot_p50": r.tpot_p50,
            },
            "placement": self.placement.to_dict(),
            "twin_runs": self.twin_runs,
            "trials": [dataclasses.asdict(t) for t in self.trials],
        }


def met(result: ClusterResult) -> bool:
    """Does a cluster run meet its load: starvation-free (>= 90 % of the offered tokens served in
    the window) and every adapter with requests served at least once by the end of the drain?"""
    return bool(result.result.starvation_free) and not result.starved


class _Evaluator:
    """Twin runs of the plan's candidates, memoised and counted against the run budget."""

    def __init__(
        self,
        workload: Workload,
        cost: CostModel,
        loads: Mapping[str, float],
        *,
        max_runs: int,
        drain: float,
        seed: int,
        max_share: float,
        router_options: Mapping[str, Any],
        knobs: Mapping[str, Any],
        shared: bool = False,
    ):
        self.workload, self.cost, self.loads = workload, cost, loads
        self.shared = shared
        self.budget, self.drain, self.seed, self.max_share = max_runs, drain, seed, max_share
        self.router_options, self.knobs = dict(router_options), dict(knobs)
        self.placements: dict[int, Placement] = {}
        self.runs: dict[tuple[int, int, int], tuple[ClusterTrial, ClusterResult]] = {}
        self.trials: list[ClusterTrial] = []

    @property
    def left(self) -> int:
        return self.budget - len(self.trials)

    def placement(self, n: int) -> Placement:
        if n not in self.placements:
            self.placements[n] = place_adapters(self.loads, n, max_share=self.max_share)
        return self.placements[n]

    def grid(self, n: int) -> list[tuple[int, int]]:
        """The knob grid at ``n`` replicas: up to the adapters the busiest replica holds."""
        most = max(len(names) for names in self.placement(n).replicas)
        return config_grid(max(1, min(most, SERVED_CAP)))

    def start(self, n: int) -> tuple[int, int]:
        """Where the knob search starts: the grid point nearest (START_SERVED, START_SLOTS)."""
        return min(
            self.grid(n),
            key=lambda c: (
                abs(math.log2(c[0] / START_SERVED)) + abs(math.log2(c[1] / START_SLOTS)),
                c[1],
                c[0],
            ),
        )

    def __call__(self, n: int, served: int, slots: int) -> ClusterTrial:
        key = (n, served, slots)
        if key not in self.runs:
            if self.left <= 0:
                raise _OutOfRuns
            result = simulate_cluster(
                self.workload,
                self.cost,
                AdapterRouter(self.seed, **self.router_options),
                replicas=n,
                max_served=served,
                max_slots=slots,
                drain=self.drain,
                placement=self.placement(n).replicas,
                shared=self.shared,
                **self.knobs,
            )
            trial = ClusterTrial(
                n,
                served,
                slots,
                result.result.throughput,
                met(result),
                result.hit_rate,
                result.imbalance,
                len(result.starved),
            )
            self.trials.append(trial)
            self.runs[key] = (trial, result)
        return self.runs[key][0]

    def trial(self, n: int, served: int, slots: int) -> Trial:
        """One run as the single-engine planner's :class:`~paradapt.twin.search.Trial`."""
        t = self(n, served, slots)
        return Trial(served, slots, t.throughput, t.met)


class _OutOfRuns(Exception):
    """The plan's twin-run budget is spent (caught inside :func:`plan_cluster`)."""


def replica_capacity(workload: Workload, cost: CostModel, knobs: Mapping[str, Any]) -> float:
    """Tokens/s one replica serves saturated with one adapter (the kind and rank of the
    workload's first) and the workload's mean lengths: an upper bound (no adapter switches), so
    the replica count guessed from it is a lower one."""
    n = len(workload.requests)
    first = workload.adapters[0] if workload.adapters else None
    mean_in = max(1, round(sum(r.prompt_len for r in workload.requests) / n))
    mean_out = max(1, round(sum(r.output_len for r in workload.requests) / n))
    probe = WorkloadSpec(
        num_adapters=1,
        rate=1000.0,
        duration=5.0,
        max_requests=2000,
        input_len=(mean_in, mean_in),
        output_len=(mean_out, mean_out),
        **({"ranks": {first.rank: 1.0}, "kinds": {first.kind: 1.0}} if first is not None else {}),
    )
    return float(simulate(probe, cost, max_served=1, max_slots=1, **dict(knobs)).throughput)


def plan_cluster(
    workload: WorkloadSpec | Workload,
    cost: CostModel,
    *,
    replicas: int | None = None,
    target: float | None = None,
    max_replicas: int = 64,
    max_runs: int = MAX_RUNS,
    refine_evals: int = REFINE_EVALS,
    drain: float | None = None,
    seed: int = 0,
    max_share: float = MAX_SHARE,
    router_options: Mapping[str, Any] | None = None,
    one_machine: bool = False,
    **knobs: Any,
) -> ClusterPlan:
    """Plan a cluster for ``workload`` (module docstring): ``replicas=N`` plans for N replicas;
    ``replicas=None`` searches 1..``max_replicas`` for the smallest that meets ``target``
    (required then). ``target``: the offered load to plan for, in tokens/s (None: the workload
    as given). ``max_runs``: cluster twin runs at most (the capacity probe of a search is one
    more), of which ``refine_evals`` for the knobs; ``drain``: seconds each run continues after
    the window (default: a quarter of it); ``router_options``: :class:`AdapterRouter`'s keyword
    arguments; ``knobs``: the other engine knobs (:class:`~paradapt.serve.core.EngineConfig`).

    Replicas get cores of their own (a replica per machine) unless ``one_machine``: then they
    share the cores of the machine the cost model's ``ray`` section was measured on
    (``paradapt serve --replicas N`` on one host; :func:`~paradapt.twin.cluster.simulate_cluster`'s
    ``shared``), which that section must exist for. Either way a ``ray`` section prices Ray's
    per-token time in each replica."""
    if one_machine and cost.ray is None:
        raise ConfigError(
            "one_machine",
            "replicas sharing one machine's cores need the cost model's ray section (paradapt profile-ray)",
        )
    if replicas is not None and (not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1):
        raise ConfigError("replicas", f"must be an integer >= 1, got {replicas!r}")
    if replicas is None and target is None:
        raise ConfigError("target_throughput", "searching the replica count needs a target throughput")
    if not isinstance(max_replicas, int) or max_replicas < 1:
        raise ConfigError("max_replicas", f"must be an integer >= 1, got {max_replicas!r}")
    if not isinstance(max_runs, int) or max_runs < 1:
        raise ConfigError("max_runs", f"must be an integer >= 1, got {max_runs!r}")
    if not isinstance(refine_evals, int) or refine_evals < 0:
        raise ConfigError("refine", f"must be an integer >= 0, got {refine_evals!r}")
    if target is not None:
        planned, scale = scale_to_target(workload, target)
    else:
        planned, scale = (workload.generate() if isinstance(workload, WorkloadSpec) else workload), 1.0
    if not planned.requests:
        raise ConfigError("workload", "has no requests in its window: nothing to plan for")
    drain = DRAIN_SHARE * planned.duration if drain is None else drain
    if not (math.isfinite(drain) and drain >= 0):
        raise ConfigError("drain", f"must be >= 0 seconds, got {drain!r}")
    ev = _Evaluator(
        planned,
        cost,
        adapter_loads(planned),
        max_runs=max_runs,
        drain=drain,
        seed=seed,
        max_share=max_share,
        router_options=router_options or {},
        knobs=knobs,
        shared=one_machine,
    )
    probe = False
    if replicas is None:
        probe = True
        guess = math.ceil(offered_load(planned) / max(replica_capacity(planned, cost, knobs), 1e-9))
        n = _search_replicas(ev, min(max(1, guess), max_replicas), max_replicas)
    else:
        n = replicas
    served, slots = _refine_knobs(ev, n, refine_evals)
    if replicas is None:  # refined knobs may meet the target with fewer replicas
        while n > 1 and ev.left > 0 and ev(n, served, slots).met:
            if not ev(n - 1, served, slots).met:
                break
            n -= 1
    trial, result = ev.runs[(n, served, slots)]
    return ClusterPlan(
        replicas=n,
        max_served=served,
        max_slots=slots,
        placement=ev.placement(n),
        result=result,
        met=trial.met,
        offered=offered_load(planned),
        target=target,
        scale=scale,
        searched=replicas is None,
        max_replicas=max_replicas,
        trials=list(ev.trials),
        probe=probe,
    )


def _search_replicas(ev: _Evaluator, guess: int, max_replicas: int) -> int:
    """The smallest replica count that meets the load at the start knobs (bounded by the budget):
    proportional steps up from ``guess`` while it is missed, then bisection. With none met,
    the largest count tried."""
    lo, hi = 0, None  # the largest count known to miss, the smallest known to meet
    n = guess
    try:
        while True:
            t = ev(n, *ev.start(n))
            if t.met:
                hi = n if hi is None else min(hi, n)
            else:
                lo = max(lo, n)
            if hi is not None:
                if hi - lo <= 1:
                    break
                n = (lo + hi) // 2
            elif n >= max_replicas:
                break
            else:
                ideal = offered_load(ev.workload)
                step = math.ceil(n * ideal / t.throughput) if t.throughput > 0 else 2 * n
                n = min(max_replicas, max(n + 1, step))
    except _OutOfRuns:
        pass
    if hi is not None:
        return hi
    return max(t.replicas for t in ev.trials)


def _refine_knobs(ev: _Evaluator, n: int, evals: int) -> tuple[int, int]:
    """The best knobs at ``n`` replicas: the hill climb of the single-engine planner from the
    start point, within the budget left (the start point's run, if already made, is free)."""
    start = ev.start(n)
    if (n, *start) not in ev.runs:
        if ev.left <= 0:  # a search that spent everything ran the start point of every count it tried
            raise ConfigError("max_runs", f"{ev.budget} twin runs leave none for {n} replicas")
        ev(n, *start)
    budget = min(evals, ev.left + 1)
    if budget <= 1:
        return start
    best, _ = refine(start, ev.grid(n), lambda s, k: ev.trial(n, s, k), budget)
    return best.max_served, best.max_slots
