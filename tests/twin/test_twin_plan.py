"""The configurator of ``paradapt plan``: features, grid search, models, files (no twin needed).

A tiny fake twin stands in for ``paradapt.twin.simulate`` here: its throughput surface has a
known optimum that moves with the workload, so the search and the models can be checked
exactly. Tests that run the real twin live in ``test_twin_plan_cli.py``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest

from paradapt.errors import ConfigError
from paradapt.serve.workload import WorkloadSpec
from paradapt.twin import configurator, search
from paradapt.twin.features import FEATURE_NAMES, feature_vector, workload_features


@dataclass
class FakeResult:
    throughput: float
    starvation_free: bool


def fake_optimum(spec: WorkloadSpec) -> tuple[int, int]:
    """The fake surface's peak: more slots for more and flatter traffic, served = 4x slots."""
    slots = min(spec.num_adapters, 32, 2 ** round(math.log2(max(1.0, spec.rate * spec.alpha))))
    return min(spec.num_adapters, 4 * slots), slots


def fake_simulate(spec: WorkloadSpec, cost, *, max_served: int, max_slots: int, **knobs) -> FakeResult:
    """Throughput falls off as a Gaussian in log2 distance from :func:`fake_optimum`."""
    assert max_slots <= max_served
    served_opt, slots_opt = fake_optimum(spec)
    d = (
        0.02 * (math.log2(max_served) - math.log2(served_opt)) ** 2
        + 0.1 * (math.log2(max_slots) - math.log2(slots_opt)) ** 2
    )
    throughput = 1000.0 * spec.rate * math.exp(-d)
    return FakeResult(throughput, throughput >= 0.9 * 1000.0 * spec.rate)


# -- features ----------------------------------------------------------------------------------


def test_features_match_a_hand_computed_spec():
    spec = WorkloadSpec(
        num_adapters=2,
        rate=4.0,
        duration=10,
        alpha=0.5,
        cv=2.0,
        input_len=(10, 30),
        output_len=(8, 8),
        ranks={8: 1, 16: 3},
        kinds={"lora": 1, "parallel": 3},
    )
    f = workload_features(spec)
    # shares under alpha 0.5: sqrt(1/2) and 1 - sqrt(1/2)
    p0 = math.sqrt(0.5)
    assert f["num_adapters"] == 2
    assert f["rate_total"] == 4.0
    assert f["rate_max"] == pytest.approx(4 * p0)
    assert f["rate_min"] == pytest.approx(4 * (1 - p0))
    assert f["rate_mean"] == pytest.approx(2.0)
    assert f["rate_std"] == pytest.approx(4 * p0 - 2.0)  # two values: |x - mean|
    assert (f["rank_max"], f["rank_min"], f["rank_mean"]) == (16, 8, 14)
    assert f["rank_std"] == pytest.approx(math.sqrt(0.25 * 36 + 0.75 * 4))
    assert (f["share_lora"], f["share_parallel"], f["share_series"]) == (0.25, 0.75, 0.0)
    assert (f["input_mean"], f["output_mean"], f["cv"]) == (20, 8, 2.0)
    assert f["offered_tokens"] == pytest.approx(4.0 * 28)
    assert f["effective_adapters"] == pytest.approx(1 / (p0**2 + (1 - p0) ** 2))
    assert f["batch_adapters"] == pytest.approx(2 - (1 - p0) ** 32 - p0**32)
    assert feature_vector(spec) == [f[n] for n in FEATURE_NAMES]


def test_effective_adapters_spans_one_to_n():
    uniform = WorkloadSpec(num_adapters=50, rate=1.0, duration=1, alpha=1.0)
    skewed = WorkloadSpec(num_adapters=50, rate=1.0, duration=1, alpha=0.01)
    assert workload_features(uniform)["effective_adapters"] == pytest.approx(50)
    assert workload_features(skewed)["effective_adapters"] < 1.2


def test_features_do_not_depend_on_the_seed_or_duration():
    a = WorkloadSpec(num_adapters=7, rate=1.5, duration=10, alpha=0.1, seed=1)
    b = WorkloadSpec(num_adapters=7, rate=1.5, duration=99, alpha=0.1, seed=2)
    assert feature_vector(a) == feature_vector(b)


