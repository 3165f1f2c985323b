"""The searched optimum of (max_served, max_slots) for a workload, in the digital twin.

The data the configurator (:mod:`paradapt.twin.configurator`, ``paradapt plan``) learns from,
in two steps:

1. **Sample** many workload specs (seeded) over popularity ``alpha``, rate, adapter count,
   rank/kind mixes, lengths and burstiness (:func:`sample_specs`). Rates are drawn as a load
   factor times the twin's own saturated capacity, so the data covers both sides of the knee
   on whatever machine the cost model was profiled.
2. **Search** each spec's best configuration over a log grid in the twin (:func:`search`,
   :func:`config_grid`). Objective: throughput. Starvation-free configurations are preferred
   (with the paper's definition, throughput >= 90% of the ideal, the fastest configuration is
   starvation-free whenever any is, so the preference only matters for other twins). Configs
   within ``tie_tol`` (1%) of the best throughput are ties, won by the one needing the least
   memory: fewest device slots first (device memory is shared with the KV cache), then fewest
   host copies. Without the tolerance, the twin's noise-free but flat surfaces (under load,
   every configuration serves everything) would pick large configurations for nothing.

Search results are cached on disk, one JSON per (spec, cost model, grid, knobs), and the
searches run in worker processes (``concurrent.futures``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..files import write_text_atomic
from ..serve.workload import WorkloadSpec
from .features import num_adapters

CACHE_FORMAT = 1  # bump when the cache entries change meaning
SLOT_CAP = 32  # the engine runs at most 32 requests per step by default: more slots than that never fill
TIE_TOL = 0.01
TRAIN_KINDS = ("lora", "parallel", "series")
TRAIN_RANKS = (4, 8, 16, 32, 64)

Simulate = Callable[..., Any]

# -- search ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    """One configuration's outcome in the twin."""

    max_served: int
    max_slots: int
    throughput: float
    starvation_free: bool


@dataclass(frozen=True)
class SearchResult:
    """Every trial of one workload and the chosen optimum (see :func:`choose_best`)."""

    spec: WorkloadSpec
    trials: tuple[Trial, ...]
    best: Trial

    @property
    def max_throughput(self) -> float:
        """The grid's highest throughput (the reference of the held-out error)."""
        return max(t.throughput for t in self.trials)

    def throughput_at(self, max_served: int, max_slots: int) -> float:
        for t in self.trials:
            if (t.max_served, t.max_slots) == (max_served, max_slots):
                return t.throughput
        raise KeyError(f"({max_served}, {max_slots}) is not on this search's grid")

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "trials": [asdict(t) for t in self.trials],
            "best": asdict(self.best),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchResult:
        spec_d = dict(d["spec"])
        spec_d["input_len"] = tuple(spec_d["input_len"])
        spec_d["output_len"] = tuple(spec_d["output_len"])
        spec_d["ranks"] = {int(k): v for k, v in spec_d["ranks"].items()}
        return cls(
            WorkloadSpec.from_dict(spec_d, source="plan cache"),
            tuple(Trial(**t) for t in d["trials"]),
            Trial(**d["best"]),
        )


def config_grid(num_adapters: int, slot_cap: int = SLOT_CAP) -> list[tuple[int, int]]:
    """(max_served, max_slots) pairs to search: powers of two, plus ``num_adapters`` itself.

    ``max_served`` goes up to ``num_adapters`` (more host copies than adapters change nothing);
    ``max_slots <= max_served`` (device residents are host residents) and ``<= slot_cap``.
    """
    served = _powers_up_to(num_adapters)
    slots = _powers_up_to(min(num_adapters, slot_cap))
    return [(s, k) for s in served for k in slots if k <= s]


def _powers_up_to(n: int) -> list[int]:
    values = [1 << i for i in range(n.bit_length()) if (1 << i) < n]
    return values + [n]


