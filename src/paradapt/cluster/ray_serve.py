"""``paradapt serve --replicas N``: N paradapt engines as Ray Serve replicas behind one endpoint.

The only module that imports Ray (the ``cluster`` extra, ``ray[serve]``); ``paradapt serve``
imports it only with ``--replicas``. It is part of the HTTP layer (tests/test_layout.py): it
answers HTTP through Ray Serve's proxy and forwards each request, whole, to a replica's own
FastAPI app (:func:`paradapt.serve.app.create_app`), so every endpoint, error shape, stream
and security check is the single-process server's own code, not a copy.

Design: one deployment per replica, and an ingress deployment that holds our router.

* Our router (:class:`~paradapt.cluster.router.AdapterRouter`) must decide which replica serves
  each request. A Ray Serve ``DeploymentHandle`` addresses a *deployment*; Ray's own request
  router then picks one of its replicas (power of two choices by default; docs: "Deployment
  handles", "Use Custom Algorithm for Request Routing"). No public handle option names one
  replica (``handle.options`` takes ``method_name``, ``multiplexed_model_id``, ``stream``, ...).
* Ray's custom request router (``RequestRouterConfig(request_router_class=...)``, replica stats
  from ``record_routing_stats()``, default period ``request_routing_stats_period_s=10`` s) would
  put the decision inside Ray, but that API is marked alpha ("may change before becoming
  stable", Ray 2.60 docs), runs one router instance per handle/proxy, and decides on stats that
  are seconds old, which is one of the complaints the router was built against.
* So each engine is its own deployment with one replica (``replica-0`` ... ``replica-N-1``),
  and the ingress (one replica, so one router and one memory of placements) holds a handle to
  each: choosing a handle is choosing a replica. Ray still restarts a replica that dies, keeps
  the handles pointing at its new actor, and streams through ``handle.options(stream=True)``
  (a ``DeploymentResponseGenerator``, iterated with ``async for`` inside a deployment).

The router's input: every replica's own :func:`~paradapt.cluster.state.replica_state` (taken on
its engine thread), polled by the ingress every :data:`REPORT_EVERY_S` seconds, with the queue
raised to what the ingress itself has in flight there (exact and current, where the report may
be half a second old). Requests for the base model balance freely. ``model`` names the ingress
does not know as an adapter (from the replicas' reports: the adapter root's folders and the
served adapters) balance freely too, so garbage names never enter the router's memory; the
replica answers them with its own 404.

Ray facts relied on (Ray 2.60.0): ``ray.init(include_dashboard=False, num_cpus=...,
object_store_memory=...)`` starts a local instance (``address=...`` joins one);
``serve.start(http_options={"host": ..., "port": ...}, proxy_location="HeadOnly")`` puts the one
HTTP proxy on that address; a deployment's ``__call__`` receives a Starlette ``Request`` and may
return a Starlette ``Response``/``StreamingResponse`` (docs: "Set Up FastAPI and HTTP"); bound
deployments passed in a list to ``.bind()`` arrive as ``DeploymentHandle`` objects;
``max_ongoing_requests`` defaults to 5 per replica (raised here: the engine batches hundreds);
Serve calls a replica's ``__del__`` when it stops it (the engine drains there). Ray's internal
gRPC ports listen on every interface whatever the HTTP host (seen with ``ss -ltnp``): firewall
a machine that runs it (docs/cluster.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..serve.protocol import error_event, error_response
from .broadcast import AdminCall, ReplicaAnswer, admin_op, settle, undo_plan
from .metrics import IngressCounts, cluster_metrics
from .router import NoReplicaError, Router, make_router
from .state import ReplicaState, replica_state

log = logging.getLogger(__name__)

#: Seconds between the ingress's polls of every replica's state (the router's residency input).
REPORT_EVERY_S = 0.5
#: Requests Ray lets into one replica at once. Ray's default is 5, which would cap each engine's
#: continuous batch at 5 requests; the engine bounds its own queue (``--queue-bound``, 429).
MAX_ONGOING = 4096
#: The response header naming the replica that served a request (tests and operators read it).
REPLICA_HEADER = "x-paradapt-replica"
#: Requests every replica must see (cluster-wide admin): (method, path or path prefix).
_BROADCAST = (
    ("POST", "/v1/adapters"),
    ("DELETE", "/v1/adapters/"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
)
#: What a handle raises when its replica is gone: its actor died (``ActorDiedError``) or cannot
#: be reached (``ActorUnavailableError``; both ``RayActorError``), or Serve found the replica it
#: picked no longer running when sending (``ReplicaUnavailableError``). A request that failed so
#: before the client got anything is re-sent once to another replica.
LOST = (RayActorError, ReplicaUnavailableError)
_HOP_HEADERS = {b"content-length", b"transfer-encoding", b"connection", b"x-request-id"}


# -- what crosses between the ingress and a replica (picklable) --------------------------------------


@dataclass(frozen=True)
class Forwarded:
    """One HTTP request as the ingress hands it to a replica: the parts an ASGI scope needs."""

    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    client: tuple[str, int] | None = None

    def scope(self) -> dict:
        """The ASGI HTTP scope of this request, as the replica's app would get it from uvicorn."""
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": self.query_string,
            "headers": list(self.headers),
            "client": self.client,
            "server": None,
        }


