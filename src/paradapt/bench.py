"""The load client: replay a workload (a YAML spec or a request trace) against an OpenAI-compatible server.

``paradapt bench TRACE|SPEC --url URL`` (:mod:`paradapt.cli.bench`) calls :func:`bench`. Each
request is one streaming ``POST /v1/completions`` with a token-id prompt (the trace's, else
seeded random ids below ``vocab_size``), ``max_tokens = output_len`` and ``ignore_eos`` (vLLM's
extension, which paradapt serves too), so the server generates exactly the trace's tokens.

* **open loop** (default): each request is sent at its arrival time, whatever the server is
  doing, as ``vllm bench serve`` does with a request rate;
* **closed loop** (``concurrency=N``): N requests in flight at all times, arrival times ignored;
  the window is the run's length.

The metrics are the twin's (:func:`paradapt.twin.metrics.summarize`, one module for both): every
streamed chunk is a token event at the time it arrived (the first one also carries the
prompt's tokens), and a request's first token / finish times are its first chunk and its last.
The usage the server reports at the end (``stream_options.include_usage``) is the token count
when it differs from the chunks (a chunk may carry several tokens). TTFT and TPOT count from
the moment the request was sent. A request the server refuses (an HTTP status) or fails
(an error chunk, a cut stream) is counted by status in ``extra["failed"]``, never as served.

httpx is an optional dependency (the ``bench`` extra; ``showcase`` and ``test`` bring it too); :func:`bench` says so when
it is missing. The library layering allows it: httpx is a client, not a web framework.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from .checks import is_int
from .errors import ParadaptError
from .serve.trace import check_requests
from .serve.workload import Workload, WorkloadRequest, leading_ids
from .twin.metrics import TwinResult, summarize
from .twin.replay import ReplayLog, StepEvent

#: Seconds to wait for the server to accept a connection before saying it is unreachable.
CONNECT_TIMEOUT = 5.0


class BenchError(ParadaptError):
    """The load client cannot run (server unreachable, httpx missing); one line, no traceback."""


@dataclass
class Outcome:
    """What one request saw: when it was sent, each chunk's arrival, its token count, its status.

    Times are seconds on the run's own clock (``time.perf_counter`` from the run's start)."""

    sent: float
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0
    status: str = "ok"  # "ok", an HTTP status ("429"), "stream_error", "transport_error"
    text: str = ""  # the completion's text, as streamed (to compare two runs' greedy answers)
    cached: int = 0  # prompt tokens the server served from its prefix cache (usage.prompt_tokens_details)


@dataclass(frozen=True)
class BenchConfig:
    """How to load the server: where, with what, and how requests arrive."""

    url: str
    concurrency: int | None = None  # None: open loop, each request at its arrival time
    base_name: str | None = None  # the base model's served name (None: the first of /v1/models)
    vocab_size: int = 256  # random prompt ids are drawn from [3, vocab_size) when a trace has none
    seed: int = 0
    api_key: str | None = None
    drain: float | None = None  # seconds after the window before open requests are cut (None: wait)
    slo_ttft: float | None = None
    slo_tpot: float | None = None
    timeout: float = 600.0  # one request's read timeout
    progress: bool = True


def _httpx():
    try:
        import httpx
    except ImportError:
        raise BenchError("paradapt bench needs httpx: pip install 'paradapt[bench]'") from None
    return httpx


def bench(workload: Workload, config: BenchConfig, source: str = "workload") -> TwinResult:
    """Replay ``workload`` against ``config.url``; the metrics as the twin computes them.

    Before anything is sent, ``GET /v1/models`` checks the server answers, names the base model
    (unless ``config.base_name``) and, where it says its ``max_model_len`` (paradapt, vLLM),
    every request must fit it (an error naming ``source`` and the request).

    ``extra`` holds what only a real run has: ``sent``, ``served`` and ``failed`` (status ->
    count) requests, ``input_tokens``/``output_tokens`` of the served ones, ``duration`` (the
    run's seconds) and ``mode``.
    """
    outcomes, duration = send(workload, config, source)
    return result_of(workload, config, outcomes, duration)


def send(workload: Workload, config: BenchConfig, source: str = "workload") -> tuple[dict[int, Outcome], float]:
    """Send ``workload`` as :func:`bench` does (the same checks first); each request's
    :class:`Outcome` by request id, and the run's seconds.

    :func:`bench` summarizes these; ``paradapt profile --server``
    (:mod:`paradapt.twin.server_cost`) pairs each request's client times with the engine's own.
    """
    httpx = _httpx()
    name, max_len = server_model(httpx, config)
    check_requests(workload, source, context=max_len)
    base = config.base_name or name
    t_wall = time.perf_counter()
    outcomes = asyncio.run(_run(httpx, workload, config, base))
    return outcomes, time.perf_counter() - t_wall


def _headers(config: BenchConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


def server_model(httpx, config: BenchConfig) -> tuple[str | None, int | None]:
    """The base model's name and context length (the first model ``GET /v1/models`` lists)."""
    url = config.url.rstrip("/") + "/v1/models"
    try:
        r = httpx.get(url, headers=_headers(config), timeout=httpx.Timeout(CONNECT_TIMEOUT))
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach the server at {config.url} ({type(e).__name__}: {e})") from None
    if r.status_code != 200:
        raise BenchError(f"{url} answered {r.status_code}: {r.text[:200]}")
    try:
        card = r.json()["data"][0]
        name = card["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        if config.base_name is None:
            raise BenchError(f"{url} did not list a model (give --base-name)") from None
        return None, None
    max_len = card.get("max_model_len")
    return name, max_len if is_int(max_len) and max_len > 0 else None


def _prompt(req: WorkloadRequest, config: BenchConfig) -> list[int]:
    if req.prompt is not None:
        return list(req.prompt)
    ids = range(3, max(4, config.vocab_size))
    shared = leading_ids(req, config.seed, ids)
    rng = random.Random(f"{config.seed}:{req.id}")
    return shared + [rng.randrange(ids.start, ids.stop) for _ in range(req.prompt_len - len(shared))]


async def _run(httpx, workload: Workload, config: BenchConfig, base: str) -> dict[int, Outcome]:
    reqs = workload.requests
    outcomes: dict[int, Outcome] = {}
    limits = httpx.Limits(max_connections=config.concurrency or None, max_keepalive_connections=None)
    timeout = httpx.Timeout(config.timeout, connect=CONNECT_TIMEOUT)
    bar = _bar(len(reqs), config.progress)
    t0 = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - t0

    async with httpx.AsyncClient(base_url=config.url.rstrip("/"), limits=limits, timeout=timeout) as client:

        async def one(req: WorkloadRequest) -> None:
            out = outcomes[req.id] = Outcome(sent=now())
            try:
                await _send(httpx, client, req, config, base, out, now)
            finally:
                bar.update(1)

        if config.concurrency:
            queue = list(reversed(reqs))

            async def worker() -> None:
                while queue:
                    await one(queue.pop())

            await asyncio.gather(*(worker() for _ in range(config.concurrency)))
        else:
            stop = None if config.drain is None else workload.duration + config.drain

            async def at_arrival(req: WorkloadRequest) -> None:
                await asyncio.sleep(max(0.0, req.arrival - now()))
                await one(req)

            tasks = [asyncio.ensure_future(at_arrival(r)) for r in reqs]
            if stop is None:
                await asyncio.gather(*tasks)
            else:
                _, pending = await asyncio.wait(tasks, timeout=max(0.0, stop - now()))
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
    bar.close()
    return outcomes


async def _send(httpx, client, req, config: BenchConfig, base: str, out: Outcome, now) -> None:
    body = {
        "model": req.adapter if req.adapter is not None else base,
        "prompt": _prompt(req, config),
        "max_tokens": req.output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage = None
    try:
        async with client.stream("POST", "/v1/completions", json=body, headers=_headers(config)) as r:
            if r.status_code != 200:
                await r.aread()
                out.status = str(r.status_code)
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out.status = "stream_error"
                    return
                if chunk.get("choices"):
                    out.chunks.append(now())
                    out.text += chunk["choices"][0].get("text") or ""
                if chunk.get("usage"):
                    usage = chunk["usage"].get("completion_tokens")
                    out.cached = _cached_tokens(chunk["usage"])
            else:
                out.status = "stream_error"  # the stream ended without [DONE]
                return
    except asyncio.CancelledError:
        out.status = "unfinished"
        raise
    except httpx.HTTPError:
        out.status = "transport_error"
        return
    except (ValueError, TypeError, AttributeError, KeyError):  # a malformed chunk (JSONDecodeError is a ValueError)
        out.status = "bad_response"
        return
    out.tokens = usage if isinstance(usage, int) else len(out.chunks)
    if not out.chunks or out.tokens == 0:
        out.status = "stream_error"


def _cached_tokens(usage: dict) -> int:
    """``usage.prompt_tokens_details.cached_tokens`` (OpenAI's, paradapt's), 0 where a server
    does not report it."""
    details = usage.get("prompt_tokens_details")
    n = details.get("cached_tokens") if isinstance(details, dict) else None
    return n if is_int(n) and n >= 0 else 0


def result_of(
    workload: Workload, config: BenchConfig, outcomes: dict[int, Outcome], duration: float
) -> TwinResult:
    """The run as a :class:`ReplayLog` of token events, summarized by the twin's code (what
    :func:`bench` returns; for a caller of :func:`send` that also wants each outcome)."""
    window = duration if config.concurrency else workload.duration
    stop = float("inf") if config.drain is None or config.concurrency else workload.duration + config.drain
    log = ReplayLog(workload, window, stop)
    events: list[StepEvent] = []
    failed: Counter[str] = Counter()
    served_in = served_out = cached = 0
    for req in workload.requests:
        o = outcomes.get(req.id)
        if o is None or o.status != "ok":
            failed[o.status if o is not None else "unsent"] += 1
            continue
        rid = f"w{req.id}"
        # latencies count from the send; the served tokens are what the server says it generated
        log.requests[rid] = replace(req, arrival=o.sent, output_len=o.tokens)
        log.first[rid], log.finished[rid] = o.chunks[0], o.chunks[-1]
        times = o.chunks + [o.chunks[-1]] * max(0, o.tokens - len(o.chunks))  # several tokens in a chunk
        for i, t in enumerate(times[: o.tokens]):
            events.append(StepEvent(t, ((rid, req.prompt_len),) if i == 0 else (), (rid,)))
        served_in += req.prompt_len
        served_out += o.tokens
        cached += o.cached
    log.steps = sorted(events, key=lambda e: e.end)
    log.wall_seconds = duration
    result = summarize(log, config.slo_ttft, config.slo_tpot)
    result.steps = 0  # a client sees no engine steps
    result.extra.update(
        {
            "mode": f"closed loop, concurrency {config.concurrency}" if config.concurrency else "open loop",
            "sent": len(outcomes),
            "served": len(log.finished),
            "failed": dict(sorted(failed.items())),
            "input_tokens": served_in,
            "cached_input_tokens": cached,
            "output_tokens": served_out,
            "duration": duration,
        }
    )
    return result


def table(result: TwinResult) -> str:
    """The twin's table plus what only a real run has (requests sent, served, failed by status)."""
    e = result.extra
    failed = ", ".join(f"{n} x {s}" for s, n in e.get("failed", {}).items()) or "none"
    lines = [
        f"mode                {e.get('mode')}; {e.get('sent')} sent, {e.get('served')} served, failed: {failed}",
        f"tokens served       {e.get('input_tokens')} in ({e.get('cached_input_tokens', 0)} from the prefix cache), "
        f"{e.get('output_tokens')} out in {e.get('duration', 0):.2f} s",
        f"TTFT / TPOT p99     {result.ttft_p99:.3f} s / {1e3 * result.tpot_p99:.1f} ms",
        result.table(),
    ]
    return "\n".join(lines)


def _bar(total: int, enabled: bool) -> Any:
    """A tqdm progress bar over requests done (a no-op object when disabled or tqdm is missing)."""
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, unit="req", desc="bench", leave=False)
        except ImportError:
            pass

    class _Off:
        def update(self, n: int) -> None: ...
        def close(self) -> None: ...

    return _Off()