def choose_best(trials: Sequence[Trial], tie_tol: float = TIE_TOL) -> Trial:
    """The best trial: starvation-free ones first; among those, the highest throughput, where
    anything within ``tie_tol`` of it ties and the fewest slots, then fewest served, wins."""
    if not trials:
        raise ValueError("no trials to choose from")
    pool = [t for t in trials if t.starvation_free] or list(trials)
    top = max(t.throughput for t in pool)
    ties = [t for t in pool if t.throughput >= top * (1 - tie_tol)]
    return min(ties, key=lambda t: (t.max_slots, t.max_served, -t.throughput))


def search(
    spec: WorkloadSpec,
    evaluate: Callable[[int, int], Trial],
    grid: Sequence[tuple[int, int]] | None = None,
    tie_tol: float = TIE_TOL,
) -> SearchResult:
    """Exhaustive search of ``grid`` (default :func:`config_grid`) with ``evaluate(served, slots)``."""
    grid = config_grid(num_adapters(spec)) if grid is None else grid
    trials = tuple(evaluate(s, k) for s, k in grid)
    return SearchResult(spec, trials, choose_best(trials, tie_tol))


def twin_trial(
    spec: WorkloadSpec,
    cost: Any,
    max_served: int,
    max_slots: int,
    simulate: Simulate | None = None,
    knobs: Mapping[str, Any] | None = None,
) -> Trial:
    """Run the twin once at (max_served, max_slots) and keep what the search needs."""
    simulate = _default_simulate() if simulate is None else simulate
    r = simulate(spec, cost, max_served=max_served, max_slots=max_slots, **dict(knobs or {}))
    return Trial(max_served, max_slots, float(r.throughput), bool(r.starvation_free))


def search_in_twin(
    spec: WorkloadSpec,
    cost: Any,
    simulate: Simulate | None = None,
    knobs: Mapping[str, Any] | None = None,
    tie_tol: float = TIE_TOL,
) -> SearchResult:
    """The searched optimum of ``spec`` in the twin."""
    return search(spec, lambda s, k: twin_trial(spec, cost, s, k, simulate, knobs), tie_tol=tie_tol)


def _default_simulate() -> Simulate:
    from . import simulate

    return simulate


# -- training data ---------------------------------------------------------------------------------


def estimate_capacity(
    cost: Any,
    simulate: Simulate | None = None,
    knobs: Mapping[str, Any] | None = None,
    duration: float = 20.0,
) -> float:
    """Requests/s the twin serves for one adapter under overload (mean lengths of the default spec).

    Training rates are load factors times this, so "below/above the knee" means the same
    thing on a fast and on a slow machine.
    """
    probe = WorkloadSpec(num_adapters=1, rate=1000.0, duration=duration, max_requests=2000)
    simulate = _default_simulate() if simulate is None else simulate
    r = simulate(probe, cost, max_served=1, max_slots=1, **dict(knobs or {}))
    tokens_per_request = sum(probe.input_len) / 2 + sum(probe.output_len) / 2
    return float(r.throughput) / tokens_per_request


def sample_specs(
    n: int,
    seed: int,
    capacity: float,
    duration: float = 15.0,
    load: tuple[float, float] = (0.1, 2.5),
    max_adapters: int = 512,
    kinds: Sequence[str] = TRAIN_KINDS,
) -> list[WorkloadSpec]:
    """``n`` random workload specs, the same for the same arguments.

    ``capacity`` (requests/s, :func:`estimate_capacity`) scales the rates: a spec's rate is
    ``capacity`` times a load factor drawn log-uniformly from ``load``.
    """
    if n < 1:
        raise ConfigError("train", f"need at least 1 training workload, got {n}")
    rng = random.Random(f"plan:{seed}")
    specs = []
    for i in range(n):
        input_lo = rng.choice((8, 16, 32, 64))
        output_lo = rng.choice((8, 16, 32, 64))
        specs.append(
            WorkloadSpec(
                num_adapters=max(1, round(math.exp(rng.uniform(math.log(2), math.log(max_adapters))))),
                rate=round(capacity * math.exp(rng.uniform(*(math.log(x) for x in load))), 4),
                duration=duration,
                alpha=rng.choice((0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)),
                cv=rng.choice((0.5, 1.0, 1.0, 1.0, 2.0, 3.0)),
                input_len=(input_lo, rng.randint(max(input_lo, 64), 512)),
                output_len=(output_lo, rng.randint(max(output_lo, 32), 512)),
                ranks=_random_mix(rng, TRAIN_RANKS),
                kinds=_random_mix(rng, kinds),
                seed=seed * 100_003 + i,
            )
        )
    return specs


