"""The cluster twin: N simulated engines behind one router (the router code Ray will run)."""

from __future__ import annotations

import pytest
from test_twin import COST  # the twin tests' cost model (these workloads use its LoRA terms only)

from paradapt.cluster import AdapterRouter, MultiplexRouter, RandomRouter, replica_state
from paradapt.errors import ConfigError
from paradapt.serve.workload import WorkloadSpec
from paradapt.twin import SimEngine, simulate
from paradapt.twin.cluster import simulate_cluster
from paradapt.twin.sim import engine_config

KNOBS = dict(page_size=4, num_blocks=40, token_budget=16, max_running=5, starvation_after=0.05, prefetch=2)
# Small and skewed: 12 adapters, the first few hot; each replica holds 3 on host and 2 on device.
SPEC = WorkloadSpec(
    num_adapters=12, rate=30.0, duration=4.0, alpha=0.3, input_len=(2, 30), output_len=(2, 12), seed=1
)
CACHE = dict(max_served=3, max_slots=2)


def run(router, *, replicas=2, spec=SPEC, drain=60.0, **kw):
    return simulate_cluster(spec, COST, router, replicas=replicas, drain=drain, **{**CACHE, **KNOBS, **kw})


def test_one_replica_is_the_single_engine_twin():
    single = simulate(SPEC, COST, drain=60.0, **CACHE, **KNOBS)
    for router in (AdapterRouter(), RandomRouter(seed=3)):
        c = run(router, replicas=1)
        assert c.result.row() == single.row()
        assert c.result.served_fraction == single.served_fraction
        assert c.replicas["replica-0"].row() == single.row()
        assert c.imbalance == 1.0


def test_two_replicas_serve_every_request_and_the_counts_add_up():
    workload = SPEC.generate()
    c = run(AdapterRouter())
    n = len(workload.requests)
    assert c.result.requests == n and c.result.finished == n and c.starved == ()
    assert sum(c.requests.values()) == n and all(v > 0 for v in c.requests.values())
    assert sum(m.finished for m in c.replicas.values()) == n
    assert sum(m.requests for m in c.replicas.values()) == n
    assert sum(c.load.values()) == workload.offered_tokens()
    assert c.router.requests == c.router.adapter_requests == n
    # the cluster's processed tokens are the replicas' (throughput counts tokens within the window)
    total = sum(m.throughput for m in c.replicas.values())
    assert c.result.throughput == pytest.approx(total)
    assert c.result.loads == sum(m.loads for m in c.replicas.values())
    assert max(c.load.values()) / (sum(c.load.values()) / 2) == pytest.approx(c.imbalance)


def test_our_router_hits_the_cache_more_than_random_routing():
    ours = run(AdapterRouter())
    rand = run(RandomRouter(seed=0))
    assert ours.hit_rate >= rand.hit_rate
    assert ours.result.loads <= rand.result.loads  # fewer host -> device loads across the cluster


def test_the_hit_rate_is_the_routers():
    router = MultiplexRouter(seed=0)
    c = run(router)
    assert c.hit_rate == router.stats.hit_rate == router.stats.hits / router.stats.adapter_requests
    assert 0.0 < c.hit_rate < 1.0


def test_spill_moves_load_off_the_hot_replica():
    hot = WorkloadSpec(
        num_adapters=8, rate=60.0, duration=4.0, alpha=0.05, input_len=(2, 30), output_len=(2, 12), seed=2
    )
    stuck = run(AdapterRouter(spill_queue=2, max_replicas_per_adapter=1), spec=hot)
    spilled = run(AdapterRouter(spill_queue=2, max_replicas_per_adapter=2), spec=hot)
    assert stuck.router.spills == 0 and spilled.router.spills >= 1
    assert spilled.imbalance < stuck.imbalance


def test_a_run_is_deterministic_given_the_seed():
    a = run(AdapterRouter(seed=5), stats_period=0.5)
    b = run(AdapterRouter(seed=5), stats_period=0.5)
    assert a.requests == b.requests and a.result.row() == b.result.row() and a.hit_rate == b.hit_rate


def test_stale_stats_still_serve_everything():
    c = run(MultiplexRouter(seed=0), stats_period=1.0)
    assert c.result.finished == c.result.requests and c.starved == ()


def test_starved_adapters_are_reported():
    # overload, one slot per replica, the starvation guard off, a very hot adapter, no drain: the hot
    # adapter always holds the slot, so rare adapters never run; with the guard and a drain, none starve
    hot = WorkloadSpec(
        num_adapters=10, rate=200.0, duration=2.0, alpha=0.05, input_len=(2, 30), output_len=(2, 12), seed=4
    )
    starving = run(RandomRouter(seed=0), spec=hot, drain=0.0, max_slots=1, starvation_after=1e9)
    asked = {r.adapter for r in hot.generate().requests}
    assert starving.starved and set(starving.starved) <= asked
    assert "adapter-0000" not in starving.starved
    for a in starving.starved:
        assert starving.result.served_fraction[a] == 0.0
    guarded = run(RandomRouter(seed=0), spec=hot, drain=60.0, max_slots=1)
    assert guarded.starved == () and guarded.result.finished == guarded.result.requests


def test_bad_cluster_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="replicas"):
        run(AdapterRouter(), replicas=0)
    with pytest.raises(ConfigError, match="stats_period"):
        run(AdapterRouter(), stats_period=-1.0)


def test_the_snapshot_reads_the_engines_cache_and_scheduler():
    workload = SPEC.generate()
    engine = SimEngine(workload, COST, engine_config(3, 2, **KNOBS))
    names = [a.name for a in workload.adapters]
    for i, adapter in enumerate(names[:4]):
        engine.add(f"r{i}", adapter, 8, 4)
    engine.step()
    s = replica_state("r", engine)
    assert s.on_device == frozenset(engine.cache.on_device) and s.on_device
    assert s.on_host == frozenset(engine.cache.on_host) and s.on_device <= s.on_host
    assert s.queued == engine.num_waiting and s.running == engine.num_running
    assert s.queued + s.running == 4 and s.load == 4
    assert s.free_slots == 2 - len(engine.scheduler.running_adapters)
    assert s.alive