# -- grid and search ---------------------------------------------------------------------------


def test_grid_holds_powers_of_two_and_the_adapter_count():
    assert search.config_grid(1) == [(1, 1)]
    assert search.config_grid(3) == [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3)]
    grid = search.config_grid(100, slot_cap=32)
    assert all(k <= s for s, k in grid)
    assert {s for s, _ in grid} == {1, 2, 4, 8, 16, 32, 64, 100}
    assert max(k for _, k in grid) == 32


@pytest.mark.parametrize("n,rate,alpha", [(50, 8.0, 1.0), (300, 100.0, 1.0), (20, 1.0, 0.1), (3, 40.0, 1.0)])
def test_search_finds_the_optimum_of_a_fake_surface(n, rate, alpha):
    spec = WorkloadSpec(num_adapters=n, rate=rate, duration=10, alpha=alpha)
    result = search.search_in_twin(spec, cost=None, simulate=fake_simulate, tie_tol=0.0)
    assert (result.best.max_served, result.best.max_slots) == fake_optimum(spec)
    assert len(result.trials) == len(search.config_grid(n))
    assert result.best.throughput == result.max_throughput


def test_ties_go_to_the_smallest_configuration_and_starvation_free_wins():
    trials = [
        search.Trial(8, 4, 100.0, True),
        search.Trial(4, 2, 99.5, True),  # within 1%: ties, needs fewer slots
        search.Trial(2, 2, 99.5, True),  # same slots, fewer served
        search.Trial(16, 8, 98.0, True),
    ]
    assert search.choose_best(trials) == trials[2]
    assert search.choose_best(trials, tie_tol=0.0) == trials[0]
    starving = [search.Trial(8, 8, 200.0, False), search.Trial(4, 4, 150.0, True)]
    assert search.choose_best(starving) == starving[1]


# -- training data, models and files ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    specs = search.sample_specs(120, seed=3, capacity=4.0, duration=10)
    cache = tmp_path_factory.mktemp("plan-cache")
    results = search.build_dataset(specs, None, workers=1, cache_dir=cache, simulate=fake_simulate)
    return specs, results, cache


def test_sampled_specs_are_seeded_and_valid():
    a = search.sample_specs(30, seed=1, capacity=2.0)
    assert a == search.sample_specs(30, seed=1, capacity=2.0)
    assert a != search.sample_specs(30, seed=2, capacity=2.0)
    assert len({s.num_adapters for s in a}) > 10
    assert all(0.1 * 2.0 * 0.99 <= s.rate <= 2.5 * 2.0 * 1.01 for s in a)
    with pytest.raises(ConfigError, match="train"):
        search.sample_specs(0, seed=1, capacity=2.0)


def test_dataset_is_cached_on_disk(fake_data):
    specs, results, cache = fake_data
    assert len(list(cache.glob("*.json"))) == len(specs)
    calls = []

    def counting(*a, **k):
        calls.append(1)
        return fake_simulate(*a, **k)

    again = search.build_dataset(specs, None, workers=1, cache_dir=cache, simulate=counting)
    assert calls == []
    assert [r.to_dict() for r in again] == [r.to_dict() for r in results]


def test_dataset_in_two_processes_matches_one(tmp_path):
    specs = search.sample_specs(6, seed=5, capacity=4.0)
    one = search.build_dataset(specs, None, workers=1, simulate=fake_simulate)
    two = search.build_dataset(specs, None, workers=2, simulate=fake_simulate)
    assert [r.to_dict() for r in one] == [r.to_dict() for r in two]


