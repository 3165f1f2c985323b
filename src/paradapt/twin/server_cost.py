"""``paradapt profile --server``: what the HTTP server adds to the engine, measured through it.

The in-process cost model (:mod:`paradapt.twin.profile`) prices ``Engine.step``. Behind
``paradapt serve`` the same engine runs in a thread next to an asyncio event loop that parses
requests, hands them to the engine thread and streams every token as a server-sent event; the
twin then predicted TTFT 19% and TPOT 12-15% low (39-43% / 25-30% on a one-slot workload).
:func:`profile_server` measures that difference on the real app and fits a
:class:`~paradapt.twin.costmodel.ServerCost`:

* **per step**: the engine thread's *step period* (from one step's start to the next one's,
  adapter moves left out) minus the cost model's ``step_time`` of the step's shape, fitted as
  ``step + token x tokens emitted`` (non-negative least squares). The period, not the traced
  step alone: the event loop's per-token work takes the GIL and a core both during the steps
  and in the engine thread's bookkeeping between them, and the twin has no time between steps.
  Only steps followed at once by another one count (the next step decodes, so the engine had
  work and did not wait for an arrival).
* **per request**: for each low-rate request that was alone from its send to its first chunk
  (every low-rate request if none was), the client's TTFT minus the engine's own part of it:
  from the request reaching the engine (its handle's ``arrival``) to the end of the period of
  the step that sampled its first token (where the twin's step ends). The median, less the
  time to queue a request that the twin already charges (``CostModel.submit``), at least 0.
  That is HTTP parsing, validation, the hand-off to the engine thread and the first chunk's
  delivery.

The engine runs with the served model's tokenizer, as under ``paradapt serve``: it detokenizes
every token (engine time the in-process profile, which has none, did not see), and the server
streams text (without a tokenizer a stream sends nothing until its end). Engine-side times:
the engine runs on ``time.perf_counter`` (the step trace's clock) with its step trace on, and
each finished request's handle (arrival, first token) reaches a request log
(:class:`EngineTimes`, in the place of ``paradapt serve --request-log``'s file), paired with
the client's request by its prompt (each prompt is unique). Client times come from the load
client (:func:`paradapt.bench.send`, what ``paradapt bench`` runs): open loop, streaming
``/v1/completions`` with token-id prompts and ``ignore_eos``, **in a child process** (a real
client is elsewhere). In this process its per-token work (reading every streamed chunk) took the
GIL from the engine thread: two profiles taken so priced a plain ``paradapt serve`` 15-22 %
below what it served, three with the client in a child process within 0-2.4 %
(``benchmarks/serve_cluster.py``, ``no Ray``, Zen 4 VM, 2026-12-07).

The library never imports the HTTP layer (tests/test_layout.py): the caller passes ``serve``,
which runs the engine behind the app and yields its URL (``paradapt.cli.serve.serve_engine``).
Torch threads are the process's (``paradapt profile --threads``), as ``paradapt serve`` sets them.
"""

from __future__ import annotations

import bisect
import multiprocessing
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ParadaptError
from ..serve.core import StepTrace
from ..serve.engine import Engine, EngineConfig
from ..serve.workload import Workload, WorkloadRequest, WorkloadSpec
from .costmodel import CostModel, ServerCost, errors, fit_linear
from .profile import build_adapter_root, clear_adapters

if TYPE_CHECKING:
    from ..bench import BenchConfig, Outcome
    from ..serve.engine import RequestHandle

#: Runs an engine behind the HTTP app and yields the server's base URL; the second argument is
#: a request log (``record(handle)`` for every finished generation).
Serve = Callable[[Engine, "EngineTimes"], AbstractContextManager[str]]

LOW_LOAD = 0.2  # the low rate keeps the engine busy this share of the time: requests mostly alone
HIGH_LOAD = 1.5  # the saturating rate, times the twin's in-process capacity (the server's is lower)
HTTP_GUESS = 0.005  # s per request over HTTP, assumed only to set the low rate
WARMUP = 2  # requests before measuring (first connection, first route call)


