"""The configurator behind ``paradapt plan``: interpretable models that predict the best
(max_served, max_slots) of a workload, trained on optima searched in the digital twin.

Agullo et al. train interpretable models on a digital twin's output to predict the best number
of served adapters (host memory) and adapter slots (device, batched together) of a workload.
This module does the same for paradapt's engine, after :mod:`paradapt.twin.search` has sampled
workloads and searched each one's optimum:

3. **Fit** a depth-limited decision tree and a ridge linear model per target (log2 of
   max_served, log2 of max_slots) on the features of :mod:`paradapt.twin.features`; predictions
   snap to the nearest grid point (in log space), so a prediction is always a valid config.
4. **Recommend**: the rules that fired, the predicted configuration, and with ``--check`` its
   throughput in the twin next to the searched optimum.
5. **Refine** (:func:`refine`, on by default in ``paradapt plan``): the prediction seeds a
   local search in the twin over its grid neighbours. A tree alone misses some workloads by a
   third of their throughput (a leaf averages workloads whose optima differ); a few twin runs
   around its guess recover them at a fraction of the full search's cost, which is the
   learned-model-plus-simulator split of Agullo et al.'s twin.

Fitted models are saved as plain JSON (tree arrays, coefficients): loading never unpickles anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..checks import read_structured
from ..errors import ConfigError
from ..serve.workload import Workload, WorkloadSpec
from .features import FEATURE_NAMES, feature_vector, num_adapters
from .search import (
    TIE_TOL,
    SearchResult,
    Simulate,
    Trial,
    build_dataset,
    choose_best,
    config_grid,
    cost_key,
    training_specs,
    write_json_atomic,
)

MODEL_FORMAT = 1  # bump when the model JSON changes meaning
TARGETS = ("max_served", "max_slots")

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
class Configurator:
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
    ) -> Configurator:
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

    def recommend(self, spec: WorkloadSpec | Workload, predictor: str = "tree") -> Recommendation:
        """The predicted (max_served, max_slots) of ``spec`` (or of a workload, a trace's
        included), snapped to its search grid."""
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
            raw["max_served"] + self.margin, raw["max_slots"] + self.margin, num_adapters(spec)
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
            "format": MODEL_FORMAT,
            "features": list(FEATURE_NAMES),
            "trees": {k: asdict(v) for k, v in self.trees.items()},
            "linear": {k: asdict(v) for k, v in self.linear.items()},
            "meta": self.meta,
            "margin": self.margin,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "plan model") -> Configurator:
        if not isinstance(d, Mapping) or d.get("format") != MODEL_FORMAT:
            raise ConfigError("model", f"{source}: not a paradapt plan model (format {MODEL_FORMAT})")
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
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Configurator:
        return cls.from_dict(read_structured(path, "model"), source=str(path))


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
    twin_runs: int = 0  # runs a refinement spent (0: the model's prediction as is)

    @property
    def error(self) -> float:
        """Relative shortfall vs the searched optimum (>= 0: a prediction that beats the
        optimum, possible within the tie tolerance, counts as 0)."""
        return shortfall(self.predicted_throughput, self.optimum_throughput)

    @property
    def error_vs_max(self) -> float:
        """Relative shortfall vs the grid's highest throughput (stricter: ignores the ties rule)."""
        return shortfall(self.predicted_throughput, self.max_throughput)


def shortfall(value: float, reference: float) -> float:
    """How far ``value`` falls short of ``reference``, relative to it (0 when it does not)."""
    return max(0.0, (reference - value) / reference) if reference > 0 else 0.0


