"""One driver that replays a :class:`~paradapt.serve.workload.Workload` against an engine.

:func:`replay` is used both by the twin (a :class:`~paradapt.twin.sim.SimEngine`, simulated
clock) and by the real in-process run (:class:`RealBackend` around a real
:class:`~paradapt.serve.engine.Engine`, wall clock, no HTTP), so both compute their metrics
from the same events in the same way (:func:`paradapt.twin.metrics.summarize`).

The loop: queue every request whose arrival time has come, run one engine step if there is
work, otherwise wait (sleep, or jump the simulated clock) to the next arrival. Requests that
arrive while a step runs are queued when it ends, in both worlds. The run stops at the
window's end (``workload.duration``) plus ``drain`` seconds.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..serve.cache import CacheStats
from ..serve.scheduler import ScheduledStep
from ..serve.workload import Workload, WorkloadRequest, leading_ids


class Backend(Protocol):
    """What :func:`replay` needs of an engine (simulated or real)."""

    def now(self) -> float: ...
    def wait_until(self, t: float) -> None: ...
    def submit(self, req: WorkloadRequest) -> str: ...
    def step(self) -> ScheduledStep | None: ...
    def has_work(self) -> bool: ...
    def first_token_at(self, rid: str) -> float | None: ...
    def finished_at(self, rid: str) -> float | None: ...
    def cache_stats(self) -> CacheStats: ...


@dataclass(frozen=True)
class StepEvent:
    """A step that ran: when it ended, per request id the prompt tokens done by its end (those
    the prefix cache served included: the server counts them as served, and so do the metrics)
    and the output tokens it sampled."""

    end: float
    prompt: tuple[tuple[str, int], ...]
    sampled: tuple[str, ...]


@dataclass
class ReplayLog:
    """Everything a replay saw; :func:`~paradapt.twin.metrics.summarize` turns it into metrics."""

    workload: Workload
    window: float
    stop: float
    requests: dict[str, WorkloadRequest] = field(default_factory=dict)
    first: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)
    steps: list[StepEvent] = field(default_factory=list)
    stats: CacheStats = field(default_factory=CacheStats)
    wall_seconds: float = 0.0
    end: float = 0.0


def replay(workload: Workload, backend: Backend, *, drain: float = 0.0) -> ReplayLog:
    """Drive ``backend`` with ``workload``'s requests at their arrival times; returns the log."""
    reqs = workload.requests
    window = workload.duration
    log = ReplayLog(workload, window, window + drain)
    t_wall = time.perf_counter()
    i = 0
    while True:
        now = backend.now()
        while i < len(reqs) and reqs[i].arrival <= now:
            log.requests[backend.submit(reqs[i])] = reqs[i]
            i += 1
        if now >= log.stop:
            break
        if backend.has_work():
            step = backend.step()
            if step is not None and not step.empty:
                log.steps.append(step_event(backend.now(), step))
                continue
        if i < len(reqs):
            backend.wait_until(min(reqs[i].arrival, log.stop))
        elif not backend.has_work():
            break
        else:  # work that cannot run and no arrival to wait for: nothing will change
            break
    collect(log, backend)
    log.wall_seconds = time.perf_counter() - t_wall
    return log


def collect(log: ReplayLog, backend: Backend) -> None:
    """Copy into ``log`` what ``backend`` knows at the end of a run: its clock, each logged
    request's first-token and finish times, its cache stats (the cluster twin calls it per replica)."""
    log.end = backend.now()
    for rid in log.requests:
        t = backend.first_token_at(rid)
        if t is not None:
            log.first[rid] = t
        t = backend.finished_at(rid)
        if t is not None:
            log.finished[rid] = t
    log.stats = backend.cache_stats()


def step_event(end: float, step: ScheduledStep) -> StepEvent:
    """The :class:`StepEvent` of ``step``, which ended at ``end`` (what the metrics read)."""
    prompt = tuple((c.request_id, c.start + c.length) for c in step.prefills)
    sampled = (*(c.request_id for c in step.prefills if c.last), *step.decodes)
    return StepEvent(end, prompt, sampled)


# -- the real engine ------------------------------------------------------------------------------


class RealBackend:
    """A real :class:`~paradapt.serve.engine.Engine` on the wall clock, in process (no HTTP).

    The engine must have been built with ``clock=backend.clock`` (see :meth:`make_clock`), so
    its arrival, first-token and finish times are on the replay's time axis. Prompts are random
    token ids (seeded); every request generates exactly its output length (``ignore_eos``).
    """

    def __init__(self, engine, clock: Callable[[], float], *, vocab: int, seed: int = 0):
        from ..serve.sampling import SamplingParams

        self.engine = engine
        self.clock = clock
        self._params = SamplingParams
        self._rng = random.Random(seed)
        self._seed = seed
        self._ids = range(3, vocab)

    @staticmethod
    def make_clock() -> Callable[[], float]:
        """Seconds since the clock was made (``time.perf_counter`` based)."""
        t0 = time.perf_counter()
        return lambda: time.perf_counter() - t0

    def now(self) -> float:
        return self.clock()

    def wait_until(self, t: float) -> None:
        delay = t - self.clock()
        if delay > 0:
            time.sleep(delay)

    def submit(self, req: WorkloadRequest) -> str:
        prompt = list(req.prompt) if req.prompt else self._prompt(req)
        params = self._params(max_new_tokens=req.output_len, ignore_eos=True)
        return self.engine.add_request(prompt, req.adapter, params, request_id=f"w{req.id}").id

    def _prompt(self, req: WorkloadRequest) -> list[int]:
        """Random ids after those it shares (:func:`~paradapt.serve.workload.leading_ids`)."""
        shared = leading_ids(req, self._seed, self._ids)
        return shared + self._rng.choices(self._ids, k=req.prompt_len - len(shared))

    def step(self) -> ScheduledStep | None:
        self.engine.step()
        return self.engine.last_step

    def has_work(self) -> bool:
        return self.engine.has_work()

    def first_token_at(self, rid: str) -> float | None:
        return self.engine.handles[rid].first_token_at

    def finished_at(self, rid: str) -> float | None:
        return self.engine.handles[rid].finished_at

    def cache_stats(self) -> CacheStats:
        return self.engine.cache.stats
