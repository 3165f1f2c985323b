"""The routing policies, without Ray: each rule of AdapterRouter, the baselines, determinism."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import paradapt.cluster as cluster_pkg
from paradapt.cluster import (
    RESIDENCY_SCORES,
    AdapterRouter,
    MultiplexRouter,
    NoReplicaError,
    RandomRouter,
    ReplicaState,
    residency_score,
)
from paradapt.errors import ConfigError


def rep(name: str, *, device=(), host=(), free=0, queued=0, running=0, alive=True) -> ReplicaState:
    """A snapshot; ``host`` adds to the device residents (device <= host, as the cache counts)."""
    return ReplicaState(
        name,
        frozenset(device),
        frozenset(device) | frozenset(host),
        free_slots=free,
        queued=queued,
        running=running,
        alive=alive,
    )


# -- residency -------------------------------------------------------------------------------------


def test_residency_scores_order_device_host_free_slot_none():
    assert residency_score("a", rep("r", device=["a"])) == RESIDENCY_SCORES["device"] == 1.0
    assert residency_score("a", rep("r", host=["a"])) == RESIDENCY_SCORES["host"]
    assert residency_score("a", rep("r", free=1)) == RESIDENCY_SCORES["free_slot"] == 0.8
    assert residency_score("a", rep("r")) == RESIDENCY_SCORES["none"] == 0.0
    assert 1.0 > RESIDENCY_SCORES["host"] > 0.8


@pytest.mark.parametrize(
    ("replicas", "want"),
    [
        ([rep("r0", free=2), rep("r1", host=["a"]), rep("r2", device=["a"])], "r2"),  # device beats host
        ([rep("r0", free=2), rep("r1", host=["a"]), rep("r2")], "r1"),  # host beats a free slot
        ([rep("r0"), rep("r1", free=1), rep("r2")], "r1"),  # a free slot beats a full replica
    ],
)
def test_a_new_adapter_goes_where_it_is_most_resident(replicas, want):
    router = AdapterRouter()
    assert router.choose("a", replicas) == want
    assert router.placements("a") == (want,)


def test_residency_wins_over_load_for_a_new_adapter():
    router = AdapterRouter()
    assert router.choose("a", [rep("r0", free=1), rep("r1", device=["a"], running=3)]) == "r1"


# -- sticky ----------------------------------------------------------------------------------------


def test_sticky_wins_over_stale_residency():
    router = AdapterRouter()
    assert router.choose("a", [rep("r0", free=1), rep("r1")]) == "r0"
    # the stats now say r1 holds "a" and r0 does not (stale, or another router's doing): sticky wins
    assert router.choose("a", [rep("r0"), rep("r1", device=["a"])]) == "r0"
    assert router.stats.hits == 0 and router.stats.adapter_requests == 2


def test_sticky_counts_a_hit_when_the_replica_holds_the_adapter():
    router = AdapterRouter()
    router.choose("a", [rep("r0", free=1), rep("r1", free=1)])
    router.choose("a", [rep("r0", device=["a"]), rep("r1", free=1)])
    router.choose("a", [rep("r0", host=["a"]), rep("r1", free=1)])
    assert (router.stats.hits, router.stats.adapter_requests, router.stats.hit_rate) == (2, 3, 2 / 3)


# -- fewest adapters -------------------------------------------------------------------------------


def test_new_adapters_spread_over_the_replicas_with_fewest_adapters():
    router = AdapterRouter()
    replicas = [rep(f"r{i}", free=1) for i in range(3)]
    chosen = [router.choose(f"a{i}", replicas) for i in range(6)]
    assert chosen == ["r0", "r1", "r2", "r0", "r1", "r2"]


def test_among_equal_adapter_counts_the_least_loaded_gets_a_new_adapter():
    router = AdapterRouter()
    assert router.choose("a", [rep("r0", running=4), rep("r1", running=1), rep("r2", running=2)]) == "r1"


# -- spill -----------------------------------------------------------------------------------------


def test_no_spill_at_or_below_the_queue_threshold():
    router = AdapterRouter(spill_queue=4)
    router.choose("hot", [rep("r0", free=1), rep("r1", free=1)])
    for _ in range(5):
        assert router.choose("hot", [rep("r0", device=["hot"], queued=4), rep("r1", free=1)]) == "r0"
    assert router.stats.spills == 0 and router.placements("hot") == ("r0",)


def test_spill_above_the_threshold_adds_one_replica_then_balances_between_them():
    router = AdapterRouter(spill_queue=4)
    router.choose("hot", [rep("r0", free=1), rep("r1", free=1), rep("r2", free=1)])
    busy = [rep("r0", device=["hot"], queued=5), rep("r1", running=2), rep("r2", free=1)]
    assert router.choose("hot", busy) == "r2"  # residency (free slot) picks the spill target
    assert router.stats.spills == 1 and router.placements("hot") == ("r0", "r2")
    # r2 is below the threshold: no more spill, the less loaded of the two serves
    assert router.choose("hot", [rep("r0", queued=5), rep("r1"), rep("r2", queued=1)]) == "r2"
    assert router.choose("hot", [rep("r0", queued=1), rep("r1"), rep("r2", queued=3)]) == "r0"
    assert router.stats.spills == 1


def test_spill_is_bounded_by_max_replicas_per_adapter():
    router = AdapterRouter(spill_queue=0, max_replicas_per_adapter=2)
    names = [f"r{i}" for i in range(4)]
    for _ in range(10):  # the adapter's replicas are always busy, the others idle
        router.choose("hot", [rep(n, queued=int(n in router.placements("hot"))) for n in names])
    assert router.stats.spills == 1 and router.placements("hot") == ("r0", "r1")


def test_no_spill_when_every_other_replica_is_busy_too():
    router = AdapterRouter(spill_queue=0)
    names = [f"r{i}" for i in range(3)]
    for _ in range(10):  # a saturated cluster: spilling would only thrash caches
        assert router.choose("hot", [rep(n, queued=3) for n in names]) == "r0"
    assert router.stats.spills == 0


def test_only_a_hot_adapter_spills():
    router = AdapterRouter(spill_queue=0, hot_window=100)
    assert router.choose("cold", [rep("r0"), rep("r1")]) == "r0"
    for _ in range(9):
        assert router.choose("hot", [rep("r0"), rep("r1")]) == "r1"
    # "cold" has 2 of the last 11 requests, under a fair half: its busy replica keeps it
    assert router.choose("cold", [rep("r0", queued=5), rep("r1")]) == "r0"
    assert router.stats.spills == 0 and not router.is_hot("cold", 2)
    # "hot" has 9 of 12: it spills to the idle replica
    assert router.choose("hot", [rep("r0"), rep("r1", queued=5)]) == "r0"
    assert router.stats.spills == 1 and router.is_hot("hot", 2)


def test_spill_needs_every_replica_of_the_adapter_busy():
    router = AdapterRouter(spill_queue=2, max_replicas_per_adapter=3)
    router.choose("hot", [rep("r0", free=1), rep("r1"), rep("r2")])
    router.choose("hot", [rep("r0", queued=3), rep("r1", free=1), rep("r2")])  # spills to r1
    assert router.choose("hot", [rep("r0", queued=3), rep("r1", queued=2), rep("r2", free=1)]) == "r1"
    assert router.stats.spills == 1


def test_no_spill_with_a_single_replica():
    router = AdapterRouter(spill_queue=0)
    for _ in range(3):
        assert router.choose("hot", [rep("r0", queued=9)]) == "r0"
    assert router.stats.spills == 0


# -- dead replicas ---------------------------------------------------------------------------------


def test_a_dead_replica_is_never_chosen():
    for router in (AdapterRouter(seed=1), MultiplexRouter(seed=1), RandomRouter(seed=1)):
        replicas = [rep("r0", device=["a"], alive=False), rep("r1"), rep("r2", alive=False)]
        for adapter in ("a", "b", None) * 10:
            assert router.choose(adapter, replicas) == "r1"


def test_an_adapter_whose_replica_died_is_replaced_once():
    router = AdapterRouter()
    assert router.choose("a", [rep("r0", free=1), rep("r1")]) == "r0"
    assert router.choose("a", [rep("r0", alive=False), rep("r1")]) == "r1"
    assert router.stats.replacements == 1 and router.placements("a") == ("r1",)
    # r0 comes back (empty): "a" stays on r1, no second re-placement
    assert router.choose("a", [rep("r0", free=1), rep("r1", device=["a"])]) == "r1"
    assert router.stats.replacements == 1


def test_a_replica_missing_from_the_snapshot_counts_as_dead():
    router = AdapterRouter()
    router.choose("a", [rep("r0", free=1), rep("r1")])
    assert router.choose("a", [rep("r1")]) == "r1"
    assert router.stats.replacements == 1


def test_a_spilled_adapter_keeps_its_live_replica_when_one_dies():
    router = AdapterRouter(spill_queue=0)
    router.choose("hot", [rep("r0", free=1), rep("r1"), rep("r2")])
    router.choose("hot", [rep("r0", queued=1), rep("r1", free=1), rep("r2")])
    assert router.placements("hot") == ("r0", "r1")
    assert router.choose("hot", [rep("r0", alive=False), rep("r1"), rep("r2")]) == "r1"
    assert router.placements("hot") == ("r1",) and router.stats.replacements == 0


def test_no_live_replica_raises():
    with pytest.raises(NoReplicaError):
        AdapterRouter().choose("a", [rep("r0", alive=False)])
    with pytest.raises(NoReplicaError):
        RandomRouter().choose(None, [])


def test_forget_drops_the_placement():
    router = AdapterRouter()
    router.choose("a", [rep("r0"), rep("r1")])
    router.forget("a")
    assert router.placements("a") == ()
    assert router.choose("a", [rep("r0"), rep("r1", host=["a"])]) == "r1"


# -- base model ------------------------------------------------------------------------------------


def test_base_requests_spread_and_avoid_the_loaded_replica():
    router = AdapterRouter(seed=0)
    even = [rep(f"r{i}") for i in range(4)]
    assert {router.choose(None, even) for _ in range(60)} == {"r0", "r1", "r2", "r3"}
    # power of two choices never picks the most loaded of several replicas
    skewed = [rep("r0", queued=50), rep("r1"), rep("r2"), rep("r3")]
    assert "r0" not in {router.choose(None, skewed) for _ in range(60)}
    assert router.placements(None) == () and router.stats.adapter_requests == 0


def test_base_requests_do_not_disturb_adapter_placement():
    router = AdapterRouter()
    replicas = [rep("r0"), rep("r1")]
    for _ in range(10):
        router.choose(None, replicas)
    assert router.choose("a", replicas) == "r0"


# -- determinism -----------------------------------------------------------------------------------


def _sequence(router, n=200):
    replicas = [rep(f"r{i}", queued=i % 3, free=i % 2) for i in range(5)]
    adapters = [None, "a", "b", None, "c", "a", None, "d"]
    return [router.choose(adapters[i % len(adapters)], replicas) for i in range(n)]


@pytest.mark.parametrize("cls", [AdapterRouter, MultiplexRouter, RandomRouter])
def test_same_seed_same_choices(cls):
    assert _sequence(cls(seed=7)) == _sequence(cls(seed=7))


@pytest.mark.parametrize("cls", [AdapterRouter, MultiplexRouter, RandomRouter])
def test_the_seed_matters_where_the_policy_is_random(cls):
    assert _sequence(cls(seed=1)) != _sequence(cls(seed=2))


# -- the Ray Serve multiplexing baseline -----------------------------------------------------------


def test_multiplex_prefers_holders_even_when_they_are_busy():
    router = MultiplexRouter(seed=0)
    replicas = [rep("r0", device=["hot"], queued=40), rep("r1"), rep("r2")]
    assert {router.choose("hot", replicas) for _ in range(30)} == {"r0"}
    assert router.stats.hits == 30 and router.stats.spills == 0


def test_multiplex_chooses_between_holders_by_load():
    router = MultiplexRouter(seed=0)
    replicas = [rep("r0", host=["a"], queued=9), rep("r1", host=["a"]), rep("r2")]
    assert {router.choose("a", replicas) for _ in range(30)} == {"r1"}


def test_multiplex_sends_a_new_model_to_the_replicas_with_fewest_models():
    router = MultiplexRouter(seed=0)
    replicas = [rep("r0", host=["x", "y"]), rep("r1", host=["x"]), rep("r2", host=["y"], queued=5), rep("r3", host=["z", "w"])]
    seen = {router.choose("new", replicas) for _ in range(40)}
    assert seen == {"r1"}  # r1 and r2 hold one model each; two choices between them picks the idle r1


def test_multiplex_does_not_remember_its_decisions():
    router = MultiplexRouter(seed=0)
    replicas = [rep("r0"), rep("r1", host=["q"])]
    assert router.choose("a", replicas) == "r0"
    # the stats still show nothing for "a" (stale): the next request may go anywhere with fewest models
    replicas = [rep("r0", host=["p"]), rep("r1")]
    assert router.choose("a", replicas) == "r1"


# -- misc ------------------------------------------------------------------------------------------


def test_bad_knobs_are_config_errors_naming_the_field():
    with pytest.raises(ConfigError, match="spill_queue"):
        AdapterRouter(spill_queue=-1)
    with pytest.raises(ConfigError, match="max_replicas_per_adapter"):
        AdapterRouter(max_replicas_per_adapter=0)
    with pytest.raises(ConfigError, match="hot_window"):
        AdapterRouter(hot_window=0)


def test_only_ray_serve_imports_ray():
    """The router and its state stay pure Python (the twin runs them); ``ray_serve`` alone, which
    nothing in the package imports (the CLI does, lazily), may import Ray."""
    root = Path(cluster_pkg.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            if path.name != "ray_serve.py":
                assert not any(n == "ray" or n.startswith("ray.") for n in names), path
                assert not any("ray_serve" in n for n in names), path


# -- a planned placement ---------------------------------------------------------------------------


def test_preplace_starts_sticky_routing_from_the_planned_map():
    router = AdapterRouter(max_replicas_per_adapter=2)
    router.preplace({"r0": ["hot", "a"], "r1": ["hot"], "r2": ["hot", "b"]})
    assert router.placements("hot") == ("r0", "r1", "r2")  # more than the spill bound: a plan is not a spill
    replicas = [rep("r0", queued=3), rep("r1", queued=1), rep("r2", queued=2)]
    assert router.choose("hot", replicas) == "r1"  # the least loaded of its planned replicas
    assert router.choose("b", replicas) == "r2"  # placed, though no snapshot holds it
    assert router.stats.spills == 0
    router.preplace({"r0": ["hot"]})  # again: nothing doubles
    assert router.placements("hot") == ("r0", "r1", "r2")


def test_the_baselines_ignore_a_placement():
    for router in (MultiplexRouter(seed=1), RandomRouter(seed=1)):
        router.preplace({"r0": ["a"]})
        assert router.choose("a", [rep("r0"), rep("r1")]) in ("r0", "r1")
