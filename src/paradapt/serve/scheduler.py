"""Iteration-level (continuous batching) scheduler: which requests run in the next step.

Each :meth:`Scheduler.schedule` builds one step under four limits:

* ``token_budget``: prompt-chunk tokens plus one token per decode (chunked prefill);
* ``kv_tokens``: KV capacity. A request is admitted only if ``prompt_len + max_new_tokens``
  fits next to what running requests reserved: S-LoRA/LightLLM-style worst-case reservation,
  not vLLM's grow-and-preempt. No preemption or recomputation is ever needed and the decision
  depends on counts only, so the twin replays it exactly; the price is capacity held by
  requests that stop early, freed the moment they finish. The oldest admissible request that
  does not fit stops admission (later, smaller ones do not overtake it forever);
* ``max_running`` requests at once, and at most ``cache.max_slots`` distinct adapters (and
  the cache's byte budget) across the running requests, so one step's adapters always fit;
* ``queue_bound`` waiting requests: :meth:`add` raises :class:`QueueFullError` past it (429).

Order: running requests first (every decode, then prompt chunks of requests still in prefill,
oldest first), then waiting requests FCFS by arrival. A waiting request whose adapter finds no
slot is skipped, so requests of adapters already in the batch keep flowing (vLLM PR #15422).
Starvation guard: skipping alone lets a popular adapter hold its slot forever (the bug SGLang
fixed with "lora draining"). So once the oldest skipped request has waited
``starvation_after`` seconds, one running adapter is drained for it: the one whose requests
finish soonest stops taking new requests, and no other new adapter is admitted, until its slot
frees; the other running adapters keep flowing. A wait is then bounded by the guard plus one
drain per starved request ahead of it.

The scheduler pins a request's adapter in the :class:`~paradapt.serve.cache.AdapterCache`
when it is admitted and unpins it when the request finishes or is cancelled.
"""

from __future__ import annotations

import bisect
import enum
import heapq
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..checks import is_int
from ..errors import AdapterNotFoundError, ConfigError, ParadaptError
from .cache import AdapterCache


class QueueFullError(ParadaptError, RuntimeError):
    """The waiting queue is at its bound (the API answers 429)."""


class RequestTooLargeError(ParadaptError, ValueError):
    """A request can never run on this engine. ``field`` names the cause."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"


@dataclass(eq=False)
class Request:
    """A generation request as the scheduler sees it: counts only.

    ``adapter`` None means the base model (needs no slot). ``prefilled`` counts prompt tokens
    already in the KV cache; ``generated`` counts output tokens sampled so far.
    """

    id: str
    adapter: str | None
    prompt_len: int
    max_new_tokens: int
    arrival: float
    state: RequestState = RequestState.WAITING
    prefilled: int = 0
    generated: int = 0
    admitted_at: float | None = None
    finished_at: float | None = None

    def __post_init__(self) -> None:
        for name in ("prompt_len", "max_new_tokens"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {v!r} (request {self.id!r})")

    @property
    def kv_need(self) -> int:
        """Tokens reserved in the KV cache while running: the worst case."""
        return self.prompt_len + self.max_new_tokens

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < self.prompt_len

    @property
    def done(self) -> bool:
        return self.state in (RequestState.FINISHED, RequestState.CANCELLED)


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens ``[start, start + length)`` of a request; ``last`` chunks sample a token."""

    request_id: str
    start: int
    length: int
    last: bool


@dataclass(frozen=True)
class ScheduledStep:
    """One step: prompt chunks, decodes, the adapters that must be on device, and who was admitted."""

    prefills: tuple[PrefillChunk, ...]
    decodes: tuple[str, ...]
    adapters: tuple[str, ...]
    admitted: tuple[str, ...]

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.prefills) + len(self.decodes)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