@dataclass(frozen=True)
class Head:
    """A replica's response status and headers: the first item its forwarded stream yields."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


@dataclass(frozen=True)
class ReplicaReport:
    """What a replica tells the ingress each poll: its routing snapshot, the base model's served
    name, and the adapters it can serve (folders under the root, plus ones loaded by path)."""

    state: ReplicaState
    base: str
    adapters: frozenset[str]


def forwarded(request: Request, body: bytes) -> Forwarded:
    """The picklable form of ``request`` (its body already read)."""
    scope = request.scope
    client = tuple(scope["client"]) if scope.get("client") else None
    return Forwarded(
        method=scope["method"],
        path=scope["path"],
        query_string=scope.get("query_string", b""),
        headers=tuple((bytes(k), bytes(v)) for k, v in scope["headers"]),
        body=body,
        client=client,  # type: ignore[arg-type]
    )


async def call_asgi(app: Callable, request: Forwarded) -> AsyncIterator[Head | bytes]:
    """Run ``request`` through the ASGI ``app`` in this process: yield its :class:`Head`, then
    its body chunks as the app sends them (an SSE stream chunk by chunk).

    Why in-process ASGI and not an HTTP hop to a uvicorn per replica: no second port per replica,
    and the app's own code (validation, errors, streaming, cancellation on disconnect) runs as is.
    Closing this generator early (the client went away) cancels the app's handler, which takes
    its requests back from the engine.
    """
    sent: asyncio.Queue = asyncio.Queue()
    finished = asyncio.Event()
    body_given = False

    async def receive() -> dict:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await finished.wait()  # the client "disconnects" once the response is complete
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.put_nowait(message)

    task = asyncio.ensure_future(app(request.scope(), receive, send))
    task.add_done_callback(lambda _: sent.put_nowait(None))
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                yield Head(
                    message["status"], tuple((bytes(k), bytes(v)) for k, v in message.get("headers", []))
                )
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    finished.set()
        task.result()  # an exception the app let through (its Guard answers most with a 500)
    finally:
        finished.set()
        if not task.done():
            task.cancel()


# -- the replica -------------------------------------------------------------------------------------


class ReplicaServer:
    """One paradapt engine with its FastAPI app, in one Ray actor (one deployment's one replica).

    ``build`` makes the app in this process, the way ``paradapt serve`` does (the CLI passes
    :func:`paradapt.cli.serve.build_server_app` with the flags): the model loads here, not in
    the driver, and each replica has its own engine thread.
    """

    def __init__(
        self,
        name: str,
        build: Callable[[], tuple[Any, dict]],
        drain_s: float = 30.0,
        warm: Sequence[str] = (),
    ):
        self.name, self.drain_s = name, drain_s
        self.app, _ = build()
        self.loop = self.app.state.loop  # the EngineLoop create_app started
        self.engine = self.loop.engine
        self.warmed = self._warm(warm)

    def _warm(self, adapters: Sequence[str]) -> list[str]:
        """Read this replica's planned adapters (``--placement``, hottest first) into host memory
        before serving: as many as the cache serves, coldest first, so the hottest are the most
        recently used. One that fails to load is logged and left to load on demand."""
        room = getattr(getattr(self.engine, "cache", None), "max_served", len(adapters))
        done = []
        for name in reversed(list(adapters)[:room]):
            try:
                self.loop.call(self.engine.load_adapter, name)
                done.append(name)
            except Exception as e:  # a broken folder fails its own requests later, with its message
                log.warning("replica %s: planned adapter %r not loaded ahead (%s)", self.name, name, e)
        return done

    async def forward(self, request: Forwarded) -> AsyncIterator[Head | bytes]:
        """Serve one forwarded request through the app: a :class:`Head`, then body chunks."""
        async for part in call_asgi(self.app, request):
            yield part

    async def report(self) -> ReplicaReport:
        """This replica's routing snapshot, read on the engine thread (between two steps)."""
        state = await self.loop.acall(replica_state, self.name, self.engine)
        served = await self.loop.acall(self.engine.served_adapters)
        folders = await asyncio.to_thread(self.engine.store.names)  # the disk, off the event loop
        return ReplicaReport(state, self.app.state.model_name, frozenset(folders) | frozenset(served))

    async def restore(self, name: str, path: str) -> None:
        """Serve the folder ``path`` as ``name`` again, as vLLM's ``load_lora_adapter`` does: the
        ingress re-applies an alias this replica lost (Ray restarted it, so it started with its
        adapter root's folders only). An actor method, not a route: only the ingress calls it."""
        await self.loop.acall(self.engine.store.alias, name, path)
        await self.loop.acall(self.engine.load_adapter, name)

    def __del__(self) -> None:
        """Ray Serve stops the replica: let running requests finish (up to ``drain_s``), then stop
        the engine thread (the single-process server does the same on SIGTERM)."""
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.shutdown(drain=True, timeout=self.drain_s)
            if loop.metrics.request_log is not None:  # --request-log: write what is queued
                loop.metrics.request_log.close()


# -- the ingress -------------------------------------------------------------------------------------


def _broadcast(request: Forwarded) -> bool:
    """Is this cluster-wide admin (every replica must load or unload the adapter)?"""
    return any(
        request.method == m and (request.path == p or (p.endswith("/") and request.path.startswith(p)))
        for m, p in _BROADCAST
    )


def _model_of(request: Forwarded) -> str | None:
    """The ``model`` field of a JSON POST body (None for anything else: it balances freely)."""
    if request.method != "POST" or not request.body:
        return None
    try:
        body = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        return None
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


def _preamble(chunk: bytes) -> bool:
    """Is this SSE chunk no output yet: chat's opening role delta (``{"role": "assistant"}``, with
    empty ``token_ids`` when asked), for every choice? Anything else (text, a finish reason, an
    error, usage, [DONE]) is output, and so is what this does not recognise (then it is relayed
    as soon as read, as before)."""
    for event in chunk.split(b"\n\n"):
        event = event.strip()
        if not event:
            continue
        if not event.startswith(b"data: {"):
            return False
        try:
            obj = json.loads(event[6:])
        except (ValueError, UnicodeDecodeError):
            return False
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if not choices or "error" in obj or not isinstance(choices, list):
            return False
        for c in choices:
            delta = c.get("delta") if isinstance(c, dict) else None
            if (
                not isinstance(delta, dict)
                or not set(delta) <= {"role", "token_ids"}
                or delta.get("token_ids")
            ):
                return False
            if c.get("finish_reason") is not None or "text" in c:
                return False
    return True


async def _until_output(gen) -> tuple[list[bytes], bool]:
    """Read a stream's chunks up to and including its first output (:func:`_preamble`): the
    chunks read, and whether the stream ended meanwhile."""
    early: list[bytes] = []
    while True:
        try:
            chunk = await gen.__anext__()
        except StopAsyncIteration:
            return early, True
        early.append(chunk)
        if not _preamble(chunk):
            return early, False


def _response_headers(head: Head, replica: str) -> dict[str, str]:
    """The replica's headers for the client, less the hop-by-hop ones (Starlette sets the length,
    Ray's proxy its own request id), plus which replica served."""
    out = {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers if k.lower() not in _HOP_HEADERS}
    out[REPLICA_HEADER] = replica
    return out


class Ingress:
    """The one HTTP entry: routes each request to a replica with ``router`` and relays the answer.

    One replica of this deployment, so one router: its memory of where it sent each adapter
    (the sticky rule) is the whole cluster's.
    """

    def __init__(
        self,
        replicas: Sequence[Any],
        names: Sequence[str],
        router: Router | str = "adapter",
        placement: Sequence[Sequence[str]] | None = None,
    ):
        self.handles = dict(zip(names, replicas, strict=True))
        self.router = make_router(router) if isinstance(router, str) else router
        if placement is not None:  # a planned placement: start from its map (docs/cluster.md)
            self.router.preplace(dict(zip(names, placement, strict=True)))
        self.reports: dict[str, ReplicaReport] = {}
        self.unreachable: set[str] = set()  # replicas whose last report failed
        self.inflight: Counter[str] = Counter()  # requests this ingress has open on each replica
        self.routed: Counter[str] = Counter()  # requests sent to each replica (for /metrics)
        self.retries = 0
        self.sources: dict[str, str] = {}  # vLLM aliases loaded on every replica: name -> lora_path
        self._polled = -1e9
        self._poll: asyncio.Task | None = None
        self._down_at: dict[str, float] = {}  # when each replica was last seen lost
        self._admin_busy = 0  # broadcasts in flight (replicas' adapters are changing)
        self._admin_done = 0  # broadcasts finished (a poll that saw one finish saw a changing set)
        self._unrestorable: set[tuple[str, str]] = set()  # (replica, alias) whose restore failed

    async def __call__(self, request: Request) -> Response:
        fwd = forwarded(request, await request.body())
        await self._fresh_reports()
        if _broadcast(fwd):
            return await self._broadcast(fwd)
        if fwd.method == "GET" and fwd.path == "/metrics":
            return await self._metrics(fwd)
        return await self._routed(fwd, self._adapter(_model_of(fwd)))

    async def _routed(self, fwd: Forwarded, adapter: str | None) -> Response:
        """Relay ``fwd`` to the replica the router picks; if that replica is lost before the client
        got anything (no head, or a stream with no output yet), once more on another one.

        Why only then: a request that has produced nothing is idempotent to re-send (it changed
        nothing), while a stream the client has partly read cannot be spliced with another
        replica's; it ends with an error event (:meth:`_rest`)."""
        tried: set[str] = set()
        while True:
            try:
                name = self.router.choose(adapter, self._snapshots(tried))
            except NoReplicaError as e:
                return error_response(503, f"{e}; retry later", "server_error")
            self.routed[name] += 1
            try:
                return await self._relay(name, fwd)
            except LOST as e:
                self._mark_down(name)
                tried.add(name)
                if len(tried) > 1:
                    log.warning("replica %s was lost before answering (%s) on the retry too", name, e)
                    return error_response(
                        503,
                        f"replicas {', '.join(sorted(tried))} were lost before answering; retry",
                        "server_error",
                    )
                log.warning("replica %s was lost before answering (%s); retrying elsewhere", name, e)
                self.retries += 1

    # -- routing input ---------------------------------------------------------------------------
    def _adapter(self, model: str | None) -> str | None:
        """The adapter to route by: ``model`` if some replica reports it as an adapter, else None."""
        if model is None:
            return None
        known = any(model in r.adapters and model != r.base for r in self.reports.values())
        return model if known else None

    def _snapshots(self, exclude: frozenset[str] | set[str] = frozenset()) -> list[ReplicaState]:
        """Each replica's last report, its queue at least what this ingress has open there."""
        out = []
        for name in self.handles:
            report = self.reports.get(name)
            state = report.state if report is not None else ReplicaState(name, free_slots=1)
            queued = max(state.queued, self.inflight[name] - state.running)
            alive = name not in self.unreachable and name not in exclude
            out.append(replace(state, queued=queued, alive=alive))
        return out

    async def _fresh_reports(self) -> None:
        """Poll the replicas: wait for the first poll, then refresh in the background when stale."""
        now = asyncio.get_running_loop().time()
        if not self.reports:
            await self._poll_all()
        elif now - self._polled > REPORT_EVERY_S and (self._poll is None or self._poll.done()):
            self._poll = asyncio.create_task(self._poll_all())

    async def _poll_all(self) -> None:
        """Every replica's report. A replica comes back only with a report asked for after it was
        seen lost: a poll in flight when it died may still bring its last (stale) report."""
        started = self._polled = asyncio.get_running_loop().time()
        quiet, done = self._admin_busy == 0, self._admin_done
        names = list(self.handles)
        results = await asyncio.gather(*(self._report(n) for n in names), return_exceptions=True)
        for name, result in zip(names, results, strict=True):
            if not isinstance(result, ReplicaReport):
                self._mark_down(name)
            elif self._down_at.get(name, -math.inf) < started:
                self.reports[name] = result
                self.unreachable.discard(name)
        changing = not quiet or self._admin_busy or done != self._admin_done  # an admin call meanwhile
        if not changing:
            await self._restore_aliases()

    async def _restore_aliases(self) -> None:
        """Load again, on each replica whose report lacks it, every vLLM alias loaded everywhere
        (:attr:`sources`). A replica Ray restarted knows only its adapter root's folders; without
        this, an alias would be a 404 there while the other replicas serve it. A restore that
        fails is logged once and not tried again until the alias is loaded again."""
        for name, report in self.reports.items():
            for alias, path in list(self.sources.items()):
                has = alias in report.adapters or (name, alias) in self._unrestorable
                if has or name in self.unreachable:
                    continue
                try:
                    await asyncio.wait_for(self._await(self.handles[name].restore.remote(alias, path)), 30.0)
                    log.warning("replica %s had lost adapter %r (restarted?): loaded it again", name, alias)
                except Exception as e:  # the folder went away, the replica died again...
                    self._unrestorable.add((name, alias))
                    log.warning(
                        "replica %s lacks adapter %r and loading it again failed (%s)", name, alias, e
                    )

    def _mark_down(self, name: str) -> None:
        """Route nothing more to ``name`` until a report asked for from now on arrives (Ray
        restarts a replica that died; its new actor answers the next poll)."""
        self.unreachable.add(name)
        self._down_at[name] = asyncio.get_running_loop().time()

    async def _report(self, name: str) -> ReplicaReport:
        return await asyncio.wait_for(self._await(self.handles[name].report.remote()), timeout=5.0)

    @staticmethod
    async def _await(response) -> Any:
        return await response

    # -- relaying --------------------------------------------------------------------------------
    async def _relay(self, name: str, fwd: Forwarded) -> Response:
        """Send ``fwd`` to replica ``name``: a whole response, or an SSE stream relayed chunk by
        chunk. An SSE response is held back until its first output (chat's role delta is not
        output): until then nothing reached the client, so losing the replica can be retried."""
        gen = self.handles[name].options(stream=True).forward.remote(fwd)
        self.inflight[name] += 1
        streaming = False
        try:
            head = await gen.__anext__()
            headers = _response_headers(head, name)
            if (head.header(b"content-type") or b"").startswith(b"text/event-stream"):
                early, ended = await _until_output(gen)
                streaming = True  # the stream releases the replica when it ends
                rest = self._rest(name, gen, early, ended)
                return StreamingResponse(rest, status_code=head.status, headers=headers)
            body = b"".join([chunk async for chunk in gen])
            return Response(body, status_code=head.status, headers=headers)
        except BaseException:
            gen.cancel()  # lost, or the client went away before the answer: the replica stops too
            raise
        finally:
            if not streaming:
                self.inflight[name] -= 1

    async def _rest(self, name: str, gen, early: list[bytes], ended: bool) -> AsyncIterator[bytes]:
        """A stream's chunks: those read before it was committed, then the rest. A replica lost
        mid-stream ends only this stream, with an error event naming the replica and [DONE]."""
        try:
            for chunk in early:
                yield chunk
            if not ended:
                async for chunk in gen:
                    yield chunk
        except LOST as e:
            log.warning("replica %s was lost mid-stream (%s)", name, type(e).__name__)
            self._mark_down(name)
            message = (
                f"replica {name} was lost mid-stream; the output so far is incomplete: retry the request"
            )
            yield error_event(RuntimeError(message)).encode()
            yield b"data: [DONE]\n\n"
        finally:
            self.inflight[name] -= 1
            gen.cancel()  # the client went away: the replica's handler takes its requests back

    async def _metrics(self, fwd: Forwarded) -> Response:
        """Every replica's ``/metrics``, labelled ``replica=...``, and the router's own counters
        (:mod:`paradapt.cluster.metrics`); a replica that does not answer is listed as down."""
        names = list(self.handles)
        answers = await asyncio.gather(*(self._relay(n, fwd) for n in names), return_exceptions=True)
        refused = next((a for a in answers if isinstance(a, Response) and a.status_code in (401, 403)), None)
        if refused is not None:  # the replicas' own API-key check speaks for the cluster
            return refused
        texts = {}
        for name, a in zip(names, answers, strict=True):
            if isinstance(a, Response) and a.status_code == 200:
                texts[name] = bytes(a.body).decode("utf-8", "replace")
            else:
                self._mark_down(name)
        counts = IngressCounts(
            routed=dict(self.routed),
            inflight={n: self.inflight[n] for n in names},
            up={n: n not in self.unreachable for n in names},
            retries=self.retries,
        )
        body = cluster_metrics(texts, self.router.stats, counts)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _broadcast(self, fwd: Forwarded) -> Response:
        """Admin every replica must see, all or nothing (:mod:`paradapt.cluster.broadcast`): sent
        to every replica; if it fails on any, undone where it succeeded. Success: the first
        replica's own answer. Failure: OpenAI's error naming the adapter's field and each
        replica's state (``replicas``)."""
        self._admin_busy += 1
        try:
            return await self._broadcast_once(fwd)
        finally:
            self._admin_busy -= 1
            self._admin_done += 1
            self._polled = -1e9  # the next request polls again: the set of adapters changed

    async def _broadcast_once(self, fwd: Forwarded) -> Response:
        names = list(self.handles)
        answers = await asyncio.gather(*(self._relay(n, fwd) for n in names), return_exceptions=True)
        op = admin_op(fwd.method, fwd.path, fwd.body)
        got = {n: _answer(n, a) for n, a in zip(names, answers, strict=True)}
        for name, a in zip(names, answers, strict=True):
            if isinstance(a, LOST):
                self._mark_down(name)
        if op is None:  # a body every replica refuses alike (400): nothing to undo
            first = next((a for a in answers if isinstance(a, Response)), None)
            return (
                first
                if first is not None
                else error_response(503, "no replica answered; retry", "server_error")
            )
        plan = undo_plan(op, got, self.sources)
        undone = await self._undo(plan, fwd)
        verdict = settle(op, got, plan, undone)
        if verdict.ok and op.kind == "unload":
            self.router.forget(op.adapter)
            self.sources.pop(op.adapter, None)
        elif verdict.ok and op.api == "vllm" and op.source is not None:
            self.sources[op.adapter] = op.source
        if verdict.ok:
            self._unrestorable = {(n, a) for n, a in self._unrestorable if a != op.adapter}
        if verdict.relay is not None:  # held everywhere, or changed nothing: a replica's own answer
            return answers[names.index(verdict.relay)]
        log.warning("admin %s %s held on some replicas only: %s", fwd.method, fwd.path, verdict.states)
        return JSONResponse({"error": verdict.error}, status_code=verdict.status)

    async def _undo(self, plan: dict[str, AdminCall], like: Forwarded) -> dict[str, ReplicaAnswer]:
        """Send each replica its undo request (with the original's credentials); their answers."""
        names = list(plan)
        sent = [self._relay(n, _admin_request(plan[n], like)) for n in names]
        answers = await asyncio.gather(*sent, return_exceptions=True)
        return {n: _answer(n, a) for n, a in zip(names, answers, strict=True)}


def _answer(name: str, answer: Response | BaseException) -> ReplicaAnswer:
    """A replica's relayed answer as :mod:`~paradapt.cluster.broadcast` reads it."""
    if isinstance(answer, BaseException):
        log.warning("replica %s did not answer an admin request (%s)", name, type(answer).__name__)
        return ReplicaAnswer(None)
    try:
        error = json.loads(bytes(answer.body)).get("error")
    except (ValueError, AttributeError, UnicodeDecodeError):
        error = None
    return ReplicaAnswer(answer.status_code, error if isinstance(error, dict) else None)


def _admin_request(call: AdminCall, like: Forwarded) -> Forwarded:
    """``call`` as a forwarded request carrying ``like``'s headers (its API key, Host), with its
    own JSON body and length."""
    body = call.encoded()
    kept = tuple((k, v) for k, v in like.headers if k.lower() not in (b"content-length", b"content-type"))
    headers = (*kept, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()))
    return Forwarded(call.method, call.path, b"", headers, body, like.client)