class EngineTimes:
    """A request log for the server (``ServerMetrics.request_log``): the engine thread hands it
    each finished generation; it keeps (arrival, first token) on the engine's clock by prompt."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, ...], tuple[float, float]] = {}

    def record(self, h: RequestHandle) -> None:
        if h.arrival is not None and h.first_token_at is not None:
            self.seen[tuple(h.prompt)] = (h.arrival, h.first_token_at)

    def close(self) -> None:
        """Nothing to flush (the request log protocol)."""


@dataclass
class Phase:
    """One load phase: what was sent, what the client saw, and the engine's steps meanwhile."""

    workload: Workload
    outcomes: dict[int, Outcome]
    steps: list[StepTrace] = field(default_factory=list)


# -- the fits (pure: tested without a server) -----------------------------------------------------


def step_periods(steps: Sequence[StepTrace]) -> list[tuple[StepTrace, float]]:
    """(step, its period) for every step the next one followed at once (it decodes: the engine
    had running requests, so it did not wait for an arrival); adapter moves are left out."""
    return [
        (a, b.start - a.start - sum(m.seconds for m in a.moves))
        for a, b in zip(steps, steps[1:], strict=False)
        if b.shape.decodes > 0
    ]


def fit_step(
    periods: Sequence[tuple[StepTrace, float]], cost: CostModel, info: dict[str, tuple[str, int]]
) -> tuple[float, float, dict[str, Any]]:
    """``(step, token)`` seconds with ``period - cost.step_time(shape) ~ step + token x emitted``
    (non-negative least squares, absolute error), and how well the periods are predicted."""
    if not periods:
        raise ParadaptError("profile --server: no step was followed by another one; send more requests")
    pred = [cost.step_time(t.shape, info) for t, _ in periods]
    y = [p for _, p in periods]
    rows = [(1.0, float(t.shape.samplers)) for t, _ in periods]
    step, token = fit_linear(rows, [a - b for a, b in zip(y, pred, strict=True)], relative=False)
    with_server = [p + step + token * r[1] for p, r in zip(pred, rows, strict=True)]
    n = len(periods)
    fit = {
        "steps": n,
        "in_step_us": round(1e6 * sum(t.seconds - p for (t, _), p in zip(periods, pred, strict=True)) / n, 1),
        "between_steps_us": round(1e6 * sum(p - t.seconds for t, p in periods) / n, 1),
        "period_error_in_process": errors(pred, y),
        "period_error_with_server": errors(with_server, y),
    }
    return step, token, fit


def lone(outcomes: dict[int, Outcome]) -> list[int]:
    """Requests no other one overlapped from their send to their first chunk."""
    ok = {i: o for i, o in outcomes.items() if o.status == "ok" and o.chunks}
    return [
        i
        for i, o in ok.items()
        if not any(j != i and p.sent < o.chunks[0] and p.chunks[-1] > o.sent for j, p in ok.items())
    ]


def request_latencies(
    phase: Phase, times: EngineTimes, starts: Sequence[float], ids: Sequence[int]
) -> list[float]:
    """Per request ``ids`` of ``phase``: client TTFT minus the engine's part (arrival to the start
    of the step after the one that sampled its first token); ``starts``: every traced step's
    start, sorted, on the engine's clock."""
    reqs = {r.id: r for r in phase.workload.requests}
    out = []
    for i in ids:
        seen = times.seen.get(tuple(reqs[i].prompt or ()))
        if seen is None:
            continue
        arrival, first = seen
        k = bisect.bisect_right(starts, first)
        if k == len(starts):
            continue
        o = phase.outcomes[i]
        out.append((o.chunks[0] - o.sent) - (starts[k] - arrival))
    return out


# -- the load -------------------------------------------------------------------------------------


def with_prompts(workload: Workload, vocab: int, seed: int) -> Workload:
    """``workload`` with a unique random prompt per request (ids from 3: no special tokens), so
    the engine's handles pair with the client's requests."""
    rng = random.Random(seed)
    used: set[tuple[int, ...]] = set()
    reqs = []
    for r in workload.requests:
        prompt = tuple(rng.randrange(3, vocab) for _ in range(r.prompt_len))
        while prompt in used:
            prompt = tuple(rng.randrange(3, vocab) for _ in range(r.prompt_len))
        used.add(prompt)
        reqs.append(replace(r, prompt=prompt))
    return replace(workload, requests=tuple(reqs))


