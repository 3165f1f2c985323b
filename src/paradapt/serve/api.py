"""OpenAI-compatible HTTP API over an :class:`~paradapt.serve.engine.Engine` (FastAPI).

``model`` in a request is an adapter name (a folder under the adapter root) or the base
model's name. One background thread steps the engine and runs every command handlers queue
for it between steps (:class:`EngineLoop`); handlers receive tokens through per-request
asyncio queues (fed from the engine's ``on_token``).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (decoders; ``stream`` over SSE), ``POST /classify`` and
``POST /v1/embeddings`` (encoders), ``POST /v1/adapters`` / ``DELETE /v1/adapters/{name}``,
``GET /metrics`` (Prometheus text). Errors: 400 bad parameters (naming the field), 404
unknown adapter, 409 adapter in use, 422 adapter folder that fails to load, 429 queue full.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from ..errors import AdapterNotFoundError, ConfigError, ParadaptError
from .cache import AdapterPinnedError
from .engine import AdapterLoadError, EncoderEngine, Engine, RequestHandle, check_token_ids, max_positions
from .sampling import SamplingParams
from .scheduler import QueueFullError, RequestTooLargeError

log = logging.getLogger(__name__)

# -- the engine thread ----------------------------------------------------------------------


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count) in plain Python."""

    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_, buckets
        self.counts = [0] * len(buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def text(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        lines += [
            f'{self.name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)
        ]
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum}"]
        lines.append(f"{self.name}_count {self.count}")
        return "\n".join(lines) + "\n"


_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW = 10.0  # seconds over which the tokens/s gauge averages


class TokenRate:
    """Generated tokens per second over the last ``window`` seconds (a gauge that decays when idle)."""

    def __init__(self, window: float = RATE_WINDOW, clock=time.monotonic):
        self.window, self.clock = window, clock
        self.started = clock()
        self.points: collections.deque[tuple[float, int]] = collections.deque([(self.started, 0)])

    def record(self, total: int) -> None:
        """Note the running total after a step; keeps one point older than the window as its anchor."""
        now = self.clock()
        self.points.append((now, total))
        while len(self.points) > 1 and self.points[1][0] <= now - self.window:
            self.points.popleft()

    def rate(self, total: int) -> float:
        now = self.clock()
        start = max(now - self.window, self.started)
        anchor = 0
        for t, n in self.points:  # the last total recorded at or before the window's start
            if t > start:
                break
            anchor = n
        return (total - anchor) / (now - start) if now > start else 0.0


class EngineLoop:
    """Steps an engine in its own thread; handlers reach the engine only through that thread.

    Why a command queue and not a lock: a handler that took a lock around the engine ran on
    the event loop and blocked it for up to a whole step, and the engine thread took the lock
    straight back after each step (locks are not fair), so over HTTP requests joined about one
    per step and tokens left in bursts. Now ``acall`` (event loop), ``call`` (other threads)
    and ``post`` (fire and forget) queue commands; the thread runs every pending command
    between two steps, so all requests that arrived during a step join the next one.
    """

    def __init__(self, engine: Engine | EncoderEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._gate = threading.Lock()  # orders "closed" against submissions
        self._closed = False
        self._wake = threading.Event()
        self._stop = False
        self._done_waiters: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.tokens_out = 0
        self.token_rate = TokenRate()
        self.ttft = Histogram("paradapt_time_to_first_token_seconds", "queued to first token", _BUCKETS)
        self.tpot = Histogram("paradapt_time_per_output_token_seconds", "mean gap between tokens", _BUCKETS)
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="paradapt-engine", daemon=True)
        self._thread.start()

    # -- commands -----------------------------------------------------------------------------
    def call(self, fn, *args, **kwargs):
        """Run ``fn`` on the engine thread between steps and return its result (blocks the caller:
        never use it on the event loop, use ``acall``)."""
        fut = self._submit(fn, args, kwargs)
        return fn(*args, **kwargs) if fut is None else fut.result()

    async def acall(self, fn, *args, **kwargs):
        """``call`` for coroutines: waits for the engine thread without blocking the event loop."""
        fut = self._submit(fn, args, kwargs)
        return fn(*args, **kwargs) if fut is None else await asyncio.wrap_future(fut)

    def post(self, fn, *args, **kwargs) -> None:
        """Queue ``fn`` without waiting for it (cancellations from ``finally`` blocks)."""
        if self._submit(fn, args, kwargs) is None:
            fn(*args, **kwargs)

    def _submit(self, fn, args, kwargs) -> concurrent.futures.Future | None:
        """Queue a command; None when the engine thread is gone or is the caller (run it inline)."""
        if threading.current_thread() is self._thread:
            return None
        with self._gate:
            if self._closed:
                return None
            fut: concurrent.futures.Future = concurrent.futures.Future()
            self._inbox.put((fn, args, kwargs, fut))
        self._wake.set()
        return fut

    def _drain(self) -> None:
        """Run every queued command in arrival order, answering each through its future."""
        while True:
            try:
                fn, args, kwargs, fut = self._inbox.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue  # its caller stopped waiting before it ran
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # the caller re-raises it (404, 429, ...)
                fut.set_exception(e)

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop:
                self._drain()
                if self.engine.has_work():
                    self._step()
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
        finally:
            with self._gate:
                self._closed = True
            self._drain()  # answer what came in while stopping

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception as e:  # keep the thread alive: a dead loop would hang every client
            log.exception("engine step failed; failing every request")
            self._fail_all(e)
        self.token_rate.record(self.tokens_out)
        self._notify_done()

    def watch(self, rid: str, loop: asyncio.AbstractEventLoop, q: asyncio.Queue) -> None:
        """Deliver ``("token", t)`` items and a final ``("done", None)`` for ``rid`` to ``q``."""
        self._done_waiters[rid] = (loop, q)

    def push(self, rid: str, item) -> None:
        w = self._done_waiters.get(rid)
        if w is not None:
            w[0].call_soon_threadsafe(w[1].put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        """End every running and queued request with ``error`` (their clients get a 500).

        The engine catches model errors itself, so a step that raises is a bug whose state may
        repeat: stepping on would fail the same way forever while every client waits.
        """
        s = self.engine.scheduler
        try:
            self.engine._fail_requests([r.id for r in (*s.running, *s.waiting)], error)
        except Exception:
            log.exception("could not fail the requests")

    def _notify_done(self) -> None:
        for rid in [
            r for r in self._done_waiters if self.engine.handles.get(r) is None or self.engine.handles[r].done
        ]:
            h = self.engine.handles.get(rid)
            if h is not None and h.status == "finished":
                self._observe(h)
            self.push(rid, ("done", None))
            del self._done_waiters[rid]

    def _observe(self, h: RequestHandle) -> None:
        if h.first_token_at is None or h.arrival is None:
            return
        self.ttft.observe(h.first_token_at - h.arrival)
        if len(h.tokens) > 1 and h.finished_at is not None:
            self.tpot.observe((h.finished_at - h.first_token_at) / (len(h.tokens) - 1))

    def _cancel(self, rid: str) -> None:
        self.engine.cancel(rid)
        self._notify_done()

    def cancel(self, rid: str) -> None:
        """Cancel ``rid`` on the engine thread (does not wait: safe from ``finally`` on the event loop)."""
        self.post(self._cancel, rid)

    def _cancel_all(self) -> None:
        for rid, h in list(self.engine.handles.items()):
            if not h.done:
                self.engine.cancel(rid)
        self._notify_done()

    def shutdown(self, drain: bool = False, timeout: float = 30.0) -> None:
        """Stop the thread; with ``drain`` first let running requests finish (up to ``timeout`` s)."""
        end = time.monotonic() + timeout
        while drain and time.monotonic() < end and self.call(self.engine.has_work):
            time.sleep(0.01)
        self.call(self._cancel_all)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)


# -- schemas ------------------------------------------------------------------------------------


class _Sampling(BaseModel):
    """The sampling fields completions and chat share (OpenAI's names, plus vLLM's top_k/ignore_eos)."""

    model: str
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever EOS says
    n: int = Field(1, ge=1, le=1)  # one choice per request: refused, not silently ignored


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)


