"""Scheduler: token budget, KV capacity, adapter slots, FCFS, starvation guard, cancel, chunked prefill."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import paradapt.serve as serve
from paradapt.errors import AdapterNotFoundError, ConfigError
from paradapt.serve.cache import AdapterCache
from paradapt.serve.scheduler import (
    QueueFullError,
    Request,
    RequestState,
    RequestTooLargeError,
    Scheduler,
    SchedulerConfig,
)


def make(slots=2, served=None, n_adapters=6, **cfg) -> Scheduler:
    cache = AdapterCache(
        {f"a{i}": 10 for i in range(n_adapters)}, max_served=served or max(slots, 4), max_slots=slots
    )
    base = dict(token_budget=64, kv_tokens=1000, max_running=8, queue_bound=100, starvation_after=1e9)
    base.update(cfg)
    return Scheduler(SchedulerConfig(**base), cache)


def req(rid, adapter="a0", prompt=8, new=4, t=0.0) -> Request:
    return Request(str(rid), adapter, prompt, new, t)


def step(s: Scheduler, now: float = 0.0, stopped=()):
    """Plan, make the adapters resident (as the engine does), complete."""
    plan = s.schedule(now)
    assert s.cache.ensure_resident(plan.adapters).ok
    return plan, s.complete(plan, now, stopped)


def test_token_budget_is_respected_and_prompts_are_chunked():
    s = make(token_budget=16)
    for i in range(4):
        s.add(req(i, prompt=10))
    plan = s.schedule(0.0)
    assert plan.num_tokens == 16
    assert [(c.request_id, c.start, c.length, c.last) for c in plan.prefills] == [
        ("0", 0, 10, True),
        ("1", 0, 6, False),
    ]


def test_long_prompt_prefills_over_several_steps_then_decodes():
    s = make(token_budget=16)
    s.add(req("long", prompt=40, new=3))
    chunks = []
    for _ in range(3):
        plan, _ = step(s)
        chunks.append([(c.start, c.length, c.last) for c in plan.prefills])
    assert chunks == [[(0, 16, False)], [(16, 16, False)], [(32, 8, True)]]
    r = s.get("long")
    assert r.prefilled == 40 and r.generated == 1  # the last chunk samples the first token
    plan, done = step(s)
    assert plan.decodes == ("long",) and not plan.prefills and not done
    plan, done = step(s)
    assert [d.id for d in done] == ["long"] and done[0].state is RequestState.FINISHED
    assert not s.has_work() and s.kv_used == 0


def test_without_chunked_prefill_prompts_run_whole_in_fcfs_order():
    s = make(token_budget=16, chunked_prefill=False)
    s.add(req("a", prompt=10, new=1, t=0.0))
    s.add(req("b", prompt=10, new=1, t=1.0))  # 6 tokens left: waits, and 'c' does not overtake it
    s.add(req("c", prompt=2, new=1, t=2.0))
    plan, _ = step(s)
    assert [(c.request_id, c.length, c.last) for c in plan.prefills] == [("a", 10, True)]
    plan, _ = step(s)
    assert [(c.request_id, c.length) for c in plan.prefills] == [("b", 10), ("c", 2)]
    with pytest.raises(RequestTooLargeError, match="chunked prefill is off") as e:
        s.add(req("big", prompt=17))
    assert e.value.field == "prompt"


def test_decodes_come_first_and_prompt_chunks_use_the_rest():
    s = make(token_budget=8)
    s.add(req("a", prompt=4, new=5))
    step(s)  # a prefilled, now decoding
    s.add(req("b", prompt=20))
    plan = s.schedule(0.0)
    assert plan.decodes == ("a",)
    assert [(c.request_id, c.length) for c in plan.prefills] == [("b", 7)]
    assert plan.num_tokens == 8


def test_kv_capacity_is_respected_with_worst_case_reservation():
    s = make(kv_tokens=30)
    s.add(req("a", prompt=10, new=10))  # 20
    s.add(req("b", prompt=10, new=10))  # 20: would make 40 > 30
    plan = s.schedule(0.0)
    assert plan.admitted == ("a",) and s.kv_used == 20
    s.cache.ensure_resident(plan.adapters)
    s.complete(plan, 0.0)
    for _ in range(20):
        plan, _ = step(s)
        assert s.kv_used <= 30
        if "b" in plan.admitted:
            break
    assert "b" in plan.admitted and s.get("a") is None  # b started once a finished


def test_kv_reservations_round_up_to_whole_blocks():
    s = make(kv_tokens=64, kv_block=16)
    s.add(req("a", prompt=10, new=10))  # 20 tokens -> 2 blocks = 32
    s.add(req("b", prompt=3, new=2))  # 5 -> 16
    s.add(req("c", prompt=3, new=2))  # 5 -> 16: 64 in all
    s.add(req("d", prompt=1, new=1))  # no block left
    assert s.schedule(0.0).admitted == ("a", "b", "c") and s.kv_used == 64
    with pytest.raises(RequestTooLargeError, match="80 in blocks of 16"):
        s.add(req("e", prompt=60, new=10))


def test_kv_head_of_line_blocks_later_small_requests():
    s = make(kv_tokens=30)
    s.add(req("a", prompt=10, new=10))
    s.add(req("big", prompt=15, new=10))
    s.add(req("small", prompt=2, new=2))
    plan = s.schedule(0.0)
    assert plan.admitted == ("a",)  # 'small' would fit but must not overtake 'big'


def test_request_waiting_for_a_slot_does_not_block_others_on_kv():
    s = make(slots=1, kv_tokens=40)
    s.add(req("hot", adapter="a0", prompt=10, new=10, t=0.0))
    s.add(req("cold", adapter="a1", prompt=10, new=15, t=1.0))  # no slot; would not fit KV either
    s.add(req("hot2", adapter="a0", prompt=5, new=5, t=2.0))
    assert s.schedule(2.0).admitted == ("hot", "hot2")


def test_cancelled_waiting_request_is_never_admitted_and_order_survives():
    s = make(slots=2)
    for i, a in enumerate(["a0", "a0", "a1", "a0"]):
        s.add(req(i, adapter=a, t=float(i)))
    assert s.cancel("1")
    assert [r.id for r in s.waiting] == ["0", "2", "3"]
    assert s.schedule(5.0).admitted == ("0", "2", "3")
    assert s.get("1") is None


def test_distinct_adapters_per_step_bounded_by_slots_and_same_adapter_keeps_flowing():
    s = make(slots=2)
    for i, a in enumerate(["a0", "a1", "a2", "a0", "a1", "a3"]):
        s.add(req(i, adapter=a, t=float(i)))
    plan = s.schedule(0.0)
    assert plan.admitted == ("0", "1", "3", "4")  # a2 and a3 skipped: no third slot
    assert set(plan.adapters) == {"a0", "a1"} and len(plan.adapters) <= 2
    assert [r.id for r in s.waiting] == ["2", "5"]


def test_base_model_requests_need_no_slot():
    s = make(slots=1)
    s.add(req("x", adapter="a0"))
    s.add(req("y", adapter="a1"))
    s.add(req("base", adapter=None))
    plan = s.schedule(0.0)
    assert plan.admitted == ("x", "base") and plan.adapters == ("a0",)


def test_fcfs_order_by_arrival_even_if_added_out_of_order():
    s = make(max_running=2, kv_tokens=1000)
    s.add(req("late", t=5.0))
    s.add(req("early", t=1.0))
    s.add(req("mid", t=3.0))
    assert [r.id for r in s.waiting] == ["early", "mid", "late"]
    assert s.schedule(10.0).admitted == ("early", "mid")


def test_max_running_bounds_the_batch():
    s = make(max_running=3)
    for i in range(5):
        s.add(req(i))
    assert len(s.schedule(0.0).admitted) == 3 and len(s.running) == 3


def test_starved_request_goes_first_and_drains_the_batch_until_it_fits():
    s = make(slots=1, starvation_after=10.0, max_running=4)
    s.add(req("hot1", adapter="a0", new=5, t=0.0))
    step(s, now=0.0)
    s.add(req("cold", adapter="a1", new=1, t=1.0))
    s.add(req("hot2", adapter="a0", new=1, t=2.0))
    plan, _ = step(s, now=2.0)  # not starved yet: hot2 shares the slot, cold skipped
    assert plan.admitted == ("hot2",)
    s.add(req("hot3", adapter="a0", new=1, t=11.0))
    plan = s.schedule(11.5)  # cold waited 10.5 s: starved and blocked, so hot3 must not be admitted
    assert plan.admitted == ()
    s.cache.ensure_resident(plan.adapters)
    s.complete(plan, 11.5)
    admitted = []
    for k in range(10):
        plan, _ = step(s, now=12.0 + k)
        admitted += plan.admitted
        if "cold" in admitted:
            break
    assert admitted[0] == "cold"  # ahead of hot3, which arrived later but shares the free slot
    assert s.cache.tier("a1") == "device"


def test_drain_stops_only_the_adapter_that_frees_soonest():
    s = make(slots=2, starvation_after=5.0, max_running=8)
    s.add(req("long", adapter="a0", new=50, t=0.0))
    s.add(req("short", adapter="a1", new=3, t=0.0))
    step(s, now=0.0)
    s.add(req("cold", adapter="a2", new=1, t=0.5))
    s.add(req("more0", adapter="a0", new=1, t=6.0))
    s.add(req("more1", adapter="a1", new=1, t=6.0))
    plan, _ = step(s, now=6.0)  # cold is starved, no slot: a1 (done soonest) drains, a0 flows
    assert plan.admitted == ("more0",)
    admitted = []
    for k in range(5):
        plan, _ = step(s, now=7.0 + k)
        admitted += plan.admitted
    assert admitted[0] == "cold" and "more1" in admitted
    assert s.get("long").state is RequestState.RUNNING  # a0 was never interrupted


def test_starved_request_is_admitted_ahead_of_older_fcfs_order():
    s = make(slots=2, starvation_after=5.0, max_running=1)
    s.add(req("r1", adapter="a0", t=0.0))
    s.add(req("r2", adapter="a1", t=0.0))
    s.add(req("r3", adapter="a2", t=0.0))
    # with starvation_after=5, at t=6 all three are starved: oldest first (stable by arrival)
    assert s.schedule(6.0).admitted == ("r1",)
    s2 = make(slots=2, starvation_after=5.0, max_running=1)
    s2.add(req("young", adapter="a0", t=4.0))
    s2.add(req("old", adapter="a1", t=0.0))
    assert s2.schedule(6.0).admitted == ("old",)


def test_cancel_running_request_frees_kv_and_slot_at_once():
    s = make(slots=1, kv_tokens=30)
    s.add(req("a", adapter="a0", prompt=10, new=10))
    step(s)
    s.add(req("b", adapter="a1", prompt=10, new=10))
    assert s.schedule(0.0).admitted == ()  # neither KV nor the slot is free
    assert s.cancel("a", now=1.0)
    assert s.kv_used == 0 and not s.cache.pinned("a0")
    plan = s.schedule(1.0)
    assert plan.admitted == ("b",)
    assert s.cache.ensure_resident(plan.adapters).ok


def test_cancel_waiting_and_unknown():
    s = make()
    s.add(req("w"))
    assert s.cancel("w") and not s.waiting
    assert not s.cancel("w") and not s.cancel("nope")


def test_request_cancelled_mid_step_is_skipped_on_complete():
    s = make()
    s.add(req("a", new=1))
    plan = s.schedule(0.0)
    s.cancel("a")
    assert s.complete(plan, 0.0) == [] and s.kv_used == 0


def test_runner_stops_free_capacity():
    s = make()
    s.add(req("a", new=50))
    step(s)
    plan, done = step(s, stopped=["a"])
    assert [d.id for d in done] == ["a"] and s.kv_used == 0 and not s.cache.pinned("a0")


def test_queue_bound_rejects():
    s = make(queue_bound=2)
    s.add(req(1))
    s.add(req(2))
    with pytest.raises(QueueFullError, match="2 waiting"):
        s.add(req(3))


def test_requests_that_can_never_run_are_refused_at_add():
    s = make(kv_tokens=100)
    with pytest.raises(RequestTooLargeError) as e:
        s.add(req("x", prompt=90, new=20))
    assert e.value.field == "max_tokens"
    with pytest.raises(AdapterNotFoundError, match="ghost"):
        s.add(req("y", adapter="ghost"))
    cache = AdapterCache({"huge": 500}, max_served=1, max_slots=1, device_bytes=100)
    s2 = Scheduler(SchedulerConfig(token_budget=8, max_running=4), cache)
    with pytest.raises(RequestTooLargeError, match="huge"):
        s2.add(req("z", adapter="huge"))
    s.add(req("ok"))
    with pytest.raises(ConfigError, match="already in use"):
        s.add(req("ok"))


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(token_budget=0), "token_budget"),
        (dict(token_budget=4, max_running=8), "max_running"),
        (dict(starvation_after=-1), "starvation_after"),
        (dict(queue_bound=1.5), "queue_bound"),
    ],
)
def test_bad_config_names_its_field(kw, field):
    with pytest.raises(ConfigError) as e:
        SchedulerConfig(**kw)
    assert e.value.field == field


def test_bad_request_names_its_field():
    with pytest.raises(ConfigError) as e:
        Request("r", "a0", 0, 4, 0.0)
    assert e.value.field == "prompt_len"


def test_upcoming_adapters_in_fcfs_order():
    s = make()
    for i, a in enumerate(["a3", None, "a1", "a3", "a2"]):
        s.add(req(i, adapter=a, t=float(i)))
    assert s.upcoming_adapters(2) == ["a3", "a1"]


def test_policy_modules_import_no_torch():
    """The twin imports these modules: they must stay pure Python (stdlib + paradapt.errors/checks)."""
    root = Path(serve.__file__).parent
    for name in ("workload.py", "cache.py", "scheduler.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [("." * node.level) + (node.module or "")]
            else:
                continue
            for m in mods:
                assert m.split(".")[0] not in {"torch", "numpy", "transformers"}, f"{name} imports {m}"
                assert not m.startswith("..") or m in {"..errors", "..checks"}, f"{name} imports {m}"