def held_out_errors(
    model: Configurator,
    results: Sequence[SearchResult],
    predictor: str = "tree",
    refine_evals: int = 0,
) -> list[HeldOutError]:
    """The error of every held-out workload (its search already holds the predicted config, and
    every config a refinement visits: no new runs). ``refine_evals > 0``: refined predictions."""
    out = []
    for r in results:
        chosen, runs = searched_choice(model, r, predictor, refine_evals)
        out.append(
            HeldOutError(
                predicted=chosen,
                optimum=(r.best.max_served, r.best.max_slots),
                predicted_throughput=r.throughput_at(*chosen),
                optimum_throughput=r.best.throughput,
                max_throughput=r.max_throughput,
                twin_runs=runs,
            )
        )
    return out


def searched_choice(
    model: Configurator, result: SearchResult, predictor: str = "tree", refine_evals: int = 0
) -> tuple[tuple[int, int], int]:
    """What ``paradapt plan`` would recommend for a searched workload, and the twin runs its
    refinement spent: the refinement reads the search's trials instead of running the twin."""
    rec = model.recommend(result.spec, predictor)
    chosen = (rec.max_served, rec.max_slots)
    if refine_evals <= 0:
        return chosen, 0
    trials = {(t.max_served, t.max_slots): t for t in result.trials}
    best, run = refine(chosen, list(trials), lambda served, slots: trials[(served, slots)], refine_evals)
    return (best.max_served, best.max_slots), len(run)


# -- refinement ------------------------------------------------------------------------------------

REFINE_EVALS = 16  # twin runs a refinement may spend (the full grid of 512 adapters has 51 points)


def neighbours(config: tuple[int, int], grid: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The grid points one step away in either knob or both (steps along the grid's own values:
    powers of two and the adapter count), ``config`` itself excluded."""
    served = sorted({s for s, _ in grid})
    slots = sorted({k for _, k in grid})
    on_grid = set(grid)
    i, j = served.index(config[0]), slots.index(config[1])
    out = []
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            a, b = i + di, j + dj
            if (di, dj) != (0, 0) and 0 <= a < len(served) and 0 <= b < len(slots):
                if (served[a], slots[b]) in on_grid:
                    out.append((served[a], slots[b]))
    return out


def refine(
    start: tuple[int, int],
    grid: Sequence[tuple[int, int]],
    evaluate: Callable[[int, int], Trial],
    max_evals: int = REFINE_EVALS,
    tie_tol: float = TIE_TOL,
) -> tuple[Trial, list[Trial]]:
    """Hill-climb from the model's prediction: run the twin at the current best's unvisited
    neighbours, move to the best of everything run so far (:func:`choose_best`, the search's
    own rule, ties to fewer slots), stop when the best's neighbourhood is all visited or
    ``max_evals`` runs are spent. Returns the chosen trial and every trial run, in order.

    The best of a growing set only changes when a new trial beats it, so the climb cannot cycle.
    """
    if start not in set(grid):
        raise ConfigError("max_served", f"{start} is not a point of the search grid")
    trials = {start: evaluate(*start)}
    best = trials[start]
    while len(trials) < max_evals:
        todo = [c for c in neighbours((best.max_served, best.max_slots), grid) if c not in trials]
        if not todo:
            break
        for c in todo[: max_evals - len(trials)]:
            trials[c] = evaluate(*c)
        best = choose_best(list(trials.values()), tie_tol)
    return best, list(trials.values())


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
        "twin_runs": sum(e.twin_runs for e in errors) / len(errors),
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
        model = Configurator.fit([r for i, r in enumerate(results) if i % folds != f], max_depth=max_depth)
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
) -> tuple[Configurator, list[SearchResult], list[SearchResult]]:
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
    model = Configurator.fit(train_set, max_depth=max_depth, meta=meta)
    model.margin = choose_margin(train_set, max_depth)
    for predictor in ("tree", "linear"):
        if test_set:
            model.meta[f"heldout_{predictor}"] = summarize_errors(held_out_errors(model, test_set, predictor))
            model.meta[f"heldout_{predictor}_refined"] = summarize_errors(
                held_out_errors(model, test_set, predictor, refine_evals=REFINE_EVALS)
            )
    return model, train_set, test_set
