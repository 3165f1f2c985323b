"""``paradapt plan``: a learned configurator for (max_served, max_slots), trained in the twin.

Agullo et al. train interpretable models on a digital twin's output to predict the best number
of served adapters (host memory) and adapter slots (device, batched together) of a workload.
This module does the same for paradapt's engine, in four steps:

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
3. **Fit** a depth-limited decision tree and a ridge linear model per target (log2 of
   max_served, log2 of max_slots) on the features of :mod:`paradapt.twin.features`; predictions
   snap to the nearest grid point (in log space), so a prediction is always a valid config.
4. **Recommend**: the rules that fired, the predicted configuration, and with ``--check`` its
   throughput in the twin next to the searched optimum.

Search results are cached on disk, one JSON per (spec, cost model, grid, knobs), and the
searches run in worker processes (``concurrent.futures``). Fitted models are saved as plain JSON
(tree arrays, coefficients): loading never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..serve.workload import WorkloadSpec
from .features import FEATURE_NAMES, feature_vector

PLAN_FORMAT = 1  # bump when the model JSON or the cache entries change meaning
TARGETS = ("max_served", "max_slots")
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
    grid = config_grid(spec.num_adapters) if grid is None else grid
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
        "format": PLAN_FORMAT,
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
                _write_json_atomic(path, out)
            done += 1
            if progress is not None:
                progress(done, len(specs))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return [r for r in results if r is not None]


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


# -- models ----------------------------------------------------------------------------------------


@dataclass
class TreeModel:
    """A fitted regression tree as plain arrays: predicts by walking, reports the rules it used."""

    target: str
    left: list[int]
    right: list[int]
    feature: list[int]
    threshold: list[float]
    value: list[float]
    rules: str  # sklearn's export_text of the fitted tree

    @classmethod
    def fit(cls, target: str, X: Any, y: Any, max_depth: int, min_samples_leaf: int) -> TreeModel:
        from sklearn.tree import DecisionTreeRegressor, export_text

        tree = DecisionTreeRegressor(max_depth=max_depth, min_samples_leaf=min_samples_leaf, random_state=0)
        tree.fit(X, y)
        t = tree.tree_
        return cls(
            target=target,
            left=[int(v) for v in t.children_left],
            right=[int(v) for v in t.children_right],
            feature=[int(v) for v in t.feature],
            threshold=[float(v) for v in t.threshold],
            value=[float(v) for v in t.value[:, 0, 0]],
            rules=export_text(tree, feature_names=list(FEATURE_NAMES), decimals=3),
        )

    def predict(self, x: Sequence[float]) -> tuple[float, list[str]]:
        """The leaf value for one feature row, and the conditions on the path to it."""
        node, path = 0, []
        while self.left[node] != -1:
            f, thr = self.feature[node], self.threshold[node]
            name = FEATURE_NAMES[f]
            if x[f] <= thr:
                path.append(f"{name} <= {thr:.3f}  ({x[f]:.3f})")
                node = self.left[node]
            else:
                path.append(f"{name} > {thr:.3f}  ({x[f]:.3f})")
                node = self.right[node]
        return self.value[node], path


@dataclass
class LinearModel:
    """Ridge regression on standardised features: ``y = intercept + sum coef_i * (x_i - mean_i) / scale_i``."""

    target: str
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float

    @classmethod
    def fit(cls, target: str, X: Any, y: Any, ridge: float) -> LinearModel:
        from sklearn.linear_model import Ridge
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(X)
        model = Ridge(alpha=ridge).fit(scaler.transform(X), y)
        scale = [float(s) if s > 0 else 1.0 for s in scaler.scale_]
        return cls(
            target,
            [float(m) for m in scaler.mean_],
            scale,
            [float(c) for c in model.coef_],
            float(model.intercept_),
        )

    def predict(self, x: Sequence[float]) -> float:
        return self.intercept + sum(
            c * (v - m) / s for c, v, m, s in zip(self.coef, x, self.mean, self.scale, strict=True)
        )

    def describe(self) -> str:
        """The coefficients by feature name, largest effect first (per standard deviation)."""
        rows = sorted(zip(FEATURE_NAMES, self.coef, strict=True), key=lambda r: -abs(r[1]))
        lines = [f"log2({self.target}) = {self.intercept:+.3f}  (at the mean workload)"]
        lines += [f"  {c:+.3f} x std({name})" for name, c in rows if abs(c) >= 5e-4]
        return "\n".join(lines)


@dataclass(frozen=True)
class Recommendation:
    """A predicted configuration, the raw (unsnapped) predictions and the rules that fired."""

    max_served: int
    max_slots: int
    predictor: str
    raw: dict[str, float]
    rules: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class PlanModel:
    """The configurator: a tree and a linear model per target, plus where they came from.

    ``margin`` (log2 units) is added to both predictions before snapping: too few slots can
    cost half the throughput while a slot too many costs a little memory, so erring upwards
    is cheaper (:func:`choose_margin` picks it by cross-validation).
    """

    trees: dict[str, TreeModel]
    linear: dict[str, LinearModel]
    meta: dict[str, Any] = field(default_factory=dict)
    margin: float = 0.0

    @classmethod
    def fit(
        cls,
        results: Sequence[SearchResult],
        max_depth: int = 4,
        min_samples_leaf: int = 3,
        ridge: float = 1.0,
        meta: Mapping[str, Any] | None = None,
    ) -> PlanModel:
        """Fit both models on searched optima (targets: log2 of each knob)."""
        if len(results) < 2:
            raise ConfigError("train", f"need at least 2 searched workloads to fit, got {len(results)}")
        import numpy as np

        X = np.array([feature_vector(r.spec) for r in results], dtype=float)
        trees, linear = {}, {}
        for target in TARGETS:
            y = np.log2([getattr(r.best, target) for r in results])
            trees[target] = TreeModel.fit(target, X, y, max_depth, min_samples_leaf)
            linear[target] = LinearModel.fit(target, X, y, ridge)
        info = {"train_workloads": len(results), "max_depth": max_depth, "ridge": ridge, **dict(meta or {})}
        return cls(trees, linear, info)

    def recommend(self, spec: WorkloadSpec, predictor: str = "tree") -> Recommendation:
        """The predicted (max_served, max_slots) of ``spec``, snapped to its search grid."""
        x = feature_vector(spec)
        raw, rules = {}, {}
        for target in TARGETS:
            if predictor == "tree":
                raw[target], rules[target] = self.trees[target].predict(x)
            elif predictor == "linear":
                raw[target] = self.linear[target].predict(x)
            else:
                raise ConfigError("predictor", f"must be 'tree' or 'linear', got {predictor!r}")
        served, slots = snap(
            raw["max_served"] + self.margin, raw["max_slots"] + self.margin, spec.num_adapters
        )
        return Recommendation(served, slots, predictor, raw, rules)

    def describe(self) -> str:
        """Both models in words: the tree rules (export_text) and the linear coefficients."""
        parts = []
        for target in TARGETS:
            parts.append(f"decision tree, log2({target}):\n{self.trees[target].rules.rstrip()}")
        for target in TARGETS:
            parts.append(f"linear model (ridge, standardised features):\n{self.linear[target].describe()}")
        return "\n\n".join(parts)

    # -- files -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "features": list(FEATURE_NAMES),
            "trees": {k: asdict(v) for k, v in self.trees.items()},
            "linear": {k: asdict(v) for k, v in self.linear.items()},
            "meta": self.meta,
            "margin": self.margin,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "plan model") -> PlanModel:
        if not isinstance(d, Mapping) or d.get("format") != PLAN_FORMAT:
            raise ConfigError("model", f"{source}: not a paradapt plan model (format {PLAN_FORMAT})")
        if list(d.get("features", [])) != list(FEATURE_NAMES):
            raise ConfigError("model", f"{source}: trained on other features; retrain with --train N")
        try:
            trees = {k: TreeModel(**v) for k, v in d["trees"].items()}
            linear = {k: LinearModel(**v) for k, v in d["linear"].items()}
        except (KeyError, TypeError) as e:
            raise ConfigError("model", f"{source}: malformed plan model ({e})") from None
        if set(trees) != set(TARGETS) or set(linear) != set(TARGETS):
            raise ConfigError("model", f"{source}: needs models for {list(TARGETS)}")
        margin = d.get("margin", 0.0)
        if not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise ConfigError("model", f"{source}: margin must be a number, got {margin!r}")
        return cls(trees, linear, dict(d.get("meta", {})), float(margin))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> PlanModel:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise ConfigError("model", f"{path}: cannot read ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ConfigError("model", f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))


def snap(log2_served: float, log2_slots: float, num_adapters: int) -> tuple[int, int]:
    """The grid point of ``config_grid(num_adapters)`` nearest to the predictions in log2 space."""
    return min(
        config_grid(num_adapters),
        key=lambda c: (math.log2(c[0]) - log2_served) ** 2 + (math.log2(c[1]) - log2_slots) ** 2,
    )


# -- held-out error --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOutError:
    """Throughput at the predicted configuration vs at the searched optimum, one workload."""

    predicted: tuple[int, int]
    optimum: tuple[int, int]
    predicted_throughput: float
    optimum_throughput: float
    max_throughput: float

    @property
    def error(self) -> float:
        """Relative shortfall vs the searched optimum (>= 0: a prediction that beats the
        optimum, possible within the tie tolerance, counts as 0)."""
        return _shortfall(self.predicted_throughput, self.optimum_throughput)

    @property
    def error_vs_max(self) -> float:
        """Relative shortfall vs the grid's highest throughput (stricter: ignores the ties rule)."""
        return _shortfall(self.predicted_throughput, self.max_throughput)