def training_specs(
    cost: Any,
    n: int,
    seed: int,
    duration: float = 15.0,
    simulate: Simulate | None = None,
    knobs: Mapping[str, Any] | None = None,
) -> tuple[float, list[WorkloadSpec]]:
    """The twin's capacity (req/s) and ``n`` sampled specs over the kinds the cost model prices."""
    capacity = estimate_capacity(cost, simulate, knobs, duration)
    kinds = [k for k in TRAIN_KINDS if k in getattr(cost, "kinds", TRAIN_KINDS)] or list(cost.kinds)
    return capacity, sample_specs(n, seed, capacity, duration, kinds=kinds)


def _random_mix(rng: random.Random, values: Sequence[Any]) -> dict[Any, float]:
    chosen = rng.sample(list(values), rng.randint(1, len(values)))
    return {v: float(rng.randint(1, 4)) for v in chosen}


def cost_key(cost: Any) -> str:
    """A short hash of the cost model's content (cache keys; checks a model against a cost file)."""
    payload = cost.to_dict() if hasattr(cost, "to_dict") else repr(cost)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cache_path(
    cache_dir: Path, spec: WorkloadSpec, ckey: str, knobs: Mapping[str, Any], tie_tol: float
) -> Path:
    payload = {
        "format": CACHE_FORMAT,
        "spec": spec.to_dict(),
        "cost": ckey,
        "knobs": dict(knobs),
        "grid": config_grid(spec.num_adapters),
        "tie_tol": tie_tol,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_dir / f"{digest}.json"


def _search_job(job: tuple) -> dict[str, Any]:
    """Worker entry point (top level so process pools can pickle it)."""
    spec, cost, simulate, knobs, tie_tol = job
    return search_in_twin(spec, cost, simulate, knobs, tie_tol).to_dict()


def build_dataset(
    specs: Sequence[WorkloadSpec],
    cost: Any,
    *,
    workers: int = 2,
    cache_dir: str | Path | None = None,
    simulate: Simulate | None = None,
    knobs: Mapping[str, Any] | None = None,
    tie_tol: float = TIE_TOL,
    progress: Callable[[int, int], None] | None = None,
) -> list[SearchResult]:
    """The searched optimum of every spec, from the disk cache where present, else computed
    in ``workers`` processes (1: in this process) and written to the cache."""
    knobs = dict(knobs or {})
    ckey = cost_key(cost)
    cache = None if cache_dir is None else Path(cache_dir)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    results: list[SearchResult | None] = [None] * len(specs)
    todo = []
    for i, spec in enumerate(specs):
        path = None if cache is None else _cache_path(cache, spec, ckey, knobs, tie_tol)
        if path is not None and path.is_file():
            results[i] = SearchResult.from_dict(json.loads(path.read_text()))
        else:
            todo.append((i, path))
    done = len(specs) - len(todo)
    jobs = [(specs[i], cost, simulate, knobs, tie_tol) for i, _ in todo]
    if workers <= 1 or len(jobs) <= 1:
        outputs = map(_search_job, jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        outputs = pool.map(_search_job, jobs)
    try:
        for (i, path), out in zip(todo, outputs, strict=True):
            results[i] = SearchResult.from_dict(out)
            if path is not None:
                write_json_atomic(path, out)
            done += 1
            if progress is not None:
                progress(done, len(specs))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return [r for r in results if r is not None]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to a temporary file, then rename it over ``path``: a reader never
    sees half a file (the cache entries here, the configurator's model file)."""
    write_text_atomic(path, json.dumps(data))