class TextPart(BaseModel):
    """One part of a message in OpenAI's list form; only text parts (this server serves text models)."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart]

    def text(self) -> str:
        """The content as one string (list-form text parts joined, as OpenAI's server does)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ClassifyRequest(BaseModel):
    model: str
    input: str | list[str] = Field(min_length=1)


class EmbeddingRequest(BaseModel):
    model: str
    input: str | list[str] = Field(min_length=1)


class AdapterRequest(BaseModel):
    name: str


# -- the app ------------------------------------------------------------------------------------


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": param}}
    )


def create_app(engine: Engine | EncoderEngine, *, model_name: str = "base", tokenizer=None) -> FastAPI:
    """The FastAPI app serving ``engine``; ``model_name`` is the base model's name in ``model``."""
    tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
    loop_ = EngineLoop(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # SIGTERM under uvicorn: finish running requests, cancel the rest; off the event loop,
        # which must keep delivering the draining requests' tokens
        await asyncio.to_thread(loop_.shutdown, drain=True)

    app = FastAPI(title="paradapt", lifespan=lifespan)
    app.state.loop = loop_
    app.state.model_name = model_name
    decoder = isinstance(engine, Engine)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc.errors())

    @app.exception_handler(ParadaptError)
    async def _paradapt(request: Request, exc: ParadaptError):
        name_field = "name" if request.url.path.startswith("/v1/adapters") else "model"
        if isinstance(exc, AdapterNotFoundError):
            return _error(404, str(exc), "not_found_error", name_field)
        if isinstance(exc, QueueFullError):
            return _error(429, str(exc), "rate_limit_error")
        if isinstance(exc, AdapterPinnedError):
            return _error(409, str(exc), "conflict_error", "name")
        if isinstance(exc, AdapterLoadError):
            return _error(422, str(exc), "adapter_load_error", name_field)
        if isinstance(exc, (ConfigError, RequestTooLargeError)):
            field = getattr(exc, "field", None)
            if field == "adapter":
                field = name_field
            elif field in ("prompt", "tokens") and not decoder:
                field = "input"  # the encoder endpoints' name for the texts
            return _error(400, str(exc), "invalid_request_error", field)
        return _error(500, str(exc), "server_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: still an OpenAI-shaped 500
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    def adapter_of(model: str) -> str | None:
        return None if model == model_name else model

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        root = engine.store.root
        names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root is not None else []
        names = sorted(set(names) | loop_.call(lambda: set(engine.cache.on_host)))
        card = {"object": "model", "created": created, "owned_by": "paradapt"}  # OpenAI's Model fields
        data = [{"id": n, **card, "parent": model_name} for n in names]
        return {
            "object": "list",
            "data": [{"id": model_name, **card}, *data],
        }

    @app.post("/v1/adapters")
    def load_adapter(req: AdapterRequest) -> dict:
        loop_.call(_load, engine, req.name)
        return {"id": req.name, "object": "model", "loaded": True}

    @app.delete("/v1/adapters/{name}")
    def unload_adapter(name: str) -> dict:
        engine.store.folder(name)  # 400/404 for bad names
        loop_.call(_unload, engine, name)
        return {"id": name, "deleted": True}

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(loop_.call(_metrics, loop_))

    if decoder:

        @app.post("/v1/completions")
        async def completions(req: CompletionRequest, request: Request):
            params = _params(req.max_tokens, req)
            return await _generate(req.model, req.prompt, params, req.stream, chat=False, request=request)

        @app.post("/v1/chat/completions")
        async def chat(req: ChatRequest, request: Request):
            prompt = _chat_prompt(tokenizer, req.messages)
            params = _params(req.max_completion_tokens or req.max_tokens or 16, req)
            return await _generate(req.model, prompt, params, req.stream, chat=True, request=request)

    else:

        @app.post("/classify")
        async def classify(req: ClassifyRequest):
            texts = [req.input] if isinstance(req.input, str) else req.input
            results, _ = await _encode(req.model, texts, "classify")
            return {
                "object": "list",
                "model": req.model,
                "data": [
                    {"index": i, "label": r["label"], "probs": r["probs"]} for i, r in enumerate(results)
                ],
            }

        @app.post("/v1/embeddings")
        async def embeddings(req: EmbeddingRequest):
            texts = [req.input] if isinstance(req.input, str) else req.input
            results, n = await _encode(req.model, texts, "embed")
            data = [
                {"object": "embedding", "index": i, "embedding": r["embedding"]}
                for i, r in enumerate(results)
            ]
            return {
                "object": "list",
                "model": req.model,
                "data": data,
                "usage": {"prompt_tokens": n, "total_tokens": n},
            }

    async def _encode(model: str, texts: list[str], task: str) -> tuple[list[dict], int]:
        """Each text's result, and the token count; every text is checked before any is queued."""
        ids = [_tokens(tokenizer, t) for t in texts]
        for i, one in enumerate(ids):
            if max_len is not None and len(one) > max_len:
                raise ConfigError(
                    "input", f"text {i} has {len(one)} tokens, over the model's {max_len} positions"
                )
        aloop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in ids]
        # one command for every text: they join the same step, and a refusal (429) of a later
        # text takes the earlier ones back before anything else runs
        handles = await loop_.acall(_add_encoders, engine, ids, adapter_of(model), task, loop_, aloop, queues)
        try:
            for q in queues:
                while (await q.get())[0] != "done":
                    pass
        finally:  # also when the client goes away: nothing stays queued or tracked
            loop_.post(_drop, engine, handles)
        for h in handles:
            if h.error is not None:
                raise h.error
        return [h.result for h in handles], sum(map(len, ids))

    max_len = max_positions(engine.model)

    async def _generate(
        model: str, prompt, params: SamplingParams, stream: bool, chat: bool, request: Request
    ):
        if isinstance(prompt, str):
            ids = _tokens(tokenizer, prompt)
        else:
            ids = list(prompt)
            check_token_ids(engine.model, ids, "prompt")
        _check_positions(len(ids), params.max_new_tokens, max_len)
        aloop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        h = await loop_.acall(_add_decoder, engine, ids, adapter_of(model), params, loop_, aloop, q)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if stream:
            return StreamingResponse(_sse(h, q, model, rid, chat), media_type="text/event-stream")
        try:
            if not await _until_done(q, request):
                return Response(status_code=499)  # nobody reads it; the request is cancelled below
        finally:
            if not h.done:  # the client went away: free its KV space and slot
                loop_.cancel(h.id)
        if h.error is not None:
            raise h.error
        loop_.post(engine.pop, h.id)
        text = h.text if h.text is not None else ""
        reason = "stop" if h.finish_reason in ("eos", "stop") else "length"
        usage = {
            "prompt_tokens": len(ids),
            "completion_tokens": len(h.tokens),
            "total_tokens": len(ids) + len(h.tokens),
        }
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": usage,
        }

    async def _sse(
        h: RequestHandle, q: asyncio.Queue, model: str, rid: str, chat: bool
    ) -> AsyncIterator[str]:
        sent = ""
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        try:
            if chat:
                yield _chunk(
                    rid,
                    obj,
                    created,
                    model,
                    {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None},
                )
            while True:
                kind, _ = await q.get()
                text = streamable(h.text or "", h.params.stop, final=kind == "done")
                if len(text) > len(sent) and text.startswith(sent):
                    delta, sent = text[len(sent) :], text
                    body = {"content": delta} if chat else None
                    choice = (
                        {"index": 0, "delta": body, "finish_reason": None}
                        if chat
                        else {
                            "index": 0,
                            "text": delta,
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    )
                    yield _chunk(rid, obj, created, model, choice)
                if kind == "done":
                    break
            if h.error is not None:
                yield f"data: {json.dumps({'error': {'message': str(h.error), 'type': 'server_error'}})}\n\n"
            else:
                reason = "stop" if h.finish_reason in ("eos", "stop") else "length"
                last = (
                    {"index": 0, "delta": {}, "finish_reason": reason}
                    if chat
                    else {
                        "index": 0,
                        "text": "",
                        "logprobs": None,
                        "finish_reason": reason,
                    }
                )
                yield _chunk(rid, obj, created, model, last)
            yield "data: [DONE]\n\n"
        finally:
            if not h.done:  # the client went away mid-stream: free its KV space and slot
                loop_.cancel(h.id)
            loop_.post(_drop, engine, [h])  # runs after the cancel: commands keep their order

    return app


def streamable(text: str, stop: tuple[str, ...], final: bool) -> str:
    """The prefix of a running request's ``text`` that a stream may send now.

    A stop string can straddle two token deltas, so the longest tail of ``text`` that could
    still grow into a stop string (at most ``len(longest stop) - 1`` characters) is held back
    until the next token shows it cannot, as vLLM does; a stop string already present cuts the
    text there (the engine is about to end the request). A trailing U+FFFD is held back too: it
    is half a multi-byte character whose next byte token replaces it. Once the request is done
    (``final``) its text is the engine's, already cut at the stop string.
    """
    if final:
        return text
    cuts = [i for s in stop if (i := text.find(s)) >= 0]
    if cuts:
        return text[: min(cuts)]
    held = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return text[: len(text) - held].rstrip("\ufffd")


async def _until_done(q: asyncio.Queue, request: Request, poll: float = 0.25) -> bool:
    """Wait for the request's ``done``; False as soon as its client has disconnected.

    Starlette does not cancel a handler whose client went away, so a non-streamed request
    would otherwise generate to the end for nobody, holding its KV pages and adapter slot.
    """
    check = time.monotonic() + poll
    get: asyncio.Future | None = None
    while True:
        get = get or asyncio.ensure_future(q.get())
        await asyncio.wait({get}, timeout=max(0.0, check - time.monotonic()))
        if get.done():
            if get.result()[0] == "done":
                return True
            get = None  # a token: keep waiting, but still look at the client every ``poll`` s
        if time.monotonic() >= check:
            if await request.is_disconnected():
                if get is not None:
                    get.cancel()
                return False
            check = time.monotonic() + poll


_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|[A-Z]\w*)$")


