"""End-to-end invariants of Scheduler + AdapterCache over generated workloads, with a fake executor.

``run`` is a deliberately tiny stand-in for the engine loop (NOT the digital twin): a step costs
a fixed time plus a little per token and per adapter load. Every step checks the limits; the
runs check liveness (every request finishes), starvation (bounded waits under skew), and that
more adapter slots never hurt throughput when steps have a fixed cost.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import pytest

from paradapt.serve.cache import AdapterCache
from paradapt.serve.scheduler import Request, Scheduler, SchedulerConfig
from paradapt.serve.workload import Workload, WorkloadSpec

STEP_COST = 0.02  # s per step, whatever it holds
TOKEN_COST = 0.0001  # s per token in the step
LOAD_COST = 0.005  # s per host -> device load


@dataclass
class SimResult:
    end: float
    finished: int
    tokens: int
    waits: dict[str, float] = field(default_factory=dict)  # request id -> admission wait
    served: dict[str, int] = field(default_factory=dict)  # adapter -> finished requests
    steps: int = 0
    device_loads: int = 0

    @property
    def throughput(self) -> float:
        return self.tokens / self.end


def run(
    w: Workload,
    *,
    max_slots: int,
    max_served: int,
    token_budget: int = 256,
    kv_tokens: int = 8192,
    max_running: int = 32,
    starvation_after: float = 2.0,
    prefetch: int = 4,
    max_steps: int = 200_000,
) -> SimResult:
    sizes = {a.name: 1000 * a.rank for a in w.adapters}
    cache = AdapterCache(sizes, max_served=max_served, max_slots=max_slots)
    cfg = SchedulerConfig(
        token_budget=token_budget,
        kv_tokens=kv_tokens,
        max_running=max_running,
        queue_bound=len(w.requests) + 1,
        starvation_after=starvation_after,
    )
    sched = Scheduler(cfg, cache)
    pending = deque(w.requests)
    res = SimResult(end=0.0, finished=0, tokens=0)
    now = 0.0
    while pending or sched.has_work():
        while pending and pending[0].arrival <= now:
            q = pending.popleft()
            sched.add(Request(str(q.id), q.adapter, q.prompt_len, q.output_len, q.arrival))
        if not sched.has_work():
            now = pending[0].arrival
            continue
        plan = sched.schedule(now)
        assert not plan.empty, "work is waiting but nothing was scheduled (deadlock)"
        assert plan.num_tokens <= token_budget
        assert len(plan.adapters) <= max_slots
        assert sched.kv_used <= kv_tokens
        assert len(sched.running) <= max_running
        for rid in plan.admitted:
            r = sched.get(rid)
            res.waits[rid] = now - r.arrival
        residency = cache.ensure_resident(plan.adapters)
        assert residency.ok, residency.missing
        loads = sum(m.op == "load_device" for m in residency.moves)
        cache.prefetch(sched.upcoming_adapters(prefetch))
        now += STEP_COST + TOKEN_COST * plan.num_tokens + LOAD_COST * loads
        res.tokens += plan.num_tokens
        for r in sched.complete(plan, now):
            res.finished += 1
            res.served[r.adapter] = res.served.get(r.adapter, 0) + 1
        res.steps += 1
        assert res.steps < max_steps, "simulation did not finish"
    res.end = now
    res.device_loads = cache.stats.device_loads
    return res


def workload(**kw) -> Workload:
    base = dict(
        num_adapters=40,
        rate=20.0,
        duration=30.0,
        alpha=0.1,
        cv=1.0,
        input_len=(4, 64),
        output_len=(4, 32),
        ranks={8: 1, 16: 1, 32: 1},
        kinds={"lora": 1, "parallel": 1},
        seed=7,
    )
    base.update(kw)
    return WorkloadSpec(**base).generate()


def test_every_request_finishes_and_all_tokens_are_processed():
    w = workload()
    r = run(w, max_slots=4, max_served=16)
    assert r.finished == len(w.requests)
    # every prompt token is prefilled once; every output token but the first is one decode
    assert r.tokens == sum(q.prompt_len + q.output_len - 1 for q in w.requests)
    assert set(r.served) == {q.adapter for q in w.requests}


def worst_drain(w: Workload, token_budget: int = 256) -> float:
    """Time for the running batch to finish: its longest output, at the slowest step."""
    return w.spec.output_len[1] * (STEP_COST + TOKEN_COST * token_budget + LOAD_COST)


def test_guard_bounds_waits_where_fcfs_with_skipping_starves():
    """Extreme skew (alpha = 0.02) and one slot: the hot adapter is almost always running, so a
    cold request skipped for it waits until the hot stream happens to pause. With the guard a
    wait is bounded by the guard plus the time to drain the running batch."""
    w = workload(num_adapters=10, rate=2.0, duration=60.0, alpha=0.02, output_len=(32, 128))
    hot = w.spec.adapter_names()[0]
    assert sum(q.adapter == hot for q in w.requests) > 0.9 * len(w.requests)
    guard = 2.0
    guarded = run(w, max_slots=1, max_served=8, starvation_after=guard)
    unguarded = run(w, max_slots=1, max_served=8, starvation_after=1e9)
    assert guarded.finished == unguarded.finished == len(w.requests)
    assert max(guarded.waits.values()) <= guard + worst_drain(w)
    assert max(unguarded.waits.values()) > 3 * max(guarded.waits.values())


def test_no_starvation_at_alpha_0_1():
    """Skewed traffic over 40 adapters, two slots, below capacity: every request is admitted
    within the guard plus a few drains (several cold requests may starve at once and take
    their drains in turn), and the engine keeps up with the offered load."""
    w = workload(num_adapters=40, rate=8.0, duration=60.0, alpha=0.1, output_len=(16, 64))
    guard = 1.0
    r = run(w, max_slots=2, max_served=8, starvation_after=guard)
    assert r.finished == len(w.requests)
    assert max(r.waits.values()) <= guard + 3 * worst_drain(w)
    assert r.end < w.spec.duration + 2 * worst_drain(w)


@pytest.mark.parametrize("alpha", [1.0, 0.1])
def test_every_adapter_keeps_being_served(alpha):
    w = workload(alpha=alpha)
    r = run(w, max_slots=2, max_served=8, starvation_after=1.0)
    asked = {}
    for q in w.requests:
        asked[q.adapter] = asked.get(q.adapter, 0) + 1
    assert r.served == asked


def test_throughput_grows_with_slots_then_saturates():
    """Overloaded uniform traffic over 64 adapters: more slots, bigger batches, fewer steps.

    From 8 slots on the batch is bound by max_running (32) instead of slots: more slots stop
    helping (what is left is the load churn, which the cost model charges per load)."""
    w = workload(num_adapters=64, rate=200.0, duration=5.0, alpha=1.0, max_requests=600)
    thr = {
        k: run(w, max_slots=k, max_served=64, starvation_after=1e9).throughput
        for k in (1, 2, 4, 8, 16, 32, 64)
    }
    for a, b in ((1, 2), (2, 4), (4, 8)):
        assert thr[b] > 1.2 * thr[a], thr
    assert thr[8] > 3 * thr[1], thr
    for k in (16, 32, 64):
        assert abs(thr[k] / thr[8] - 1) < 0.2, thr


def test_more_host_memory_means_fewer_disk_loads():
    w = workload(num_adapters=40, alpha=0.3)
    few = AdapterCache({a.name: 1 for a in w.adapters}, max_served=2, max_slots=2)
    many = AdapterCache({a.name: 1 for a in w.adapters}, max_served=40, max_slots=2)
    for c in (few, many):
        for q in w.requests:
            c.ensure_resident([q.adapter])
    assert many.stats.host_loads == len({q.adapter for q in w.requests})
    assert few.stats.host_loads > 3 * many.stats.host_loads


def test_simulation_is_deterministic():
    w = workload(duration=10.0)
    a, b = run(w, max_slots=2, max_served=8), run(w, max_slots=2, max_served=8)
    assert (a.end, a.tokens, a.waits, a.device_loads) == (b.end, b.tokens, b.waits, b.device_loads)


@pytest.mark.parametrize("seed", range(6))
def test_invariants_hold_under_random_traffic_cancellations_and_byte_budgets(seed):
    """Fuzz: mixed sizes against a device byte budget, base-model requests, cancellations."""
    rng = random.Random(seed)
    w = workload(
        num_adapters=rng.choice([5, 30]), rate=30.0, duration=4.0, alpha=rng.choice([1.0, 0.1]), seed=seed
    )
    sizes = {a.name: 1000 * a.rank for a in w.adapters}  # 8k / 16k / 32k
    slots = rng.choice([1, 2, 4])
    cache = AdapterCache(sizes, max_served=8, max_slots=slots, device_bytes=max(32_000, slots * 20_000))
    cfg = SchedulerConfig(
        token_budget=64, kv_tokens=600, kv_block=8, max_running=8, queue_bound=10_000, starvation_after=0.5
    )
    sched = Scheduler(cfg, cache)
    pending = deque(w.requests)
    now, finished, cancelled = 0.0, 0, 0
    while pending or sched.has_work():
        while pending and pending[0].arrival <= now:
            q = pending.popleft()
            adapter = None if q.id % 5 == 0 else q.adapter
            sched.add(Request(str(q.id), adapter, q.prompt_len, q.output_len, q.arrival))
        if not sched.has_work():
            now = pending[0].arrival
            continue
        plan = sched.schedule(now)
        running = sched.running
        users = {r.adapter for r in running if r.adapter is not None}
        assert not plan.empty
        assert plan.num_tokens <= cfg.token_budget and len(running) <= cfg.max_running
        assert sched.kv_used == sum(-(-r.kv_need // 8) * 8 for r in running) <= cfg.kv_tokens
        assert set(plan.adapters) <= users and len(users) <= slots
        assert sum(sizes[a] for a in users) <= cache.device_bytes
        assert all(cache.pinned(a) == (a in users) for a in sizes)
        assert cache.ensure_resident(plan.adapters).ok
        cache.prefetch(sched.upcoming_adapters(3))
        if rng.random() < 0.05:
            victim = rng.choice(running + sched.waiting)
            assert sched.cancel(victim.id, now)
            cancelled += 1
        now += STEP_COST + TOKEN_COST * plan.num_tokens
        finished += len(sched.complete(plan, now))
    assert finished + cancelled == len(w.requests)
    assert not any(cache.pinned(a) for a in sizes) and sched.kv_used == 0