def lone_request_seconds(cost: CostModel, spec: WorkloadSpec) -> float:
    """The twin's time for one request of ``spec``'s mean lengths on an idle engine."""
    from .sim import simulate

    req = WorkloadRequest(0, None, 0.0, round(sum(spec.input_len) / 2), round(sum(spec.output_len) / 2))
    r = simulate(Workload(None, (), (req,), 1.0), cost, max_served=1, max_slots=1, drain=1e9, server=False)
    return float(r.extra["busy_seconds"])


def capacity(cost: CostModel, spec: WorkloadSpec, n: int, config: EngineConfig) -> float:
    """Requests/s the twin serves in process when ``n`` of ``spec``'s requests arrive at once."""
    from .sim import simulate

    burst = replace(spec, rate=1e6, duration=1.0, max_requests=n, cv=1.0).generate()
    knobs = {k: getattr(config, k) for k in ("page_size", "num_blocks", "token_budget", "max_running")}
    r = simulate(
        burst,
        cost,
        max_served=config.max_served,
        max_slots=config.max_slots,
        drain=1e9,
        server=False,
        **knobs,
    )
    return len(burst.requests) / max(float(r.extra["busy_seconds"]), 1e-9)


#: Sends a workload with the load client and returns each request's outcome (:func:`client`).
Send = Callable[[Workload, "BenchConfig"], "dict[int, Outcome]"]


@contextmanager
def client() -> Iterator[Send]:
    """:func:`paradapt.bench.send` in one child process (spawned: this process runs threads),
    kept for every phase; the child imports the client on the first call (the warm-up phase)."""
    from ..bench import send

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        yield lambda workload, config: pool.apply(send, (workload, config))[0]


def run_phase(engine: Engine, url: str, workload: Workload, vocab: int, seed: int, send: Send) -> Phase:
    """Send ``workload`` with the load client; the engine steps traced meanwhile."""
    from ..bench import BenchConfig

    first = len(engine.trace)
    outcomes = send(workload, BenchConfig(url=url, vocab_size=vocab, seed=seed, progress=False))
    failed = sorted({o.status for o in outcomes.values() if o.status != "ok"})
    if failed:
        raise ParadaptError(f"profile --server: requests failed over HTTP ({', '.join(failed)})")
    return Phase(workload, outcomes, list(engine.trace[first:]))


# -- the whole measurement ------------------------------------------------------------------------


