"""What stands between the network and the API: API key, Host check, body bound, request ids,
the access log, and the one place that decides what an error may tell a client.

:class:`Guard` is a plain ASGI middleware (it never buffers a response, so streams pass
through as they are written). For every HTTP request it:

- gives it a request id (``X-Request-Id`` on the response, ``request.state.request_id``);
- refuses a ``Host`` header outside ``allowed_hosts`` (400): a server bound to loopback is
  otherwise reachable from any web page through DNS rebinding;
- requires ``Authorization: Bearer <api_key>`` on every path but ``/health`` (and ``/metrics``
  with ``metrics_without_key``), 401 otherwise, as vLLM's ``--api-key`` does;
- bounds the request body (``max_request_bytes``, 413) before anything parses it;
- answers an exception no handler took with a 500 that says ``internal error`` and the
  request id, logs the traceback under that id, and does not re-raise (Starlette's own
  500 handler re-raises, which made uvicorn drop the keep-alive connection);
- writes one access-log line when the response is done (logger ``paradapt.access``).

Client-facing messages never carry absolute paths: :func:`redact` cuts the adapter root off
and hides any other absolute path.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)
access_log = logging.getLogger("paradapt.access")

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
OPEN_PATHS = ("/health",)
QUIET_PATHS = ("/health",)  # probed every few seconds (Kubernetes): logged only when not 200


@dataclass(frozen=True)
class GuardConfig:
    """How the server meets the network (``paradapt serve``'s flags; docs/serving.md, Security).

    ``api_key``: required as ``Authorization: Bearer KEY`` everywhere but ``/health`` (None:
    no key). ``metrics_without_key``: ``/metrics`` open too (for a Prometheus scraper).
    ``allowed_hosts``: the ``Host`` header values accepted, without port (None: any).
    ``max_request_bytes``: the largest request body (None: unbounded).
    ``access_log``: one line per request on the ``paradapt.access`` logger, except answered
    ``/health`` probes unless ``access_log_health`` (a failing probe is always logged).
    """

    api_key: str | None = None
    metrics_without_key: bool = False
    allowed_hosts: tuple[str, ...] | None = None
    max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES
    access_log: bool = True
    access_log_health: bool = False


def default_allowed_hosts(bind: str) -> tuple[str, ...] | None:
    """The Host values a server bound to ``bind`` accepts by default: the loopback names when
    bound to loopback (nothing else can reach it legitimately), else any (None)."""
    if bind in ("127.0.0.1", "localhost", "::1") or bind.startswith("127."):
        return LOOPBACK_HOSTS
    return None


def _host_of(value: str) -> str:
    """``Host`` without its port: ``[::1]:8000`` -> ``[::1]``, ``localhost:80`` -> ``localhost``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _normal_host(h: str) -> str:
    h = h.strip().lower()
    return f"[{h}]" if ":" in h and not h.startswith("[") else h


class BodyTooLarge(HTTPException):
    """The request body is over ``max_request_bytes`` (413)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over the server's {limit} bytes (--max-request-bytes)")


def error_body(status: int, message: str, kind: str, param: str | None = None, code: str | None = None):
    """OpenAI's error object as bytes."""
    err = {"message": message, "type": kind, "param": param, "code": code}
    return json.dumps({"error": err}).encode()


class Guard:
    """The ASGI middleware that applies a :class:`GuardConfig` (see the module docstring)."""

    def __init__(self, app, config: GuardConfig):
        self.app, self.config = app, config
        hosts = config.allowed_hosts
        self.hosts = None if hosts is None else frozenset(_normal_host(h) for h in hosts)
        self.key = None if config.api_key is None else config.api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = f"req-{uuid.uuid4().hex[:16]}"
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        start, status = time.perf_counter(), [None]

        async def send_(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await _send_error(send_, *refusal)
                return
            try:
                await self.app(scope, self._bounded(receive, scope), send_)
            except Exception as e:  # no handler took it: a bug, answered without re-raising
                log.error("request %s %s %s: internal error", rid, scope["method"], scope["path"], exc_info=e)
                if status[0] is None:
                    await _send_error(send_, 500, f"internal error (request id {rid})", "server_error")
        finally:
            if self._logged(scope["path"], status[0]):
                _log_access(scope, state, status[0], time.perf_counter() - start, rid)

    def _logged(self, path: str, status: int | None) -> bool:
        """Whether the access log gets a line: not for health probes that answered 200 (load
        balancers and Kubernetes probe every few seconds), unless asked."""
        if not self.config.access_log:
            return False
        return self.config.access_log_health or path not in QUIET_PATHS or status != 200

    def _refusal(self, scope) -> tuple | None:
        """(status, message, type, param, code, headers) of a request refused before the app sees it."""
        headers = dict(scope.get("headers") or [])
        if self.hosts is not None:
            host = _host_of(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.hosts:
                return 400, f"Host {host!r} is not allowed (--allowed-hosts)", "invalid_request_error", None
        path = scope["path"]
        if self.key is not None and path not in OPEN_PATHS:
            if not (path == "/metrics" and self.config.metrics_without_key):
                given = headers.get(b"authorization", b"")
                scheme, _, token = given.partition(b" ")
                if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                    return (
                        401,
                        "missing or wrong API key (send Authorization: Bearer KEY)",
                        "invalid_request_error",
                        None,
                        "invalid_api_key",
                        [(b"www-authenticate", b"Bearer")],
                    )
        limit = self.config.max_request_bytes
        length = headers.get(b"content-length")
        if limit is not None and length is not None and length.isdigit() and int(length) > limit:
            return 413, BodyTooLarge(limit).detail, "invalid_request_error", "body"
        return None

    def _bounded(self, receive, scope):
        """``receive`` that raises :class:`BodyTooLarge` once the body passes the bound (a
        chunked body has no Content-Length to check up front)."""
        limit = self.config.max_request_bytes
        if limit is None:
            return receive
        seen = [0]

        async def bounded():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise BodyTooLarge(limit)
            return message

        return bounded


async def _send_error(send, status, message, kind, param=None, code=None, headers=()) -> None:
    body = error_body(status, message, kind, param, code)
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def _log_access(scope, state: dict, status: int | None, seconds: float, rid: str) -> None:
    """``METHOD PATH STATUS adapter=A tokens=N latency_ms=L id=R`` (``-`` for what is unknown;
    tokens are prompt + generated, or the texts' tokens for encoders)."""
    handles = state.get("handles") or ([state["handle"]] if state.get("handle") is not None else [])
    tokens = state.get("tokens")
    if tokens is None and handles:
        tokens = sum(len(h.prompt) + len(h.tokens) for h in handles)
    access_log.info(
        "%s %s %s adapter=%s tokens=%s latency_ms=%.1f id=%s",
        scope["method"],
        scope["path"],
        status if status is not None else "-",
        state.get("adapter") or "-",
        tokens if tokens is not None else "-",
        seconds * 1000,
        rid,
    )


# -- what an error may tell a client --------------------------------------------------------------

_ABS_PATH = re.compile(r"(?<![\w.:/])/[^\s'\"/()]+(?:/[^\s'\"/()]+)+/?")


def redact(message: str, roots: Iterable[Path | str | None] = ()) -> str:
    """``message`` without absolute paths: under an adapter root a path becomes relative to it
    (``lo/adapter.safetensors``), any other absolute path on this machine becomes ``<path>``."""
    for root in roots:
        if root is not None:
            message = message.replace(f"{root}{os.sep}", "").replace(str(root), "<adapter root>")

    def hide(m: re.Match) -> str:
        first = m.group(0).split("/")[1]
        return "<path>" if os.path.isdir(f"/{first}") else m.group(0)

    return _ABS_PATH.sub(hide, message)


def request_id(request) -> str:
    """The id :class:`Guard` gave ``request`` (``-`` outside it)."""
    return getattr(request.state, "request_id", "-")
