"""AdapterCache: LRU over disk -> host -> device, pinning, prefetch, byte budgets, moves as data."""

from __future__ import annotations

import random

import pytest

from paradapt.errors import AdapterNotFoundError, ConfigError, ParadaptError
from paradapt.serve.cache import AdapterCache, AdapterPinnedError, MemoryBudget, Move


def make(n=6, served=4, slots=2, size=10, **kw) -> AdapterCache:
    return AdapterCache({f"a{i}": size for i in range(n)}, max_served=served, max_slots=slots, **kw)


def ops(moves):
    return [(m.op, m.adapter) for m in moves]


def test_cold_load_goes_disk_to_host_to_device():
    c = make()
    r = c.ensure_resident(["a0"])
    assert r.ok and ops(r.moves) == [("load_host", "a0"), ("load_device", "a0")]
    assert c.tier("a0") == "device" and c.tier("a1") == "disk"
    assert c.stats.disk_misses == 1 and c.stats.host_loads == 1 and c.stats.device_loads == 1
    again = c.ensure_resident(["a0"])
    assert again.moves == () and c.stats.device_hits == 1


def test_device_lru_evicts_least_recently_used_to_host():
    c = make()
    c.ensure_resident(["a0"])
    c.ensure_resident(["a1"])
    c.ensure_resident(["a0"])  # a1 is now the LRU device resident
    r = c.ensure_resident(["a2"])
    assert ("evict_device", "a1") in ops(r.moves)
    assert c.on_device == ["a0", "a2"]
    assert c.tier("a1") == "host"
    r = c.ensure_resident(["a1"])  # back from host: no disk load
    assert ops(r.moves) == [("evict_device", "a0"), ("load_device", "a1")]
    assert c.stats.host_hits == 1


def test_host_lru_evicts_least_recently_used_off_device_adapter():
    c = make(served=3, slots=1)
    for n in ("a0", "a1", "a2"):
        c.ensure_resident([n])
    assert c.on_host == ["a0", "a1", "a2"]
    r = c.ensure_resident(["a3"])
    assert ops(r.moves) == [
        ("evict_device", "a2"),
        ("evict_host", "a0"),
        ("load_host", "a3"),
        ("load_device", "a3"),
    ]
    assert c.tier("a0") == "disk" and c.stats.host_evictions == 1


def test_pinned_adapter_is_never_evicted_and_the_request_waits():
    c = make(slots=2)
    c.ensure_resident(["a0", "a1"])
    c.pin("a0")
    c.pin("a1")
    r = c.ensure_resident(["a2"])
    assert not r.ok and r.missing == ("a2",) and r.moves == ()
    assert set(c.on_device) == {"a0", "a1"}
    c.unpin("a1")
    r = c.ensure_resident(["a2"])
    assert r.ok and ("evict_device", "a1") in ops(r.moves)
    assert c.tier("a0") == "device"


def test_pins_are_counted_per_request():
    c = make(slots=1)
    c.ensure_resident(["a0"])
    c.pin("a0")
    c.pin("a0")
    c.unpin("a0")
    assert not c.ensure_resident(["a1"]).ok
    c.unpin("a0")
    assert c.ensure_resident(["a1"]).ok
    with pytest.raises(ParadaptError, match="not pinned"):
        c.unpin("a0")


def test_names_asked_together_do_not_evict_each_other():
    c = make(slots=2)
    r = c.ensure_resident(["a0", "a1"])
    assert r.ok and set(c.on_device) == {"a0", "a1"}
    r = c.ensure_resident(["a2", "a3", "a4"])  # 3 > 2 slots: the third waits
    assert r.missing == ("a4",)
    assert set(c.on_device) == {"a2", "a3"}


def test_capacity_never_exceeded_under_random_traffic():
    rng = random.Random(0)
    sizes = {f"a{i}": rng.choice([10, 20, 40]) for i in range(30)}
    c = AdapterCache(sizes, max_served=8, max_slots=3, device_bytes=80, host_bytes=200)
    pinned: list[str] = []
    for _ in range(2000):
        action = rng.random()
        if action < 0.6:
            names = rng.sample(sorted(sizes), rng.randint(1, 3))
            r = c.ensure_resident(names)
            for n in names:
                assert (n in r.missing) != (c.tier(n) == "device")
        elif action < 0.75 and c.on_device:
            n = rng.choice(c.on_device)
            c.pin(n)
            pinned.append(n)
        elif action < 0.9 and pinned:
            c.unpin(pinned.pop(rng.randrange(len(pinned))))
        else:
            c.prefetch(rng.sample(sorted(sizes), 4))
        assert len(c.on_device) <= 3 and len(c.on_host) <= 8
        assert c.used_bytes("device") <= 80 and c.used_bytes("host") <= 200
        assert set(c.on_device) <= set(c.on_host)
        assert set(pinned) <= set(c.on_device)  # pinned while on device: never evicted