def _validation_error(errors: list) -> JSONResponse:
    """400 naming the bad field (``body`` when the body is missing or not JSON).

    For a union field (``content: str | list[TextPart]``) pydantic reports one error per member,
    located under the member's type (``content.str``, ``content.list[TextPart].0.type``): the
    deepest one says the most, and the type tags are not part of the field's name.
    """
    worst = max(errors, key=lambda e: len(e.get("loc", ())), default={})
    loc = [str(p) for p in worst.get("loc", ())]
    msg = worst.get("msg", "invalid")
    if worst.get("type") == "json_invalid":
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        return _error(400, f"body: not valid JSON ({msg}){where}", "invalid_request_error", "body")
    field = ".".join(p for p in loc[1:] if not _UNION_TAG.match(p)) or "body"
    return _error(400, f"{field}: {msg}", "invalid_request_error", field)


def _check_positions(prompt: int, new: int, max_len: int | None) -> None:
    if max_len is None or prompt + new <= max_len:
        return
    if prompt >= max_len:
        raise ConfigError("prompt", f"{prompt} tokens, over the model's {max_len} positions")
    raise ConfigError(
        "max_tokens",
        f"{prompt} prompt + {new} new tokens = {prompt + new}, over the model's {max_len} positions "
        f"(at most {max_len - prompt} new tokens for this prompt)",
    )