@dataclass(frozen=True)
class SchedulerConfig:
    """Knobs of the scheduler (``max_slots`` lives in the cache: one source of truth)."""

    token_budget: int = 2048
    kv_tokens: int = 65536
    kv_block: int = 1  # tokens per KV page: reservations round up to it (transformers' page_size)
    chunked_prefill: bool = True  # False: a prompt runs whole in one step (bidirectional encoders)
    max_running: int = 256
    queue_bound: int = 4096
    starvation_after: float = 30.0

    def __post_init__(self) -> None:
        for name in ("token_budget", "kv_tokens", "kv_block", "max_running", "queue_bound"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {v!r}")
        if self.max_running > self.token_budget:
            raise ConfigError(
                "max_running",
                f"{self.max_running} exceeds token_budget={self.token_budget}: every running decode needs a token",
            )
        v = self.starvation_after
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
            raise ConfigError("starvation_after", f"must be a number of seconds >= 0, got {v!r}")


@dataclass
class _Step:
    """Working state while one step is scheduled."""

    budget: int
    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[str] = field(default_factory=list)
    admitted: list[str] = field(default_factory=list)


@dataclass
class _Drain:
    """A starved request is waiting for ``victim``'s slot to free."""

    on: bool = False
    victim: str | None = None


class Scheduler:
    """Owns the waiting queue and the running set; decides each step from counts and sizes."""

    def __init__(self, config: SchedulerConfig, cache: AdapterCache):
        self.config = config
        self.cache = cache
        self._seq = 0
        # Waiting requests: one FCFS list (lazy deletion: admitted or cancelled entries stay until
        # compacted) and one FCFS deque per adapter (None = base), so a step costs what it admits,
        # not the queue length.
        self._fcfs: list[tuple[float, int, Request]] = []
        self._head = 0  # entries before it are all stale
        self._by_adapter: dict[str | None, deque[tuple[float, int, Request]]] = {}
        self._n_waiting = 0
        self._running: dict[str, Request] = {}  # admission order
        self._requests: dict[str, Request] = {}
        self._kv_used = 0
        self._adapter_users: dict[str, int] = {}  # adapter -> running requests using it
        # Called as each request is admitted; returns how many of its prompt tokens are already
        # in the KV cache (the engine's prefix cache), where its prefill starts. None: 0.
        self.on_admit: Callable[[Request], int] | None = None

    # -- queue ----------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue ``request``; raises if the queue is full or the request can never run."""
        if request.id in self._requests:
            raise ConfigError("id", f"request id {request.id!r} is already in use")
        if request.state is not RequestState.WAITING or request.prefilled or request.generated:
            raise ConfigError("state", f"request {request.id!r} must be new (waiting, no tokens done)")
        self._check_can_ever_run(request)
        if self._n_waiting >= self.config.queue_bound:
            raise QueueFullError(f"queue is full ({self.config.queue_bound} waiting requests)")
        self._seq += 1
        entry = (request.arrival, self._seq, request)
        if self._fcfs and self._fcfs[-1][:2] > entry[:2]:
            bisect.insort(self._fcfs, entry, lo=self._head, key=lambda e: e[:2])
        else:
            self._fcfs.append(entry)
        q = self._by_adapter.setdefault(request.adapter, deque())
        if q and q[-1][:2] > entry[:2]:
            q.append(entry)
            self._by_adapter[request.adapter] = deque(sorted(q, key=lambda e: e[:2]))
        else:
            q.append(entry)
        self._n_waiting += 1
        self._requests[request.id] = request

    def cancel(self, request_id: str, now: float | None = None) -> bool:
        """Cancel a waiting or running request, freeing its KV space and slot at once.

        Returns False if the request is unknown or already done.
        """
        r = self._requests.get(request_id)
        if r is None or r.done:
            return False
        if r.state is RequestState.WAITING:
            self._unqueue(r)
        else:
            self._release(r)
        r.state = RequestState.CANCELLED
        r.finished_at = now
        del self._requests[request_id]
        return True

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    @property
    def waiting(self) -> list[Request]:
        """Waiting requests in FCFS order."""
        return [e[2] for e in self._fcfs[self._head :] if e[2].state is RequestState.WAITING]

    @property
    def running(self) -> list[Request]:
        """Running requests in admission order."""
        return list(self._running.values())

    @property
    def kv_used(self) -> int:
        """KV tokens reserved by running requests."""
        return self._kv_used

    @property
    def running_adapters(self) -> list[str]:
        return list(self._adapter_users)

    def has_work(self) -> bool:
        return bool(self._n_waiting or self._running)

    def upcoming_adapters(self, limit: int) -> list[str]:
        """Distinct adapters of the first waiting requests (FCFS), for ``AdapterCache.prefetch``."""
        out: dict[str, None] = {}
        for i in range(self._head, len(self._fcfs)):
            r = self._fcfs[i][2]
            if len(out) >= limit:
                break
            if r.adapter is not None and r.state is RequestState.WAITING:
                out[r.adapter] = None
        return list(out)

    # -- scheduling -------------------------------------------------------------
    def schedule(self, now: float) -> ScheduledStep:
        """Build the next step and admit the requests it starts (pinning their adapters)."""
        step = _Step(budget=self.config.token_budget)
        self._schedule_running(step)
        self._admit(step, now)
        adapters = {self._requests[i].adapter for i in step.decodes}
        adapters |= {self._requests[c.request_id].adapter for c in step.prefills}
        ordered = tuple(a for a in self._adapter_users if a in adapters)
        return ScheduledStep(tuple(step.prefills), tuple(step.decodes), ordered, tuple(step.admitted))

    def _schedule_running(self, step: _Step) -> None:
        """Every decode (always fits: max_running <= token_budget), then prompt chunks, oldest first."""
        for r in self._running.values():
            if not r.in_prefill:
                step.decodes.append(r.id)
        step.budget -= len(step.decodes)
        for r in self._running.values():
            if r.in_prefill and step.budget > 0:
                self._chunk(step, r)

    def _admit(self, step: _Step, now: float) -> None:
        """Admit waiting requests in FCFS order; see the module docstring for the rules.

        A starved request whose adapter finds no slot starts a drain: from then on this step
        admits no request that needs a new slot, nor any request of the running adapter that
        will finish soonest (the victim), so that slot frees within the victim's remaining
        tokens while the other running adapters keep flowing.

        Two phases with the same outcome as one FCFS scan that skips requests whose adapter does
        not fit: the scan itself while a new adapter could still be admitted or the requests are
        starved, then a merge of the per-adapter queues of the admissible adapters only.
        """
        self._compact()
        drain = _Drain()
        cutoff = now - self.config.starvation_after
        for i in range(self._head, len(self._fcfs)):  # _fcfs is not modified while admitting
            r = self._fcfs[i][2]
            if r.state is not RequestState.WAITING:
                continue
            if not self._room(step):
                return
            starved = r.arrival <= cutoff
            if not starved and (drain.on or not self._slot_free()):
                break
            verdict = self._try_admit(r, step, now, drain, starved)
            if verdict == "full":
                return
        self._merge(step, now, drain)

    def _merge(self, step: _Step, now: float, drain: _Drain) -> None:
        """Admit from the queues of adapters that need no new slot, oldest first."""
        heads = []
        for a in self._admissible(drain):
            q = self._by_adapter.get(a)
            if q:
                heads.append((q[0][:2], a))
        heapq.heapify(heads)
        while heads and self._room(step):
            _, a = heapq.heappop(heads)
            r = self._by_adapter[a][0][2]
            if self._try_admit(r, step, now, drain, starved=False) == "full":
                return
            q = self._by_adapter.get(a)
            if q:
                heapq.heappush(heads, (q[0][:2], a))

    def _admissible(self, drain: _Drain) -> list[str | None]:
        """Adapters whose requests can be admitted without a new slot (and base requests)."""
        return [None, *(a for a in self._adapter_users if not (drain.on and a == drain.victim))]

    def _room(self, step: _Step) -> bool:
        return step.budget > 0 and len(self._running) < self.config.max_running

    def _slot_free(self) -> bool:
        return len(self._adapter_users) < self.cache.max_slots

    def _try_admit(self, r: Request, step: _Step, now: float, drain: _Drain, starved: bool) -> str:
        """Admit ``r`` if its adapter and KV need fit: "admitted", "skipped", or "full" (stop)."""
        new_slot = r.adapter is not None and r.adapter not in self._adapter_users
        if new_slot and (drain.on or not self._adapter_fits(r.adapter)):
            if starved and not drain.on:
                drain.on, drain.victim = True, self._drain_victim()
            return "skipped"
        if drain.on and r.adapter is not None and r.adapter == drain.victim:
            return "skipped"
        if self._kv_used + self._reserve(r) > self.config.kv_tokens:
            return "full"  # head-of-line: the oldest admissible request waits for memory, not overtaken
        if not self.config.chunked_prefill and r.prompt_len > step.budget:
            return "full"  # whole prompts only (encoders): wait for a step with room, keep FCFS
        self._unqueue(r)
        self._start(r, now)
        step.admitted.append(r.id)
        self._chunk(step, r)
        return "admitted"

    def _unqueue(self, r: Request) -> None:
        """Take a waiting request out of its adapter queue (the FCFS list drops it lazily)."""
        q = self._by_adapter[r.adapter]
        if q[0][2] is r:
            q.popleft()
        else:
            q.remove(next(e for e in q if e[2] is r))
        if not q:
            del self._by_adapter[r.adapter]
        self._n_waiting -= 1

    def _compact(self) -> None:
        """Skip stale entries at the head of the FCFS list; rebuild it when stale ones dominate."""
        fcfs = self._fcfs
        while self._head < len(fcfs) and fcfs[self._head][2].state is not RequestState.WAITING:
            self._head += 1
        if len(fcfs) - self._head > 2 * self._n_waiting + 32 or self._head > 1024:
            self._fcfs = [e for e in fcfs[self._head :] if e[2].state is RequestState.WAITING]
            self._head = 0

    def _drain_victim(self) -> str | None:
        """The running adapter whose requests will all be done soonest (ties: admitted first)."""
        left: dict[str, int] = {}
        for r in self._running.values():
            if r.adapter is not None:
                todo = (r.prompt_len - r.prefilled) + (r.max_new_tokens - r.generated)
                left[r.adapter] = max(left.get(r.adapter, 0), todo)
        return min(left, key=left.__getitem__) if left else None

    def _adapter_fits(self, adapter: str | None) -> bool:
        if adapter is None or adapter in self._adapter_users:
            return True
        return self.cache.fits([*self._adapter_users, adapter])

    def _chunk(self, step: _Step, r: Request) -> None:
        n = min(r.prompt_len - r.prefilled, step.budget)
        step.prefills.append(PrefillChunk(r.id, r.prefilled, n, r.prefilled + n == r.prompt_len))
        step.budget -= n

    def _start(self, r: Request, now: float) -> None:
        r.state = RequestState.RUNNING
        r.admitted_at = now
        self._running[r.id] = r
        self._kv_used += self._reserve(r)
        if r.adapter is not None:
            self._adapter_users[r.adapter] = self._adapter_users.get(r.adapter, 0) + 1
            self.cache.pin(r.adapter)
        if self.on_admit is not None:
            r.prefilled = self.on_admit(r)
            if not is_int(r.prefilled) or not 0 <= r.prefilled < r.prompt_len:
                raise ParadaptError(f"request {r.id!r}: on_admit gave {r.prefilled!r} cached prompt tokens")

    # -- after the step ---------------------------------------------------------
    def complete(self, step: ScheduledStep, now: float, stopped: Iterable[str] = ()) -> list[Request]:
        """Record a finished step: prompt progress, one token per decode or last chunk.

        ``stopped`` names requests the runner ended early (EOS, stop string). Returns the
        requests that finished; their KV space and adapter pins are released at once.
        Requests cancelled while the step ran are skipped.
        """
        stopped = set(stopped)
        finished = []
        for c in step.prefills:
            r = self._running.get(c.request_id)
            if r is None:
                continue
            r.prefilled += c.length
            if c.last:
                r.generated += 1
        for rid in step.decodes:
            r = self._running.get(rid)
            if r is not None:
                r.generated += 1
        for rid in [*step.decodes, *(c.request_id for c in step.prefills if c.last)]:
            r = self._running.get(rid)
            if r is not None and (r.generated >= r.max_new_tokens or rid in stopped):
                self._release(r)
                r.state = RequestState.FINISHED
                r.finished_at = now
                del self._requests[rid]
                finished.append(r)
        return finished

    # -- internals ----------------------------------------------------------------
    def _release(self, r: Request) -> None:
        del self._running[r.id]
        self._kv_used -= self._reserve(r)
        if r.adapter is not None:
            n = self._adapter_users[r.adapter] - 1
            if n:
                self._adapter_users[r.adapter] = n
            else:
                del self._adapter_users[r.adapter]
            self.cache.unpin(r.adapter)

    def _reserve(self, r: Request) -> int:
        """KV tokens reserved for ``r``: its worst case, rounded up to whole blocks (paged caches)."""
        b = self.config.kv_block
        return -(-r.kv_need // b) * b

    def _check_can_ever_run(self, r: Request) -> None:
        if not self.config.chunked_prefill and r.prompt_len > self.config.token_budget:
            raise RequestTooLargeError(
                "prompt",
                f"request {r.id!r} has {r.prompt_len} prompt tokens, over the step budget of "
                f"{self.config.token_budget} (chunked prefill is off)",
            )
        if self._reserve(r) > self.config.kv_tokens:
            raise RequestTooLargeError(
                "max_tokens",
                f"request {r.id!r} needs {r.prompt_len} prompt + {r.max_new_tokens} new tokens = {r.kv_need} "
                f"({self._reserve(r)} in blocks of {self.config.kv_block}), "
                f"over the KV capacity of {self.config.kv_tokens}",
            )
        if r.adapter is not None:
            if r.adapter not in self.cache:
                raise AdapterNotFoundError(f"unknown adapter {r.adapter!r}")
            if not self.cache.fits([r.adapter]):
                needs = self.cache.needs(r.adapter)
                what = (
                    f"mixture {r.adapter!r} needs {len(needs) + 1} adapter slots (itself and its experts)"
                    if needs
                    else f"adapter {r.adapter!r} ({self.cache.size(r.adapter)} B)"
                )
                raise RequestTooLargeError("model", f"{what}: more than the device has (max_slots, memory)")