# -- the cluster -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how the replicas run. ``address``: a Ray cluster to join (None: start a local
    Ray instance, dashboard off); ``cpus_per_replica``: Ray CPUs each replica reserves (its torch
    threads); ``object_store_mb``: the local instance's object store (requests and tokens pass
    through it only in small messages)."""

    replicas: int
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None
    cpus_per_replica: float = 1.0
    object_store_mb: int = 128
    drain_s: float = 30.0
    app_name: str = "paradapt"
    router: str = "adapter"
    placement: tuple[tuple[str, ...], ...] | None = None


def replica_names(n: int) -> list[str]:
    return [f"replica-{i}" for i in range(n)]


_QUIET = {"log_level": "WARNING", "enable_access_log": False}  # paradapt's own access log stays on


def application(build: Callable[[], tuple[Any, dict]], options: ClusterOptions):
    """The Serve application: N one-replica engine deployments behind the ingress."""
    engine = serve.deployment(ReplicaServer)
    bound = [
        engine.options(
            name=name,
            num_replicas=1,
            max_ongoing_requests=MAX_ONGOING,
            ray_actor_options={"num_cpus": options.cpus_per_replica},
            graceful_shutdown_timeout_s=options.drain_s + 10,
            logging_config=_QUIET,
        ).bind(name, build, options.drain_s, options.placement[i] if options.placement else ())
        for i, name in enumerate(replica_names(options.replicas))
    ]
    ingress = serve.deployment(Ingress).options(
        name="ingress",
        num_replicas=1,
        max_ongoing_requests=MAX_ONGOING,
        ray_actor_options={"num_cpus": 0},
        logging_config=_QUIET,
    )
    return ingress.bind(bound, replica_names(options.replicas), options.router, options.placement)


class RayCluster:
    """Start Ray (or join it), run the application on ``options.host:options.port``, stop it all.

    ``stop`` on a local instance shuts Serve and Ray down (every process Ray started ends); on a
    joined cluster it deletes only this application and disconnects.
    """

    def __init__(self, build: Callable[[], tuple[Any, dict]], options: ClusterOptions):
        self.build, self.options = build, options
        self.local = options.address is None
        self.started = False

    def start(self) -> None:
        o = self.options
        if self.local:
            ray.init(
                num_cpus=max(1, int(o.replicas * o.cpus_per_replica + 0.999)),
                include_dashboard=False,
                object_store_memory=o.object_store_mb * 1024 * 1024,
                logging_level=logging.WARNING,
            )
        else:
            ray.init(address=o.address, logging_level=logging.WARNING)
        self.started = True
        serve.start(
            proxy_location="HeadOnly",
            http_options={"host": o.host, "port": o.port},
            logging_config=_QUIET,
        )
        serve.run(application(self.build, o), name=o.app_name, route_prefix="/")

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        try:
            if self.local:
                serve.shutdown()
            else:
                serve.delete(self.options.app_name)
        finally:
            ray.shutdown()

    def __enter__(self) -> RayCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