def _chunk(rid: str, obj: str, created: int, model: str, choice: dict) -> str:
    body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    return f"data: {json.dumps(body)}\n\n"


def _params(max_tokens: int, req: Any) -> SamplingParams:
    stop = () if req.stop is None else (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        stop=stop,
        ignore_eos=req.ignore_eos,
    )


def _tokens(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        raise ConfigError("prompt", "text needs the server's tokenizer; send token ids")
    return list(tokenizer(text)["input_ids"])


def _chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    """The tokenizer's chat template when it has one, else ``role: content`` lines."""
    msgs = [{"role": m.role, "content": m.text()} for m in messages]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"


def _add_decoder(engine: Engine, ids, adapter, params, loop_: EngineLoop, aloop, q) -> RequestHandle:
    def on_token(h: RequestHandle, tok: int) -> None:
        loop_.tokens_out += 1
        loop_.push(h.id, ("token", tok))

    h = engine.add_request(ids, adapter, params, on_token=on_token)
    loop_.watch(h.id, aloop, q)
    return h


def _add_encoders(
    engine: EncoderEngine, ids: list[list[int]], adapter, task, loop_: EngineLoop, aloop, queues
) -> list[RequestHandle]:
    """Queue every text or none: a refusal takes back the ones queued before it."""
    handles: list[RequestHandle] = []
    try:
        for one, q in zip(ids, queues, strict=True):
            h = engine.add_request(one, adapter, task=task)
            handles.append(h)
            loop_.watch(h.id, aloop, q)
    except BaseException:
        _drop(engine, handles)
        raise
    return handles


def _drop(engine: Engine | EncoderEngine, handles: list[RequestHandle]) -> None:
    """Stop tracking ``handles``: cancel the unfinished ones, forget them all (the engine keeps a
    handle until a server pops it)."""
    for h in handles:
        if not h.done:
            engine.cancel(h.id)
        if h.done:
            engine.handles.pop(h.id, None)


def _load(engine: Engine | EncoderEngine, name: str) -> None:
    """POST /v1/adapters: register ``name`` and read it into host memory now (a corrupt folder: 422)."""
    engine._register(name)
    moves = engine.cache.prefetch([name])
    if name not in engine.cache.on_host and not moves:
        raise AdapterLoadError(name, ParadaptError("no host room to load it now (it loads on demand)"))
    try:
        engine.store.settle(name)  # the prefetch reads in the background: check it now
    except AdapterLoadError as e:
        engine._fail_adapter(name, e)
        raise


def _unload(engine: Engine | EncoderEngine, name: str) -> None:
    """Forget adapter ``name``; refused (409) while running *or queued* requests name it.

    The cache alone refuses only pinned (running) adapters; a queued request for a forgotten
    adapter would make every later scheduler step fail on the unknown name.
    """
    users = sum(1 for r in (*engine.scheduler.running, *engine.scheduler.waiting) if r.adapter == name)
    if users:
        raise AdapterPinnedError(f"adapter {name!r} is in use by {users} running or queued request(s)")
    engine.cache.remove_adapter(name)


def _metrics(loop_: EngineLoop) -> str:
    """Prometheus text: queue, running, adapters resident/served, loads, tokens out.

    Runs on the engine thread (``loop_.call``), so it reads the engine between steps.
    """
    e = loop_.engine
    s = e.cache.stats
    rows = [
        ("paradapt_queue_length", "gauge", len(e.scheduler.waiting)),
        ("paradapt_running_requests", "gauge", len(e.scheduler.running)),
        ("paradapt_resident_adapters", "gauge", len(e.cache.on_device)),
        ("paradapt_served_adapters", "gauge", len(e.cache.on_host)),
        ("paradapt_adapter_device_loads_total", "counter", s.device_loads),
        ("paradapt_adapter_host_loads_total", "counter", s.host_loads + s.prefetch_loads),
        ("paradapt_adapter_evictions_total", "counter", s.device_evictions + s.host_evictions),
        ("paradapt_generated_tokens_total", "counter", loop_.tokens_out),
        (
            "paradapt_generation_tokens_per_second",
            "gauge",
            round(loop_.token_rate.rate(loop_.tokens_out), 3),
        ),
        *(
            (f"paradapt_adapter_{op}_seconds_total", "counter", round(sec, 6))
            for op, sec in sorted(e.store.seconds.items())
        ),
    ]
    hist = loop_.ttft.text() + loop_.tpot.text()
    return "".join(f"# TYPE {n} {t}\n{n} {v}\n" for n, t, v in rows) + hist