def test_prefetch_fills_host_only_and_never_evicts_device_or_pinned():
    c = make(n=8, served=4, slots=2)
    c.ensure_resident(["a0", "a1"])
    c.pin("a0")
    moves = c.prefetch(["a2", "a3"])
    assert ops(moves) == [("load_host", "a2"), ("load_host", "a3")]
    assert c.on_device == ["a0", "a1"] and c.stats.prefetch_loads == 2
    moves = c.prefetch(["a4", "a5"])  # host full: only a2/a3 (off device) may go
    assert ("evict_host", "a2") in ops(moves) and ("evict_host", "a3") in ops(moves)
    assert {"a0", "a1"} <= set(c.on_host) and c.on_device == ["a0", "a1"]
    assert c.stats.device_loads == 2  # prefetch never touched the device


def test_prefetch_stops_quietly_without_room():
    c = make(n=6, served=2, slots=2)
    c.ensure_resident(["a0", "a1"])
    assert c.prefetch(["a2", "a3"]) == []
    assert c.prefetch(["unknown"]) == []


def test_prefetch_does_not_evict_what_it_is_prefetching():
    c = make(n=6, served=2, slots=1)
    moves = c.prefetch(["a0", "a1", "a2"])
    assert ops(moves) == [("load_host", "a0"), ("load_host", "a1")]


def test_prefetched_adapter_is_a_host_hit_later():
    c = make()
    c.prefetch(["a3"])
    r = c.ensure_resident(["a3"])
    assert ops(r.moves) == [("load_device", "a3")] and c.stats.host_hits == 1 and c.stats.disk_misses == 0


def test_device_byte_budget_counts_sizes():
    c = AdapterCache({"big": 60, "s1": 20, "s2": 20, "s3": 20}, max_served=4, max_slots=3, device_bytes=80)
    assert c.ensure_resident(["s1", "s2", "s3"]).ok
    r = c.ensure_resident(["big"])  # needs 60 free: evicts two small ones, LRU first
    assert r.ok and ops(r.moves)[:2] == [("evict_device", "s1"), ("evict_device", "s2")]
    assert c.used_bytes("device") == 80
    assert c.fits(["big", "s1"]) and not c.fits(["big", "s1", "s2"])


def test_adapter_larger_than_budget_waits_not_crashes():
    c = AdapterCache({"huge": 500, "a": 10}, max_served=2, max_slots=2, device_bytes=100)
    r = c.ensure_resident(["huge", "a"])
    assert r.missing == ("huge",) and c.tier("a") == "device" and c.tier("huge") == "disk"
    assert not c.fits(["huge"])


def test_loader_sees_every_move_in_order_and_failure_keeps_books_consistent():
    seen: list[Move] = []

    def loader(m: Move):
        if m.adapter == "a3" and m.op == "load_host":
            raise OSError("corrupt a3")
        seen.append(m)

    c = make(loader=loader)
    r = c.ensure_resident(["a0"])
    assert list(r.moves) == seen
    with pytest.raises(OSError, match="corrupt"):
        c.ensure_resident(["a3"])
    assert c.tier("a3") == "disk" and c.stats.host_loads == 1
    assert c.ensure_resident(["a1"]).ok


def test_remove_adapter_evicts_everywhere_and_refuses_when_pinned():
    c = make()
    c.ensure_resident(["a0"])
    c.pin("a0")
    with pytest.raises(AdapterPinnedError, match="a0"):
        c.remove_adapter("a0")
    c.unpin("a0")
    assert ops(c.remove_adapter("a0")) == [("evict_device", "a0"), ("evict_host", "a0")]
    assert "a0" not in c
    with pytest.raises(AdapterNotFoundError, match="a0"):
        c.ensure_resident(["a0"])


def test_add_adapter_at_runtime_and_size_change_rules():
    c = make()
    c.add_adapter("new", 5)
    assert c.ensure_resident(["new"]).ok and c.size("new") == 5
    with pytest.raises(ConfigError, match="resident"):
        c.add_adapter("new", 6)
    with pytest.raises(ConfigError):
        c.add_adapter("", 5)
    with pytest.raises(ConfigError, match="size"):
        c.add_adapter("neg", -1)


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(max_served=2, max_slots=3), "max_slots"),
        (dict(max_served=0, max_slots=0), "max_slots"),
        (dict(max_served=2, max_slots=1, device_bytes=-5), "device_bytes"),
    ],
)
def test_bad_knobs_name_their_field(kw, field):
    with pytest.raises(ConfigError) as e:
        AdapterCache({}, **kw)
    assert e.value.field == field


def test_memory_budget_trades_kv_tokens_for_slots():
    b8 = MemoryBudget(total_bytes=1_000_000, kv_bytes_per_token=100, max_slots=8, slot_bytes=10_000)
    b32 = MemoryBudget(total_bytes=1_000_000, kv_bytes_per_token=100, max_slots=32, slot_bytes=10_000)
    assert b8.kv_tokens == (1_000_000 - 80_000) // 100 and b8.adapter_bytes == 80_000
    assert b32.kv_tokens < b8.kv_tokens
    with pytest.raises(ConfigError, match="no room for the KV cache") as e:
        MemoryBudget(total_bytes=100_000, kv_bytes_per_token=100, max_slots=10, slot_bytes=10_000)
    assert e.value.field == "max_slots"
    with pytest.raises(ConfigError) as e:
        MemoryBudget(total_bytes=1000, kv_bytes_per_token=0, max_slots=1, slot_bytes=1)
    assert e.value.field == "kv_bytes_per_token"
