"""The cluster planner: placement, load scaling, and the plan it checks in the cluster twin."""

from __future__ import annotations

import dataclasses

import pytest
from test_twin import COST, KNOBS  # the twin tests' cost model and small engine knobs

from paradapt.cluster import AdapterRouter, MultiplexRouter
from paradapt.errors import ConfigError
from paradapt.serve.workload import Workload, WorkloadSpec
from paradapt.twin import SimEngine
from paradapt.twin.cluster import simulate_cluster
from paradapt.twin.cluster_plan import (
    MAX_SHARE,
    adapter_loads,
    offered_load,
    place_adapters,
    plan_cluster,
    scale_to_target,
)
from paradapt.twin.sim import engine_config

# Skewed (alpha 0.1: adapter-0000 gets 2/3 of the first tenth...), small lengths: each run is quick.
SPEC = WorkloadSpec(
    num_adapters=16, rate=4.0, duration=6.0, alpha=0.1, input_len=(2, 24), output_len=(2, 10), seed=3
)


def test_placement_replicates_the_hottest_covers_every_adapter_and_balances():
    loads = adapter_loads(SPEC)
    p = place_adapters(loads, 4)
    hottest = max(loads, key=loads.get)
    assert p.copies[hottest] > 1 and hottest in p.replicated
    assert len(p.holders(hottest)) == p.copies[hottest]
    placed = {a for names in p.replicas for a in names}
    assert placed == set(loads)  # every adapter, those without traffic too
    for names in p.replicas:
        assert len(set(names)) == len(names)  # a copy per replica at most
        assert [loads[a] for a in names] == sorted((loads[a] for a in names), reverse=True)  # hottest first
    # no copy carries more than MAX_SHARE of a replica's fair share, unless on every replica already
    fair = sum(loads.values()) / 4
    assert all(loads[a] / c <= MAX_SHARE * fair + 1e-9 or c == 4 for a, c in p.copies.items())
    assert any(1 < c < 4 for c in p.copies.values()) or p.copies[hottest] == 4
    assert sum(p.load) == pytest.approx(sum(loads.values()))
    assert p.imbalance < 1.2
    assert place_adapters(loads, 4) == p  # deterministic


def test_one_replica_holds_everything_once_and_bad_counts_are_errors():
    p = place_adapters({"a": 3.0, "b": 1.0}, 1)
    assert p.replicas == (("a", "b"),) and p.copies == {"a": 1, "b": 1} and p.imbalance == 1.0
    with pytest.raises(ConfigError, match="replicas"):
        place_adapters({"a": 1.0}, 0)
    empty = place_adapters({}, 2)  # base-model traffic only
    assert empty.replicas == ((), ()) and empty.copies == {}


def test_adapter_loads_of_a_spec_and_of_a_trace():
    loads = adapter_loads(SPEC)
    per_request = (2 + 24) / 2 + (2 + 10) / 2
    assert sum(loads.values()) == pytest.approx(SPEC.rate * per_request)
    w = SPEC.generate()
    trace = Workload(None, w.adapters, w.requests, w.duration)
    counted = adapter_loads(trace)
    assert set(counted) == {a.name for a in w.adapters}
    assert sum(counted.values()) == pytest.approx(offered_load(w))


def test_scaling_to_a_target_keeps_the_mix():
    scaled, factor = scale_to_target(SPEC, 400.0)
    assert offered_load(scaled) == pytest.approx(400.0, rel=0.011)
    assert scaled.spec.rate == pytest.approx(SPEC.rate * factor) and scaled.duration == SPEC.duration
    w = SPEC.generate()
    trace = Workload(None, w.adapters, w.requests, w.duration)
    squeezed, f = scale_to_target(trace, 2 * offered_load(w))
    assert f == pytest.approx(2.0) and offered_load(squeezed) == pytest.approx(2 * offered_load(w))
    assert [r.adapter for r in squeezed.requests] == [r.adapter for r in w.requests]
    with pytest.raises(ConfigError, match="target_throughput"):
        scale_to_target(SPEC, 0.0)


def test_preload_warms_the_cache_off_the_clock():
    w = SPEC.generate()
    engine = SimEngine(w, COST, engine_config(3, 2, **KNOBS))
    names = [a.name for a in w.adapters]
    engine.preload(names[:5])
    assert engine.t == 0.0 and engine.busy == 0.0 and engine.cache.stats.device_loads == 0
    assert set(engine.cache.on_host) == set(names[:3]) and set(engine.cache.on_device) == set(names[:2])
    assert engine.cache.on_device[-1] == names[0]  # the hottest is the most recently used
    with pytest.raises(ConfigError, match="placement"):
        engine.preload(["no-such-adapter"])


