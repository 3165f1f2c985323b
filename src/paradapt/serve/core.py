"""The torch-free planning core of an engine step, shared by the real engine and the digital twin.

:class:`ServeCore` holds the :class:`~paradapt.serve.scheduler.Scheduler`, the
:class:`~paradapt.serve.cache.AdapterCache` and a clock, and does everything a step decides
before the model runs: schedule it, bring its adapters on device (failing the requests of an
adapter that cannot load), prefetch queued adapters into host memory. The real
:class:`~paradapt.serve.engine.Engine` subclasses it with a model and a Runner; the twin
(:mod:`paradapt.twin.sim`) subclasses it with a simulated clock and a cost model. Both
therefore take the very same decisions: the twin does not re-implement the step's policy.

Memory: adapters on the device share it with the KV cache. ``EngineConfig.device_memory``
(bytes) turns that on: :func:`memory_split` sets aside ``max_slots`` slots of the largest
adapter's size and gives the rest to KV pages, so more slots mean fewer KV tokens (Agullo et
al.'s trade-off). Left at None (the default) the KV pool is ``num_blocks x page_size`` tokens
and adapters are bounded by count only, which is what a caller that sized the KV pool itself
wants.

A per-step trace (:class:`StepTrace`, on with ``trace=True``) records each step's shape, its
wall time and its adapter moves; the cost-model profiler reads it. Off, it costs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..checks import is_int
from ..errors import ConfigError, ParadaptError
from .cache import AdapterCache, MemoryBudget, Move
from .scheduler import ScheduledStep, Scheduler, SchedulerConfig

#: How a decode step reads the paged KV cache (serve/paged_attention.py): the best that works here
#: (the C++ kernel, else the compiled version, else gather + SDPA), or one of them (an error when
#: it cannot run).
DECODE_ATTENTION = ("auto", "kernel", "compiled", "gather")
LM_HEAD_GEMM = ("auto", "packed", "int8", "linear")
LAYER_GEMM = ("auto", "kernel", "packed", "linear")


class AdapterLoadError(ParadaptError, RuntimeError):
    """An adapter folder could not be loaded; the requests for it fail with this error."""

    def __init__(self, adapter: str, cause: Exception):
        self.adapter, self.cause = adapter, cause
        super().__init__(f"adapter {adapter!r} could not be loaded: {cause}")


class AdapterAccessError(ParadaptError):
    """An adapter path outside the adapter root (403 over HTTP; the message shows no path)."""


@dataclass(frozen=True)
class EngineConfig:
    """Engine knobs: KV pages, step budget, batch size, adapter slots and host copies.

    ``max_slots``: distinct adapters on the device (one step's adapters); ``max_served``:
    adapters kept in host memory; ``prefetch``: queued adapters read ahead into host memory.
    ``device_memory``: bytes shared by KV pages and adapter slots (None: KV is ``num_blocks``
    pages and slots are not charged); ``slot_bytes``: bytes reserved per slot when
    ``device_memory`` is set (None: the largest adapter the engine knows at start).
    ``decode_attention``: how decode steps read the paged KV cache
    (:mod:`paradapt.serve.paged_attention`: ``auto``, ``compiled`` or ``gather``).
    ``lm_head_gemm``: how the LM head multiplies (:mod:`paradapt.serve.lm_head`): ``auto``
    (a weight prepacked for oneDNN where a measurement at start says it is faster; it costs a
    second copy of the head's weight; and, for a head whose weights lie on a GGUF Q8_0 grid, its
    int8 form for few rows), ``packed``, ``int8`` or ``linear`` (``F.linear``, no copy).
    ``layer_gemm``: how the other linear layers multiply a step's rows
    (:mod:`paradapt.serve.layer_gemm`): ``auto`` (per weight shape and row count, a C++ kernel
    for few rows or weights prepacked for oneDNN, each where a measurement at start says it is
    faster; packed layers cost a second copy of their weights), ``kernel`` (up to 32 rows),
    ``packed`` (every row count) or ``linear``.
    ``check_adapter_weights``: every step checks the served adapters' tensors for in-place
    edits, as a mixed batch outside the engine does (``pa.route``'s ``fixed_weights``). Off by
    default: the engine's adapters change only by being loaded again, and the check cost ~8 %
    of a decode step with 32 LoRAs. An adapter whose tensors require a gradient (one being
    trained in this process, as in online RL) is checked either way; turn this on where frozen
    adapters' tensors are edited in place.
    ``prefix_caching``: requests for the same adapter (or the base model) whose prompts start
    with the same full KV pages share those pages and skip their prefill (a system prompt, an
    instruction, few-shot examples, earlier chat turns); on by default, as in vLLM. Off when
    ``check_adapter_weights`` is on (edited weights would make cached pages stale). The twin
    models it (:mod:`paradapt.twin.prefix_cache`) for prompts that share a start (a trace's
    token ids, a workload's ``shared_prefix``).
    """

    page_size: int = 16
    num_blocks: int = 256
    token_budget: int = 256
    max_running: int = 32
    max_slots: int = 4
    max_served: int = 16
    queue_bound: int = 4096
    starvation_after: float = 30.0
    prefetch: int = 2
    device_memory: int | None = None
    slot_bytes: int | None = None
    decode_attention: str = "auto"
    lm_head_gemm: str = "auto"
    layer_gemm: str = "auto"
    check_adapter_weights: bool = False
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("page_size", "num_blocks", "token_budget", "max_running", "max_slots", "max_served"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {v!r}")
        if not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise ConfigError("prefetch", f"must be an integer >= 0, got {self.prefetch!r}")
        for name in ("device_memory", "slot_bytes"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 0):
                raise ConfigError(name, f"must be a number of bytes >= 0 or None, got {v!r}")
        for name in ("check_adapter_weights", "prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.decode_attention not in DECODE_ATTENTION:
            raise ConfigError(
                "decode_attention", f"must be one of {list(DECODE_ATTENTION)}, got {self.decode_attention!r}"
            )
        if self.lm_head_gemm not in LM_HEAD_GEMM:
            raise ConfigError("lm_head_gemm", f"must be one of {list(LM_HEAD_GEMM)}, got {self.lm_head_gemm!r}")
        if self.layer_gemm not in LAYER_GEMM:
            raise ConfigError("layer_gemm", f"must be one of {list(LAYER_GEMM)}, got {self.layer_gemm!r}")


@dataclass(frozen=True)
class MemorySplit:
    """KV pages and the adapters' device byte budget that an :class:`EngineConfig` gets."""

    num_blocks: int
    device_bytes: int | None


def memory_split(config: EngineConfig, kv_bytes_per_token: int, largest_adapter: int) -> MemorySplit:
    """Split ``config.device_memory`` between ``max_slots`` adapter slots and KV pages.

    Without ``device_memory`` the KV pool is ``config.num_blocks`` pages and adapters have no
    byte budget. With it, each slot reserves ``slot_bytes`` (default ``largest_adapter``) and
    the remaining bytes become whole KV pages; the cache then refuses a set of adapters whose
    sizes exceed the reserved bytes.
    """
    if config.device_memory is None:
        return MemorySplit(config.num_blocks, None)
    slot = config.slot_bytes if config.slot_bytes is not None else largest_adapter
    budget = MemoryBudget(
        total_bytes=config.device_memory,
        kv_bytes_per_token=kv_bytes_per_token,
        max_slots=config.max_slots,
        slot_bytes=slot,
    )
    blocks = budget.kv_tokens // config.page_size
    if blocks < 1:
        raise ConfigError(
            "device_memory",
            f"{config.device_memory} B minus {config.max_slots} slots x {slot} B leaves less than one KV page "
            f"({config.page_size} tokens x {kv_bytes_per_token} B)",
        )
    return MemorySplit(blocks, budget.adapter_bytes)


def scheduler_config(config: EngineConfig, num_blocks: int) -> SchedulerConfig:
    """The decoder engine's scheduler knobs: KV reserved in whole pages of ``page_size`` tokens."""
    return SchedulerConfig(
        token_budget=config.token_budget,
        kv_tokens=num_blocks * config.page_size,
        kv_block=config.page_size,
        max_running=config.max_running,
        queue_bound=config.queue_bound,
        starvation_after=config.starvation_after,
    )


# -- the trace -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepShape:
    """What a step computes, from counts only (the cost model's input).

    ``adapter_tokens``: tokens routed to each adapter (None = base); ``attention``: sum over
    the step's query tokens of the KV positions each attends to; ``context``: KV tokens of the
    step's sequences after the step.
    """

    prefill_tokens: int
    prefill_seqs: int
    decodes: int
    samplers: int
    attention: int
    context: int
    adapter_tokens: tuple[tuple[str | None, int], ...]
    device_loads: int = 0
    resident: int = 0

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decodes

    @property
    def seqs(self) -> int:
        return self.prefill_seqs + self.decodes


@dataclass(frozen=True)
class MoveTime:
    """One adapter move and the wall seconds it took (simulated seconds in the twin)."""

    op: str
    adapter: str
    size: int
    seconds: float


@dataclass(frozen=True)
class StepTrace:
    """One traced step: its shape, its wall time without adapter moves, and the moves."""

    shape: StepShape
    seconds: float
    moves: tuple[MoveTime, ...]
    start: float = 0.0
    plan_seconds: float = 0.0  # of ``seconds``: the scheduler's planning (and prefetch bookkeeping)


def step_shape(
    scheduler: Scheduler, step: ScheduledStep, device_loads: int = 0, resident: int = 0
) -> StepShape:
    """The shape of ``step`` (call before ``scheduler.complete``: it reads progress so far)."""
    per: dict[str | None, int] = {}
    attention = context = samplers = 0
    for c in step.prefills:
        r = scheduler.get(c.request_id)
        per[r.adapter] = per.get(r.adapter, 0) + c.length
        end = c.start + c.length
        attention += c.length * c.start + c.length * (c.length + 1) // 2
        context += end
        samplers += c.last
    for rid in step.decodes:
        r = scheduler.get(rid)
        per[r.adapter] = per.get(r.adapter, 0) + 1
        pos = r.prompt_len + r.generated
        attention += pos
        context += pos
    prefill = sum(c.length for c in step.prefills)
    return StepShape(
        prefill_tokens=prefill,
        prefill_seqs=len(step.prefills),
        decodes=len(step.decodes),
        samplers=samplers + len(step.decodes),
        attention=attention,
        context=context,
        adapter_tokens=tuple(per.items()),
        device_loads=device_loads,
        resident=resident,
    )


# -- the core ----------------------------------------------------------------------------------------


@dataclass
class _StepRecord:
    start: float = 0.0
    planned: float = 0.0
    moves: list[MoveTime] = field(default_factory=list)


class ServeCore:
    """Scheduler + AdapterCache + clock: what one engine step decides, with no model.

    ``loader`` carries out each cache :class:`~paradapt.serve.cache.Move` (real weights, or
    simulated time). Subclasses supply the execution and three hooks: ``_forget`` (drop a
    request's execution state), ``_mark_failed`` (tell the caller a request failed) and
    ``_drop_adapter`` (forget a failed adapter's weights).
    """

    def __init__(
        self,
        config: EngineConfig,
        sched: SchedulerConfig,
        clock: Callable[[], float],
        loader: Callable[[Move], None] | None = None,
        *,
        device_bytes: int | None = None,
    ):
        self.config = config
        self.clock = clock
        self._loader = loader
        self.cache = AdapterCache(
            {}, config.max_served, config.max_slots, device_bytes=device_bytes, loader=self._move
        )
        self.scheduler = Scheduler(sched, self.cache)
        self.last_step: ScheduledStep | None = None  # the latest scheduled step (replay drivers read it)
        self.trace: list[StepTrace] | None = None
        self._rec: _StepRecord | None = None

    def enable_trace(self, on: bool = True) -> None:
        """Record a :class:`StepTrace` per step in ``self.trace`` (a fresh list), or stop."""
        self.trace = [] if on else None

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- moves -------------------------------------------------------------------------
    def _move(self, move: Move) -> None:
        if self._loader is None:
            return
        if self._rec is None:
            self._loader(move)
            return
        t0 = time.perf_counter()
        try:
            self._loader(move)
        finally:
            self._rec.moves.append(MoveTime(move.op, move.adapter, move.size, time.perf_counter() - t0))

    # -- planning ----------------------------------------------------------------------
    def _schedule(self) -> tuple[ScheduledStep, float]:
        """Schedule the step, bring its adapters on device and prefetch; returns (step, its clock time)."""
        if self.trace is not None:
            self._rec = _StepRecord(start=time.perf_counter())
        now = self.clock()
        step = self._resident(self.scheduler.schedule(now))
        self._prefetch()
        self.last_step = step
        if self._rec is not None:
            self._rec.planned = time.perf_counter()
        return step, now

    def _traced_shape(self, step: ScheduledStep) -> StepShape | None:
        """The step's shape when tracing (read it before ``scheduler.complete``)."""
        if self._rec is None or step.empty:
            return None
        loads = sum(m.op == "load_device" for m in self._rec.moves)
        return step_shape(self.scheduler, step, loads, len(self.cache.on_device))

    def _end_trace(self, shape: StepShape | None) -> None:
        """Close the step's trace record: wall time of the step minus its moves."""
        rec, self._rec = self._rec, None
        if rec is None or self.trace is None or shape is None:
            return
        moved = sum(m.seconds for m in rec.moves)
        seconds = time.perf_counter() - rec.start - moved
        planning = max(0.0, rec.planned - rec.start - moved)
        self.trace.append(StepTrace(shape, seconds, tuple(rec.moves), rec.start, planning))

    def _resident(self, step: ScheduledStep) -> ScheduledStep:
        """Bring the step's adapters on device; requests of adapters that fail to load fail, others run."""
        while True:
            try:
                res = self.cache.ensure_resident(step.adapters)
            except AdapterLoadError as e:
                self.fail_adapter(e.adapter, e)
                step = self._keep(step, lambda rid: self.scheduler.get(rid) is not None)
                continue
            if res.missing:  # cannot happen while the scheduler respects the slots; such requests wait
                missing = set(res.missing)
                step = self._keep(step, lambda rid, m=missing: self.scheduler.get(rid).adapter not in m)
            return step

    def _prefetch(self) -> None:
        if not self.config.prefetch:
            return
        try:
            self.cache.prefetch(self.scheduler.upcoming_adapters(self.config.prefetch))
        except AdapterLoadError as e:
            self.fail_adapter(e.adapter, e)

    def _keep(self, step: ScheduledStep, keep: Callable[[str], bool]) -> ScheduledStep:
        """``step`` without the requests ``keep`` rejects, and without adapters no kept request uses."""
        prefills = tuple(c for c in step.prefills if keep(c.request_id))
        decodes = tuple(r for r in step.decodes if keep(r))
        used = {self.scheduler.get(c.request_id).adapter for c in prefills}
        used |= {self.scheduler.get(r).adapter for r in decodes}
        adapters = tuple(a for a in step.adapters if a in used)
        return ScheduledStep(prefills, decodes, adapters, tuple(r for r in step.admitted if keep(r)))

    # -- failures and queue reads (public: the HTTP layer's admin operations use them) ------------
    def fail_requests(self, ids: list[str], error: Exception) -> list:
        """End ``ids`` as failed with ``error``, freeing their KV space and pins."""
        out = []
        for rid in dict.fromkeys(ids):
            self.scheduler.cancel(rid, now=self.clock())
            self._forget(rid)
            out.append(self._mark_failed(rid, error))
        return out

    def fail_adapter(self, adapter: str, error: Exception) -> None:
        """Fail every request (waiting or running) of ``adapter`` and forget it (a later request
        retries); the mixtures it is an expert of fail and are forgotten first."""
        for mixture in self.cache.dependents(adapter) if adapter in self.cache else ():
            cause = ParadaptError(f"its expert {adapter!r} failed: {getattr(error, 'cause', error)}")
            self.fail_adapter(mixture, AdapterLoadError(mixture, cause))
        ids = [r.id for r in self._in_flight() if r.adapter == adapter]
        self.fail_requests(ids, error)
        if adapter in self.cache:
            self.cache.remove_adapter(adapter)
        self._drop_adapter(adapter)

    def fail_all(self, error: Exception) -> list:
        """End every running and queued request with ``error``.

        For a step that raised although the engine catches model errors itself: that is a bug
        whose state may repeat, so stepping on would fail the same way while every client waits.
        """
        return self.fail_requests([r.id for r in self._in_flight()], error)

    def adapter_users(self, adapter: str) -> int:
        """Running or queued requests that name ``adapter`` (an unload must wait for them)."""
        return sum(1 for r in self._in_flight() if r.adapter == adapter)

    def adapters_in_flight(self) -> tuple[list[str], list[str]]:
        """The adapters of running requests and of waiting ones, each sorted (the base model's
        requests name none): what vLLM's ``lora_requests_info`` metric reports."""
        running = sorted({r.adapter for r in self.scheduler.running if r.adapter is not None})
        waiting = sorted({r.adapter for r in self.scheduler.waiting if r.adapter is not None})
        return running, waiting

    @property
    def num_waiting(self) -> int:
        """Requests queued and not yet admitted."""
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        """Requests admitted and not yet finished."""
        return len(self.scheduler.running)

    def _in_flight(self) -> list:
        return [*self.scheduler.running, *self.scheduler.waiting]

    def _forget(self, request_id: str) -> None:
        """Drop the per-request execution state (the Runner's KV pages); engines override."""

    def _mark_failed(self, request_id: str, error: Exception):
        """Record that ``request_id`` failed; returns what ``fail_requests`` hands back."""
        return request_id

    def _drop_adapter(self, adapter: str) -> None:
        """Forget the weights of an adapter that failed to load; engines override."""