def _shortfall(value: float, reference: float) -> float:
    return max(0.0, (reference - value) / reference) if reference > 0 else 0.0


def held_out_errors(
    model: PlanModel, results: Sequence[SearchResult], predictor: str = "tree"
) -> list[HeldOutError]:
    """The error of every held-out workload (its search already holds the predicted config: no new runs)."""
    out = []
    for r in results:
        rec = model.recommend(r.spec, predictor)
        out.append(
            HeldOutError(
                predicted=(rec.max_served, rec.max_slots),
                optimum=(r.best.max_served, r.best.max_slots),
                predicted_throughput=r.throughput_at(rec.max_served, rec.max_slots),
                optimum_throughput=r.best.throughput,
                max_throughput=r.max_throughput,
            )
        )
    return out


def summarize_errors(errors: Sequence[HeldOutError]) -> dict[str, float]:
    """Mean and max relative error (vs the searched optimum and vs the grid's best), the share
    of workloads predicted exactly right, and how many slots the predictions use vs the optima."""
    if not errors:
        raise ValueError("no held-out workloads")
    errs = [e.error for e in errors]
    vs_max = [e.error_vs_max for e in errors]
    slots = [math.log2(e.predicted[1] / e.optimum[1]) for e in errors]
    return {
        "n": len(errs),
        "mean_error": sum(errs) / len(errs),
        "max_error": max(errs),
        "mean_error_vs_max": sum(vs_max) / len(vs_max),
        "max_error_vs_max": max(vs_max),
        "exact_config": sum(e.predicted == e.optimum for e in errors) / len(errs),
        # memory side: geometric mean of predicted / optimum slots (> 1: over-provisioned)
        "slots_ratio": 2 ** (sum(slots) / len(slots)),
    }