def profile_server(
    model,
    cost: CostModel,
    serve: Serve,
    *,
    tokenizer,
    kinds: Sequence[str] = ("lora", "parallel", "series"),
    ranks: Sequence[int] = (8, 16, 32),
    requests: int = 20,
    saturating: int | None = None,
    low_rate: float | None = None,
    high_rate: float | None = None,
    token_budget: int = 256,
    max_running: int = 32,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> ServerCost:
    """Measure what the HTTP server adds to ``cost`` (the in-process model of ``model``).

    ``tokenizer`` is the one the server runs with: the engine detokenizes each token and the
    server streams text, so without one a stream would send nothing until its last chunk.

    ``requests`` are sent at ``low_rate`` (default: the engine busy 20% of the time, by the
    twin) and ``saturating`` (default: 3 x ``max_running``) at ``high_rate`` (default: 1.5 x the
    twin's in-process capacity), after two warm-up requests; ``serve`` runs the engine behind
    the app (:data:`Serve`). Returns the fitted section; ``requests`` in it counts both phases.
    """
    if tokenizer is None:
        raise ConfigError(
            "tokenizer", "profile --server needs the served model's tokenizer (the server streams text)"
        )
    t0 = time.perf_counter()
    saturating = 3 * max_running if saturating is None else saturating
    spec = phase_spec(model, kinds, ranks, seed)
    config = EngineConfig(
        token_budget=token_budget,
        max_running=max_running,
        max_slots=spec.num_adapters,
        max_served=spec.num_adapters,
        queue_bound=max(4096, 2 * (requests + saturating)),
    )
    low_rate = low_rate or LOW_LOAD / (lone_request_seconds(cost, spec) + HTTP_GUESS)
    high_rate = high_rate or HIGH_LOAD * capacity(cost, spec, saturating, config)
    loads = [(WARMUP, low_rate), (requests, low_rate), (saturating, high_rate)]
    vocab = model.config.vocab_size
    workloads = [
        with_prompts(
            replace(spec, rate=r, duration=4 * n / r, max_requests=n).generate(), vocab, seed + 7 * i
        )
        for i, (n, r) in enumerate(loads)
    ]
    log(
        f"profile --server: {requests} requests at {low_rate:.3g} req/s (mostly alone), "
        f"{saturating} at {high_rate:.3g} req/s (saturating), over HTTP"
    )
    (_, low, high), times, starts = measure(model, tokenizer, serve, config, workloads, seed)
    info = {a.name: (a.kind, a.rank) for a in workloads[0].adapters}
    server = fit_server(cost, low, high, times, starts, info)
    server.fit.update(
        low_rate=round(low_rate, 4), high_rate=round(high_rate, 4), seconds=round(time.perf_counter() - t0, 1)
    )
    return server


def measure(
    model, tokenizer, serve: Serve, config: EngineConfig, workloads: Sequence[Workload], seed: int
) -> tuple[list[Phase], EngineTimes, list[float]]:
    """Run each workload in turn against one engine behind the app (its adapter folders in a
    temporary folder); the phases, the engine's request times and its steps' starts, sorted."""
    work = Path(tempfile.mkdtemp(prefix="paradapt-profile-server-"))
    clear_adapters(model)
    try:
        root = build_adapter_root(model, work / "adapters", workloads[0].adapters, seed)
        clear_adapters(model)
        # the trace's clock, so a handle's first token falls among the traced steps
        engine = Engine(model, root, config, tokenizer=tokenizer, clock=time.perf_counter)
        engine.enable_trace()
        times = EngineTimes()
        with serve(engine, times) as url, client() as send:
            phases = [run_phase(engine, url, w, model.config.vocab_size, seed, send) for w in workloads]
        return phases, times, sorted(t.start for t in engine.trace)
    finally:
        clear_adapters(model)
        shutil.rmtree(work, ignore_errors=True)


def fit_server(
    cost: CostModel,
    low: Phase,
    high: Phase,
    times: EngineTimes,
    starts: Sequence[float],
    info: dict[str, tuple[str, int]],
) -> ServerCost:
    """The section: step terms from both phases' steps, the request latency from the low rate's
    lone requests (every low-rate request if none ran alone, on a crowded machine)."""
    step, token, fit = fit_step(step_periods(low.steps) + step_periods(high.steps), cost, info)
    alone = lone(low.outcomes)
    latencies = request_latencies(low, times, starts, alone or sorted(low.outcomes))
    if not latencies:
        raise ParadaptError("profile --server: no low-rate request could be paired with the engine's")
    raw = median(latencies)
    fit.update(lone_requests=len(alone), request_median_ms=round(1e3 * raw, 3))
    sent = len(low.outcomes) + len(high.outcomes)
    return ServerCost(max(0.0, raw - cost.submit), step, token, requests=sent, fit=fit)


def phase_spec(model, kinds: Sequence[str], ranks: Sequence[int], seed: int) -> WorkloadSpec:
    """The requests both phases draw from: short prompts and outputs over a few adapters of each
    kind and rank (at least two output tokens: a first token, then a step that follows it)."""
    half = (getattr(model.config, "max_position_embeddings", None) or 1024) // 2
    return WorkloadSpec(
        num_adapters=max(4, len(kinds) * len(ranks)),
        rate=1.0,
        duration=1.0,
        alpha=0.5,
        input_len=(min(8, half), min(64, half)),
        output_len=(min(4, half), min(32, half)),
        ranks=list(ranks),
        kinds=list(kinds),
        seed=seed,
        adapter_prefix="srv",
    )
