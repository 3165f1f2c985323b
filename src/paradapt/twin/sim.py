"""The digital twin: the engine's own planning core on a simulated clock, priced by a cost model.

:class:`SimEngine` is a :class:`~paradapt.serve.core.ServeCore` (the real engine's scheduler,
adapter cache, residency, prefetch and failure code) whose adapter moves and steps do no work
but advance a simulated clock by the :class:`~paradapt.twin.costmodel.CostModel`'s times. It
is the same decision code as :class:`~paradapt.serve.engine.Engine`; only the executor is
replaced. :func:`simulate` replays a workload through it with the same driver the real
in-process run uses (:func:`paradapt.twin.replay.replay`) and returns the metrics.

What it models:

* queueing, continuous batching with chunked prefill under the token budget, worst-case KV
  reservation in pages, the slot and host limits with LRU/pinning/prefetch, the starvation
  guard (all the engine's own code);
* adapter load/evict times, and each step's time as a function of its shape;
* ``EngineConfig.device_memory`` (slots carved out of the KV pages);
* the prefix cache (``EngineConfig.prefix_caching``, on by default as in the engine): requests
  whose prompts start alike (a trace's token ids, a workload's ``shared_prefix``) skip the
  cached pages' prefill (:mod:`paradapt.twin.prefix_cache`);
* the HTTP server, when the cost model has a ``server`` section (``paradapt profile --server``;
  ``server=False`` ignores it): each step costs ``step + token x tokens emitted`` more, and each
  request's first token and finish come ``request`` seconds later (a latency, not engine time).

Behind Ray Serve (:func:`paradapt.twin.cluster.simulate_cluster`): ``ray`` (the cost model's
``ray`` section) adds its per-token time to every step, and ``scale`` stretches every step and
move (replicas slowed by sharing a machine's cores).

What it does not: EOS (every request generates its full output length, as the benchmark's
``ignore_eos`` requests do), failing adapter folders, when in its latency a request reaches
the engine (the server's ``request`` is added at the end, so it never changes which step a
request joins), and other processes on the machine.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from ..errors import ConfigError
from ..serve.cache import CacheStats, Move
from ..serve.core import EngineConfig, ServeCore, memory_split, scheduler_config, step_shape
from ..serve.scheduler import Request, ScheduledStep
from ..serve.workload import Workload, WorkloadRequest, WorkloadSpec
from .costmodel import CostModel, RayCost
from .metrics import TwinResult, summarize
from .prefix_cache import PrefixCacheModel, page_keys
from .replay import replay

#: Engine knobs ``simulate`` accepts besides max_served/max_slots: EngineConfig's other fields.
ENGINE_KNOBS = tuple(f.name for f in fields(EngineConfig) if f.name not in ("max_served", "max_slots"))


class SimEngine(ServeCore):
    """A :class:`ServeCore` on a simulated clock; ``step`` advances it by the cost model.

    ``server``: price the HTTP server with the cost model's ``server`` section, if it has one;
    ``ray``: also price a Ray Serve replica (:class:`~paradapt.twin.costmodel.RayCost`);
    ``scale``: every step and move takes this many times its modelled time (shared cores).
    """

    def __init__(
        self,
        workload: Workload,
        cost: CostModel,
        config: EngineConfig,
        *,
        server: bool = True,
        ray: RayCost | None = None,
        scale: float = 1.0,
    ):
        self.t = 0.0
        self.cost = cost
        self.server = cost.server if server else None
        self.ray = ray
        self.scale = scale
        self.info = {a.name: (a.kind, a.rank) for a in workload.adapters}
        self.sizes = {a.name: cost.adapter_bytes(a.kind, a.rank) for a in workload.adapters}
        split = memory_split(config, cost.kv_bytes_per_token, max(self.sizes.values(), default=0))
        sched = scheduler_config(config, split.num_blocks)
        super().__init__(config, sched, self._clock, self._load, device_bytes=split.device_bytes)
        self.first: dict[str, float] = {}
        self.end: dict[str, float] = {}
        self._loads = 0
        self.busy = 0.0  # simulated seconds spent in steps and moves
        self.prefix: PrefixCacheModel | None = None
        self._shares: dict[str, WorkloadRequest] = {}  # queued request -> what its prompt shares
        self.cached_done = 0  # prompt tokens found cached by the requests that finished
        if config.prefix_caching and not config.check_adapter_weights:  # the engine's rule (Engine._salt)
            self.prefix = PrefixCacheModel(config.page_size, split.num_blocks)
            self.scheduler.on_admit = self._admitted

    def preload(self, adapters: Sequence[str]) -> None:
        """Hold ``adapters`` (hottest first) before the window opens, as a replica that has been
        serving them would: the first ``max_slots`` on the device, the first ``max_served`` in
        host memory, the hottest most recently used. Free on the clock and not counted as
        loads (the window measures the steady state, not the warm-up)."""
        served = list(dict.fromkeys(adapters))[: self.cache.max_served]
        for name in served:
            if name not in self.sizes:
                raise ConfigError("placement", f"adapter {name!r} is not in the workload")
            if name not in self.cache:
                self.cache.add_adapter(name, self.sizes[name])
        self.cache.prefetch(reversed(served))  # coldest first: the hottest end up most recently used
        self.cache.ensure_resident(list(reversed(served[: self.cache.max_slots])))
        self.t = 0.0
        self.busy = 0.0
        self.cache.stats = CacheStats()

    def _clock(self) -> float:
        return self.t

    def _load(self, move: Move) -> None:
        dt = self.cost.move_time(move.op, move.size) * self.scale
        self.t += dt
        self.busy += dt
        self._loads += move.op == "load_device"

    def add(
        self,
        rid: str,
        adapter: str | None,
        prompt_len: int,
        max_new_tokens: int,
        *,
        share: WorkloadRequest | None = None,
    ) -> str:
        """Queue a request as ``Engine.add_request`` does (register the adapter, then the scheduler);
        ``share``: its workload request, whose prompt, ``shared_prefix`` or ``prefix_hashes`` say
        what its prompt shares (the prefix cache's keys, made when it is admitted)."""
        if adapter is not None and adapter not in self.cache:
            self.cache.add_adapter(adapter, self.sizes[adapter])
        self.t += self.cost.submit
        self.scheduler.add(Request(rid, adapter, prompt_len, max_new_tokens, self.t))
        if self.prefix is not None and share is not None:
            self._shares[rid] = share
        return rid

    def _admitted(self, r: Request) -> int:
        """The scheduler's ``on_admit``: the prompt tokens ``r`` finds in the prefix cache."""
        w = self._shares.pop(r.id, None)
        keys = page_keys(
            r.id,
            r.adapter,
            r.prompt_len,
            self.prefix.page,
            prompt=None if w is None else w.prompt,
            shared=0 if w is None else w.shared_prefix,
            hashes=None if w is None else w.prefix_hashes,
        )
        return self.prefix.admit(r.id, keys, r.prompt_len)

    def _forget(self, request_id: str) -> None:
        """A request failed or was cancelled: its pages go back as the engine's do."""
        self._shares.pop(request_id, None)
        if self.prefix is not None:
            self.prefix.release(request_id)

    def _cache_after(self, step: ScheduledStep, ended: list[Request]) -> None:
        """After a step: its prompt pages join the prefix cache, ended requests let theirs go, and
        the free cached pages shrink to what the running requests' pages leave."""
        for c in step.prefills:
            self.prefix.written(c.request_id, c.start + c.length)
        for r in ended:
            self.cached_done += self.prefix.release(r.id)
        running = self.scheduler.running
        # a request's KV holds its last sampled token only after the next step has written it
        own = sum(self.prefix.private_pages(r.id, r.prefilled + max(r.generated - 1, 0)) for r in running)
        self.prefix.evict(own + len(self.prefix.refs))

    def step(self) -> ScheduledStep:
        """Schedule with the engine's code, then charge the step's modelled time."""
        self._loads = 0
        self.t += self.cost.loop
        step, now = self._schedule()
        if step.empty:
            return step
        shape = step_shape(self.scheduler, step, self._loads, len(self.cache.on_device))
        dt = self.cost.step_time(shape, self.info)
        if self.server is not None:
            dt += self.server.step_time(shape.samplers)  # every sampled token is streamed
        if self.ray is not None:
            dt += self.ray.token * shape.samplers
        dt *= self.scale
        self.t += dt
        self.busy += dt
        seen = self.t + (self.server.request if self.server is not None else 0.0)  # what the client sees
        for c in step.prefills:
            if c.last:
                self.first.setdefault(c.request_id, seen)
        ended = self.scheduler.complete(step, now)
        for r in ended:
            self.end[r.id] = seen
        if self.prefix is not None:
            self._cache_after(step, ended)
        return step


class SimBackend:
    """:class:`~paradapt.twin.replay.Backend` over a :class:`SimEngine`: waiting jumps the clock."""

    def __init__(self, engine: SimEngine):
        self.engine = engine

    def now(self) -> float:
        return self.engine.t

    def wait_until(self, t: float) -> None:
        self.engine.t = max(self.engine.t, t)

    def submit(self, req: WorkloadRequest) -> str:
        return self.engine.add(
            f"w{req.id}",
            req.adapter,
            req.prompt_len,
            req.output_len,
            share=req,
        )

    def step(self) -> ScheduledStep:
        return self.engine.step()

    def has_work(self) -> bool:
        return self.engine.has_work()

    def first_token_at(self, rid: str) -> float | None:
        return self.engine.first.get(rid)

    def finished_at(self, rid: str) -> float | None:
        return self.engine.end.get(rid)

    def cache_stats(self) -> CacheStats:
        return self.engine.cache.stats


def engine_config(max_served: int, max_slots: int, **knobs: Any) -> EngineConfig:
    """The :class:`EngineConfig` of a twin run; an unknown knob is an error naming it."""
    unknown = sorted(set(knobs) - set(ENGINE_KNOBS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown engine knob; known: {list(ENGINE_KNOBS)}")
    return EngineConfig(max_served=max_served, max_slots=max_slots, **knobs)


def simulate(
    spec: WorkloadSpec | Workload,
    cost: CostModel,
    *,
    max_served: int,
    max_slots: int,
    drain: float = 0.0,
    slo_ttft: float | None = None,
    slo_tpot: float | None = None,
    server: bool = True,
    **engine_knobs: Any,
) -> TwinResult:
    """Run ``spec``'s workload through the twin with ``max_served`` host and ``max_slots`` device
    adapters (other :class:`EngineConfig` knobs as keywords); returns its metrics.

    ``slo_ttft``/``slo_tpot`` (seconds) define goodput. ``server=False`` predicts the in-process
    engine even when the cost model prices the HTTP server (``CostModel.server``). ``queue_bound`` defaults to the workload's request count (nothing is rejected), as in the
    real replay of the accuracy benchmark.
    """
    t0 = time.perf_counter()
    workload = spec if isinstance(spec, Workload) else spec.generate()
    engine_knobs.setdefault("queue_bound", max(1, len(workload.requests)))
    engine = SimEngine(workload, cost, engine_config(max_served, max_slots, **engine_knobs), server=server)
    log = replay(workload, SimBackend(engine), drain=drain)
    result = summarize(log, slo_ttft, slo_tpot)
    result.sim_seconds = time.perf_counter() - t0
    result.extra["busy_seconds"] = engine.busy
    if engine.prefix is not None:  # what paradapt bench reports: the finished requests' usage
        result.extra["cached_input_tokens"] = engine.cached_done
    return result