MARGINS = (0.0, 0.25, 0.5, 0.75, 1.0)  # at most one grid step up: more buys throughput with memory


def choose_margin(
    results: Sequence[SearchResult],
    max_depth: int = 4,
    predictor: str = "tree",
    margins: Sequence[float] = MARGINS,
    folds: int = 5,
) -> float:
    """The margin with the lowest mean held-out error in ``folds``-fold cross-validation on
    ``results`` (no twin runs: every snapped prediction is a searched trial)."""
    if len(results) < 2 * folds:
        return 0.0
    errors = {m: [] for m in margins}
    for f in range(folds):
        test = [r for i, r in enumerate(results) if i % folds == f]
        model = PlanModel.fit([r for i, r in enumerate(results) if i % folds != f], max_depth=max_depth)
        for m in margins:
            model.margin = m
            errors[m] += [e.error for e in held_out_errors(model, test, predictor)]
    return min(margins, key=lambda m: (sum(errors[m]) / len(errors[m]), m))


def train(
    cost: Any,
    n: int,
    *,
    seed: int = 0,
    holdout: float = 0.2,
    workers: int = 2,
    cache_dir: str | Path | None = None,
    duration: float = 15.0,
    simulate: Simulate | None = None,
    knobs: Mapping[str, Any] | None = None,
    max_depth: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[PlanModel, list[SearchResult], list[SearchResult]]:
    """Sample ``n`` workloads, search them in the twin, fit on ``1 - holdout`` of them and
    record the held-out error in the model's ``meta``. Returns (model, train, held-out)."""
    capacity, specs = training_specs(cost, n, seed, duration, simulate, knobs)
    results = build_dataset(
        specs, cost, workers=workers, cache_dir=cache_dir, simulate=simulate, knobs=knobs, progress=progress
    )
    n_test = int(round(len(results) * holdout)) if len(results) >= 5 else 0
    train_set, test_set = results[: len(results) - n_test], results[len(results) - n_test :]
    meta: dict[str, Any] = {
        "cost": cost_key(cost),
        "seed": seed,
        "capacity_rps": capacity,
        "knobs": dict(knobs or {}),
    }
    model = PlanModel.fit(train_set, max_depth=max_depth, meta=meta)
    model.margin = choose_margin(train_set, max_depth)
    for predictor in ("tree", "linear"):
        if test_set:
            model.meta[f"heldout_{predictor}"] = summarize_errors(held_out_errors(model, test_set, predictor))
    return model, train_set, test_set


def check_cost(
    model: PlanModel, cost: Any, knobs: Mapping[str, Any], model_source: str, cost_source: str
) -> None:
    """Warn (one line each) when ``model`` was trained on another cost model or other engine knobs."""
    import sys

    trained = model.meta.get("cost")
    if trained is not None and trained != cost_key(cost):
        print(
            f"paradapt: warning: {model_source} was trained on cost model {trained}, not on {cost_source} "
            f"({cost_key(cost)}); retrain with --train N",
            file=sys.stderr,
        )
    trained_knobs = model.meta.get("knobs")
    if trained_knobs is not None and dict(trained_knobs) != dict(knobs):
        print(
            f"paradapt: warning: {model_source} was trained with engine knobs {trained_knobs}, not {dict(knobs)}; "
            "retrain with --train N",
            file=sys.stderr,
        )


# -- command line ----------------------------------------------------------------------------------

DEFAULT_MODEL = "runs/plan/plan.json"
DEFAULT_TRAIN = 300


def add_parser(sub: Any) -> None:
    """Register ``paradapt plan`` on an argparse subparsers object."""
    from .cli import add_engine_knob_args

    p = sub.add_parser(
        "plan",
        help="recommend --max-served/--max-slots for a workload (models trained in the twin)",
        description="Recommend (max_served, max_slots) for WORKLOAD.yaml with interpretable models "
        "(a depth-limited decision tree and a linear model) trained on configurations searched in "
        "the digital twin over many sampled workloads. Prints the tree rules that fired and the "
        "configuration; --check also runs the twin at it and at the searched optimum.",
    )
    p.add_argument("workload", metavar="WORKLOAD.yaml", help="the workload (paradapt.serve.workload fields)")
    p.add_argument(
        "--cost", metavar="COST.json", help="cost model from `paradapt profile` (default: the twin's)"
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="PLAN.json",
        help=f"fitted models (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--train",
        type=int,
        metavar="N",
        help=f"(re)train on N sampled workloads first and save to --model (default when the "
        f"model file is missing: {DEFAULT_TRAIN})",
    )
    p.add_argument("--predictor", choices=("tree", "linear"), default="tree", help="which model recommends")
    p.add_argument(
        "--check", action="store_true", help="run the twin at the recommendation and search the optimum"
    )
    p.add_argument("--workers", type=int, default=2, metavar="N", help="search processes (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled training workloads (default: 0)")
    p.add_argument("--max-depth", type=int, default=4, metavar="D", help="decision tree depth (default: 4)")
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="searched workloads cache (default: a cache/ folder next to --model)",
    )
    p.add_argument("--show-model", action="store_true", help="print every tree rule and linear coefficient")
    p.add_argument(
        "--duration",
        type=float,
        default=15.0,
        metavar="S",
        help="arrival window of each training workload (default: 15)",
    )
    add_engine_knob_args(p)  # the engine knobs the twin runs with (a model is trained for one setting)
    p.set_defaults(func=run_cli)


