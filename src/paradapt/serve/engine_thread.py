"""The server's engine thread: one thread steps the engine and runs every command between steps.

HTTP handlers never touch the engine themselves: they queue commands (:meth:`EngineLoop.call`,
:meth:`~EngineLoop.acall`, :meth:`~EngineLoop.post`) that the engine thread runs between two
steps, and receive each request's tokens through an asyncio queue fed from the engine's
``on_token`` (:meth:`EngineLoop.watch`). The thread also feeds the server's
:class:`~paradapt.serve.metrics.ServerMetrics`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING

from ..errors import ParadaptError
from .metrics import ServerMetrics

if TYPE_CHECKING:
    from .engine import EncoderEngine, Engine, RequestHandle
    from .sampling import SamplingParams

log = logging.getLogger(__name__)



class EngineStoppedError(ParadaptError, RuntimeError):
    """The engine thread has stopped (the server is shutting down): a new request would be
    queued in an engine that nothing steps and wait forever, so it is refused (the API's 503)."""

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
        self.metrics = ServerMetrics()
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

    # -- requests (commands the HTTP handlers queue) --------------------------------------------
    async def generate(
        self, ids: list[int], adapter: str | None, params: SamplingParams, q: asyncio.Queue
    ) -> RequestHandle:
        """Queue a generation; its tokens and a final ``done`` arrive on ``q`` (see :meth:`watch`)."""
        self._check_open()
        return await self.acall(self._add_decoder, ids, adapter, params, asyncio.get_running_loop(), q)

    async def encode(
        self, ids: list[list[int]], adapter: str | None, task: str, queues: list[asyncio.Queue]
    ) -> list[RequestHandle]:
        """Queue every text as one command: they join the same step, and a refusal (429) of a
        later text takes the earlier ones back before anything else runs."""
        self._check_open()
        aloop = asyncio.get_running_loop()
        return await self.acall(self._add_encoders, ids, adapter, task, aloop, queues)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineStoppedError("the server is shutting down and takes no new requests; retry elsewhere")

    def release(self, handles: list[RequestHandle]) -> None:
        """Stop tracking ``handles`` (cancel the unfinished ones); does not wait."""
        self.post(self._discard, handles)

    def _add_decoder(self, ids, adapter, params, aloop, q) -> RequestHandle:
        def on_token(h: RequestHandle, tok: int) -> None:
            self.metrics.count_token()
            self.push(h.id, ("token", tok))

        h = self.engine.add_request(ids, adapter, params, on_token=on_token)
        self.watch(h.id, aloop, q)
        return h

    def _add_encoders(self, ids: list[list[int]], adapter, task, aloop, queues) -> list[RequestHandle]:
        """Queue every text or none: a refusal takes back the ones queued before it."""
        handles: list[RequestHandle] = []
        try:
            for one, q in zip(ids, queues, strict=True):
                h = self.engine.add_request(one, adapter, task=task)
                handles.append(h)
                self.watch(h.id, aloop, q)
        except BaseException:
            self._discard(handles)
            raise
        return handles

    def _discard(self, handles: list[RequestHandle]) -> None:
        for h in handles:
            self.engine.discard(h.id)

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
        self.metrics.end_step()
        self._notify_done()

    def watch(self, rid: str, loop: asyncio.AbstractEventLoop, q: asyncio.Queue) -> None:
        """Deliver ``("token", t)`` items and a final ``("done", None)`` for ``rid`` to ``q``."""
        self._done_waiters[rid] = (loop, q)

    def push(self, rid: str, item) -> None:
        w = self._done_waiters.get(rid)
        if w is not None:
            w[0].call_soon_threadsafe(w[1].put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        """End every running and queued request with ``error`` (their clients get a 500)."""
        try:
            self.engine.fail_all(error)
        except Exception:
            log.exception("could not fail the requests")

    def _notify_done(self) -> None:
        for rid in [
            r for r in self._done_waiters if self.engine.handles.get(r) is None or self.engine.handles[r].done
        ]:
            h = self.engine.handles.get(rid)
            if h is not None and h.status == "finished":
                self.metrics.observe(h)
            self.push(rid, ("done", None))
            del self._done_waiters[rid]

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

    def drain(self, timeout: float) -> None:
        """Let running and queued requests finish for up to ``timeout`` s, then cancel the rest:
        their handlers answer at once (503 in OpenAI's shape; streams ``finish_reason: "abort"``
        and ``[DONE]``), while the HTTP server still waits for them (SIGTERM: ``paradapt serve``
        calls this as the signal arrives, not after uvicorn has given up on the connections)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.call(self.engine.has_work):
            time.sleep(0.01)
        self.call(self._cancel_all)

    def shutdown(self, drain: bool = False, timeout: float = 30.0) -> None:
        """Stop the thread; with ``drain`` first let running requests finish (up to ``timeout`` s)."""
        self.drain(timeout if drain else 0.0)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