def test_a_placement_changes_the_simulation():
    w = SPEC.generate()
    p = place_adapters(adapter_loads(SPEC), 2)
    run = dict(replicas=2, max_served=8, max_slots=4, drain=30.0, **KNOBS)
    cold_router, warm_router = AdapterRouter(), AdapterRouter()
    cold = simulate_cluster(w, COST, cold_router, **run)
    warm = simulate_cluster(w, COST, warm_router, placement=p.replicas, **run)
    hottest = p.replicas[0][0]
    assert len(warm_router.placements(hottest)) == p.copies[hottest] == 2  # the router starts from the map
    assert len(cold_router.placements(hottest)) < 2 or cold_router.stats.spills > 0
    assert warm.hit_rate > cold.hit_rate  # the first request of each placed adapter finds it warm
    assert warm.result.finished == cold.result.finished == len(w.requests)
    # the baselines ignore the map but see the warm caches
    mux = simulate_cluster(w, COST, MultiplexRouter(), placement=p.replicas, **run)
    assert mux.result.finished == len(w.requests)
    with pytest.raises(ConfigError, match="placement"):
        simulate_cluster(w, COST, AdapterRouter(), placement=p.replicas[:1], **run)


def test_the_plan_meets_an_easy_target():
    offered = offered_load(SPEC.generate())
    plan = plan_cluster(SPEC, COST, target=offered, max_replicas=8, **KNOBS)
    assert plan.met and plan.searched and 1 <= plan.replicas <= 8
    assert plan.result.result.starvation_free and plan.result.starved == ()
    assert plan.offered == pytest.approx(offered, rel=0.011)
    assert plan.twin_runs == len(plan.trials) + 1 <= 16 + 1
    assert (plan.max_served, plan.max_slots) in {(t.max_served, t.max_slots) for t in plan.trials}
    d = plan.to_dict()
    assert (
        d["replicas"] == plan.replicas
        and d["met"] is True
        and len(d["placement"]["replicas"]) == plan.replicas
    )


def test_a_larger_target_needs_at_least_as_many_replicas():
    counts = []
    for target in (200.0, 600.0, 1500.0):
        plan = plan_cluster(SPEC, COST, target=target, max_replicas=32, **KNOBS)
        assert plan.met, plan.summary()
        counts.append(plan.replicas)
    assert counts == sorted(counts) and counts[-1] > counts[0]


def test_the_plans_placement_replicates_the_hottest_on_a_hot_workload():
    plan = plan_cluster(SPEC, COST, replicas=3, **KNOBS)
    loads = adapter_loads(SPEC)
    hottest = max(loads, key=loads.get)
    assert plan.placement.copies[hottest] > 1
    assert {a for names in plan.placement.replicas for a in names} == set(loads)
    assert not plan.searched and plan.replicas == 3 and plan.target is None and plan.scale == 1.0


def test_a_target_out_of_reach_is_reported_not_met():
    plan = plan_cluster(SPEC, COST, target=10_000.0, max_replicas=2, max_runs=3, refine_evals=2, **KNOBS)
    assert not plan.met and plan.replicas == 2 and len(plan.trials) <= 3
    assert "NOT MET" in plan.summary()


def test_bad_plan_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="target_throughput"):
        plan_cluster(SPEC, COST)  # a search needs a target
    with pytest.raises(ConfigError, match="replicas"):
        plan_cluster(SPEC, COST, replicas=0)
    with pytest.raises(ConfigError, match="max_replicas"):
        plan_cluster(SPEC, COST, target=100.0, max_replicas=0)
    with pytest.raises(ConfigError, match="max_runs"):
        plan_cluster(SPEC, COST, replicas=2, max_runs=0)
    empty = dataclasses.replace(SPEC, rate=1e-3, duration=1.0)
    with pytest.raises(ConfigError, match="workload"):
        plan_cluster(empty, COST, replicas=1)


def test_one_machine_shares_the_measured_cores_and_needs_the_ray_section():
    from paradapt.twin.costmodel import CostModel, RayCost, ServerCost

    d = COST.to_dict()
    d["server"] = ServerCost(token=1e-4).to_dict()
    d["ray"] = RayCost(token=1e-4, replica_cpu=1.0, outside_cpu=0.004, cores=2).to_dict()
    priced = CostModel.from_dict(d)
    target = 1500.0  # more than two replicas on two cores can serve with Ray's processes beside them
    apart = plan_cluster(SPEC, priced, replicas=4, target=target, **KNOBS)
    shared = plan_cluster(SPEC, priced, replicas=4, target=target, one_machine=True, **KNOBS)
    assert apart.result.slowdown == 1.0 and shared.result.slowdown > 1.0
    assert shared.result.result.throughput < apart.result.result.throughput
    with pytest.raises(ConfigError, match="one_machine"):
        plan_cluster(SPEC, COST, replicas=2, one_machine=True, **KNOBS)