def load_cost(path: str | None) -> Any:
    """The cost model in ``path``, or the one shipped; one warning line if measured elsewhere."""
    from .cli import load_cost as twin_load_cost

    return twin_load_cost(path, None)


def run_cli(args: Any) -> int:
    """``paradapt plan``: load or train the models, recommend, optionally check in the twin."""
    import sys

    spec = WorkloadSpec.from_yaml(args.workload)  # a bad file is a ConfigError naming the field
    if args.train is not None and args.train < 2:
        raise ConfigError("train", f"need at least 2 workloads to train on, got {args.train}")
    for name in ("workers", "max_depth"):
        if getattr(args, name) < 1:
            raise ConfigError(name, f"must be at least 1, got {getattr(args, name)}")
    if not args.duration > 0:
        raise ConfigError("duration", f"must be positive, got {args.duration}")
    cost = load_cost(args.cost)
    cost_source = args.cost or "the shipped cost model"
    from .cli import knobs_from_args

    knobs = knobs_from_args(args)
    model_path = Path(args.model)
    if args.train is not None or not model_path.is_file():
        n = args.train if args.train is not None else DEFAULT_TRAIN
        cache = Path(args.cache_dir) if args.cache_dir else model_path.parent / "cache"
        print(f"training on {n} workloads searched in the twin ({args.workers} processes, cache {cache}) ...")

        def progress(done: int, total: int) -> None:
            if done == total or done % max(1, total // 10) == 0:
                print(f"  searched {done}/{total}", file=sys.stderr, flush=True)

        model, _, _ = train(
            cost,
            n,
            seed=args.seed,
            workers=args.workers,
            cache_dir=cache,
            max_depth=args.max_depth,
            progress=progress,
        )
        model.save(model_path)
        print(f"saved {model_path}")
        print(model.describe())
    else:
        model = PlanModel.load(model_path)
        check_cost(model, cost, knobs, str(model_path), cost_source)
        if args.show_model:
            print(model.describe())
    _print_heldout(model)
    rec = model.recommend(spec, args.predictor)
    other = model.recommend(spec, "linear" if args.predictor == "tree" else "tree")
    print(
        f"\nworkload {args.workload}: {spec.num_adapters} adapters, {spec.rate:g} req/s, alpha {spec.alpha:g}"
    )
    tree_rec = rec if rec.predictor == "tree" else other
    print("rules that fired (decision tree):")
    for target in TARGETS:
        conds = " and ".join(tree_rec.rules[target]) or "(root)"
        print(
            f"  {target}: {conds}\n    -> log2 {tree_rec.raw[target]:.2f} ({2 ** tree_rec.raw[target]:.1f})"
        )
    print(
        f"recommended ({rec.predictor}, margin {model.margin:+.2f} log2): "
        f"--max-served {rec.max_served} --max-slots {rec.max_slots}"
        f"   [{other.predictor}: --max-served {other.max_served} --max-slots {other.max_slots}]"
    )
    if args.check:
        _print_check(spec, cost, rec, knobs)
    return 0


def _print_heldout(model: PlanModel) -> None:
    for predictor in ("tree", "linear"):
        h = model.meta.get(f"heldout_{predictor}")
        if h:
            print(
                f"{predictor}: held-out throughput error mean {100 * h['mean_error']:.2f}%, max "
                f"{100 * h['max_error']:.2f}% over {h['n']} workloads (trained on {model.meta.get('train_workloads')})"
            )


def _print_check(spec: WorkloadSpec, cost: Any, rec: Recommendation, knobs: Mapping[str, Any]) -> None:
    result = search_in_twin(spec, cost, knobs=knobs)
    at = result.throughput_at(rec.max_served, rec.max_slots)
    best = result.best
    err = _shortfall(at, best.throughput)
    print(f"twin check over {len(result.trials)} configurations:")
    print(f"  recommended ({rec.max_served}, {rec.max_slots}): {at:,.1f} tokens/s")
    print(f"  searched optimum ({best.max_served}, {best.max_slots}): {best.throughput:,.1f} tokens/s")
    print(f"  shortfall vs the searched optimum: {100 * err:.2f}%")
    if err > TIE_TOL:  # the models missed this workload: the search's answer is the one to use
        print(
            f"  use the searched optimum instead: --max-served {best.max_served} --max-slots {best.max_slots}"
        )