def test_models_train_predict_and_round_trip(fake_data, tmp_path):
    _, results, _ = fake_data
    train_set, test_set = results[:96], results[96:]
    model = configurator.Configurator.fit(train_set, max_depth=5)
    # the JSON tree walks to the same leaves as sklearn's tree would
    import numpy as np
    from sklearn.tree import DecisionTreeRegressor

    X = np.array([feature_vector(r.spec) for r in train_set])
    y = np.log2([r.best.max_slots for r in train_set])
    ref = DecisionTreeRegressor(max_depth=5, min_samples_leaf=3, random_state=0).fit(X, y)
    assert [model.trees["max_slots"].predict(x)[0] for x in X] == pytest.approx(list(ref.predict(X)))

    model.margin = configurator.choose_margin(train_set, max_depth=5)
    assert model.margin in configurator.MARGINS
    path = tmp_path / "plan.json"
    model.save(path)
    loaded = configurator.Configurator.load(path)
    assert loaded.margin == model.margin
    for r in test_set:
        for predictor in ("tree", "linear"):
            assert loaded.recommend(r.spec, predictor) == model.recommend(r.spec, predictor)
    rec = loaded.recommend(test_set[0].spec)
    assert (rec.max_served, rec.max_slots) in search.config_grid(test_set[0].spec.num_adapters)
    assert rec.rules["max_slots"] and all(
        any(n in cond for n in FEATURE_NAMES) for cond in rec.rules["max_slots"]
    )
    text = model.describe()
    assert "|---" in text and "x std(" in text  # export_text rules and linear coefficients

    # the fake surface is learnable: the tree lands close to the optimum on held-out workloads
    summary = configurator.summarize_errors(configurator.held_out_errors(model, test_set, "tree"))
    assert summary["n"] == len(test_set)
    assert summary["mean_error"] < 0.05


def test_bad_model_files_name_the_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        configurator.Configurator.load(bad)
    bad.write_text(json.dumps({"format": 999}))
    with pytest.raises(ConfigError, match="not a paradapt plan model"):
        configurator.Configurator.load(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        configurator.Configurator.load(tmp_path / "missing.json")


def test_snap_stays_on_the_grid():
    assert configurator.snap(10.0, 10.0, 5) == (5, 5)
    assert configurator.snap(-3.0, -3.0, 5) == (1, 1)
    assert configurator.snap(3.0, 1.0, 100) == (8, 2)


# -- refinement in the twin ------------------------------------------------------------------------


def test_neighbours_step_along_the_grid_values():
    grid = search.config_grid(100)  # served 1..64, 100; slots 1..32
    assert set(configurator.neighbours((100, 32), grid)) == {(64, 16), (64, 32), (100, 16)}
    assert set(configurator.neighbours((1, 1), grid)) == {(2, 1), (2, 2)}
    assert all(k <= s for s, k in configurator.neighbours((4, 4), grid))


@pytest.mark.parametrize("start", [(1, 1), (512, 32), (2, 1), (64, 1)])
def test_refine_climbs_a_unimodal_surface_to_its_optimum(start):
    spec = WorkloadSpec(num_adapters=512, rate=40.0, duration=10, alpha=0.5)  # optimum (80->64.., 16)
    grid = search.config_grid(512)
    calls = []

    def evaluate(served, slots):
        calls.append((served, slots))
        return search.twin_trial(spec, None, served, slots, simulate=fake_simulate)

    full = search.search_in_twin(spec, cost=None, simulate=fake_simulate)
    best, trials = configurator.refine(start, grid, evaluate, max_evals=len(grid))
    assert best == full.best  # the search's own tie rule, so the same answer
    assert len(calls) == len(set(calls)) == len(trials)  # no config is run twice
    assert len(calls) < len(grid)  # and it did not search the whole grid
    capped, few = configurator.refine(start, grid, evaluate, max_evals=3)
    assert len(few) == 3 and capped.throughput >= few[0].throughput


def test_refine_rejects_a_start_off_the_grid():
    with pytest.raises(ConfigError, match="grid"):
        configurator.refine((3, 1), search.config_grid(8), lambda s, k: None)


def test_refined_held_out_errors_are_never_worse(fake_data):
    _, results, _ = fake_data
    model = configurator.Configurator.fit(results[:60], max_depth=1)  # a poor model, so refining matters
    plain = configurator.held_out_errors(model, results[60:], "tree")
    refined = configurator.held_out_errors(model, results[60:], "tree", refine_evals=16)
    assert all(r.error <= p.error + 1e-12 for p, r in zip(plain, refined, strict=True))
    assert sum(r.error for r in refined) < sum(p.error for p in plain)
