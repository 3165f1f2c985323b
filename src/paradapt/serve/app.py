"""OpenAI-compatible HTTP API over an :class:`~paradapt.serve.engine.Engine` (FastAPI).

``model`` in a request is an adapter name (a folder under the adapter root) or the base
model's name. One background thread steps the engine and runs every command handlers queue
for it between steps (:class:`~paradapt.serve.engine_thread.EngineLoop`); handlers receive
tokens through per-request asyncio queues (fed from the engine's ``on_token``). Handlers use
only the engine's public methods, and only through that thread (file reads of the adapter
root aside).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (decoders; ``stream`` over SSE; :mod:`~paradapt.serve.completions`),
``POST /classify`` and ``POST /v1/embeddings`` (encoders), ``POST /v1/adapters`` /
``DELETE /v1/adapters/{name}``, ``GET /metrics`` (Prometheus text), and the OpenAI/vLLM extras
of :mod:`~paradapt.serve.extras` (``/v1/models/{id}``, ``/tokenize``, ``/detokenize``,
``/version``, ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``). Errors: 400 bad parameters (naming the field), 404
unknown adapter, 403 adapter path outside the root, 409 adapter in use, 422 adapter folder that fails to load, 429 queue full.
The wire format lives in :mod:`paradapt.serve.protocol`, the metrics in
:mod:`paradapt.serve.metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from ..errors import ConfigError, ParadaptError
from ..quantized import describe, quantization
from . import completions as generation
from .engine import EncoderEngine, Engine, check_token_ids, max_positions
from .engine_thread import EngineLoop
from .extras import extra_routes
from .limits import tokenize_text
from .metrics import prometheus_text
from .protocol import (
    AdapterRequest,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
    error_response,
    paradapt_error,
    validation_error,
)
from .security import Guard, GuardConfig, redact, request_id

log = logging.getLogger(__name__)


def create_app(
    engine: Engine | EncoderEngine,
    *,
    model_name: str = "base",
    tokenizer=None,
    chat_template: str | None = None,
    guard: GuardConfig | None = None,
) -> FastAPI:
    """The FastAPI app serving ``engine``; ``model_name`` is the base model's name in ``model``;
    ``chat_template`` (Jinja text) replaces the tokenizer's for chat (``--chat-template FILE``);
    ``guard``: API key, Host check, body bound, access log (:mod:`paradapt.serve.security`)."""
    tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
    if chat_template is not None and tokenizer is None:
        raise ConfigError("chat_template", "needs the server's tokenizer")
    server = _Server(engine, EngineLoop(engine), model_name, tokenizer)
    server.chat_template = chat_template
    app = FastAPI(title="paradapt", lifespan=server.lifespan)
    app.add_middleware(Guard, config=guard or GuardConfig())
    app.state.loop = server.loop
    app.state.model_name = model_name
    _error_handlers(app, decoder=server.decoder, roots=[engine.store.root])
    app.openapi = _openapi_with_our_statuses(app)
    _admin_routes(app, server)
    extra_routes(app, server)
    if server.decoder:
        _generation_routes(app, server)
    else:
        _encoder_routes(app, server)
    return app


# -- errors -----------------------------------------------------------------------------------------


def _error_handlers(app: FastAPI, decoder: bool, roots: list) -> None:
    """Errors in OpenAI's shape; messages never carry absolute paths (``security.redact``), and an
    exception no handler takes is a 500 saying ``internal error`` and the request id
    (``security.Guard``: the traceback goes to the server log under that id)."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc.errors())

    @app.exception_handler(ParadaptError)
    async def _paradapt(request: Request, exc: ParadaptError):
        response = paradapt_error(exc, request.url.path, decoder)
        if response.status_code >= 500:
            log.error("request %s: %s", request_id(request), exc, exc_info=exc)
            return _internal(request)
        return _redacted(response, roots)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):  # unknown path, wrong method, body too large
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)


_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
            },
        }
    },
}


def _openapi_with_our_statuses(app: FastAPI):
    """FastAPI documents a 422 for bad bodies; this server answers 400 (and 404 unknown adapter,
    413 body too large; 422 means an adapter folder that fails to load): the schema says what
    the server does, in OpenAI's error shape."""
    base = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = base()
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                responses = op.get("responses", {})
                if "422" in responses:  # FastAPI's validation error: ours are 400
                    content = {"application/json": {"schema": _ERROR_SCHEMA}}
                    responses["400"] = {"description": "bad parameter (param names it)", "content": content}
                    responses["404"] = {"description": "unknown adapter or model", "content": content}
                    responses["413"] = {"description": "request body too large", "content": content}
                    responses["422"] = {"description": "adapter folder that fails to load", "content": content}
        app.openapi_schema = schema
        return schema

    return openapi


def _internal(request: Request) -> JSONResponse:
    return error_response(500, f"internal error (request id {request_id(request)})", "server_error")


def _redacted(response: JSONResponse, roots: list) -> JSONResponse:
    body = json.loads(response.body)
    body["error"]["message"] = redact(body["error"]["message"], roots)
    return JSONResponse(body, status_code=response.status_code)


# -- routes -----------------------------------------------------------------------------------------


def _admin_routes(app: FastAPI, server: _Server) -> None:
    engine, loop_ = server.engine, server.loop

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        return server.models()

    @app.post("/v1/adapters")
    def load_adapter(req: AdapterRequest) -> dict:
        loop_.call(engine.load_adapter, req.name)
        return {"id": req.name, "object": "model", "loaded": True}

    @app.delete("/v1/adapters/{name}")
    def unload_adapter(name: str) -> dict:
        engine.store.folder(name)  # 400/404 for bad names
        loop_.call(engine.unload_adapter, name)
        return {"id": name, "deleted": True}

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(loop_.call(prometheus_text, engine, loop_.metrics))


def _generation_routes(app: FastAPI, server: _Server) -> None:
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await generation.completions(server, req, request)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        return await generation.chat(server, req, request)


def _encoder_routes(app: FastAPI, server: _Server) -> None:
    @app.post("/classify")
    async def classify(req: ClassifyRequest, request: Request):
        results, _ = await server.encode(req.model, _texts(req.input), "classify", request)
        data = [{"index": i, "label": r["label"], "probs": r["probs"]} for i, r in enumerate(results)]
        return {"object": "list", "model": req.model, "data": data}

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, request: Request):
        results, n = await server.encode(req.model, _inputs(req.input), "embed", request)
        data = [
            {"object": "embedding", "index": i, "embedding": r["embedding"]} for i, r in enumerate(results)
        ]
        usage = {"prompt_tokens": n, "total_tokens": n}
        return {"object": "list", "model": req.model, "data": data, "usage": usage}


def _texts(inp: str | list[str]) -> list[str]:
    return [inp] if isinstance(inp, str) else inp


def _inputs(inp) -> list[str | list[int]]:
    """OpenAI's embeddings ``input``: a text, texts, token ids, or token-id lists -> one item each."""
    if isinstance(inp, str) or all(isinstance(t, int) for t in inp):
        return [inp]
    return list(inp)


# -- what the routes share ----------------------------------------------------------------------------


class _Server:
    """The engine, its thread and the names a running app shares between its route handlers."""

    def __init__(self, engine: Engine | EncoderEngine, loop_: EngineLoop, model_name: str, tokenizer):
        self.engine, self.loop = engine, loop_
        self.model_name, self.tokenizer = model_name, tokenizer
        self.chat_template: str | None = None  # --chat-template: replaces the tokenizer's
        self.decoder = isinstance(engine, Engine)
        self.created = int(time.time())
        self.max_len = max_positions(engine.model)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        yield
        # SIGTERM under uvicorn: finish running requests, cancel the rest; off the event loop,
        # which must keep delivering the draining requests' tokens
        await asyncio.to_thread(self.loop.shutdown, drain=True)

    def public_error(self, error: Exception, rid: str) -> Exception:
        """What a stream may say of ``error``: a library error without absolute paths, else
        ``internal error`` (logged here with the response id)."""
        if isinstance(error, ParadaptError):
            return RuntimeError(redact(str(error), [self.engine.store.root]))
        log.error("stream %s failed", rid, exc_info=error)
        return RuntimeError(f"internal error (response id {rid})")

    def adapter_of(self, model: str) -> str | None:
        return None if model == self.model_name else model

    def models(self) -> dict:
        """GET /v1/models: the base model, then every adapter folder that passes the cheap checks
        (``AdapterStore.listable``: not one that failed to load, until it changes) and every
        served adapter."""
        store = self.engine.store  # the disk only: read here, off the engine thread
        folders = [n for n in store.names() if store.listable(n)]
        names = sorted(set(folders) | set(self.loop.call(self.engine.served_adapters)))
        card = {"object": "model", "created": self.created, "owned_by": "paradapt"}  # OpenAI's Model fields
        card["max_model_len"] = self.max_len  # vLLM's extra field: the model's positions
        card["quantization"] = describe(quantization(self.engine.model))  # the base's weights: none, int4-g32, ...
        data = [{"id": n, **card, "parent": self.model_name} for n in names]
        return {"object": "list", "data": [{"id": self.model_name, **card}, *data]}

    # -- encoders ------------------------------------------------------------------------------
    async def encode(
        self, model: str, texts: list[str | list[int]], task: str, request: Request
    ) -> tuple[list[dict], int]:
        """Each input's result (a text, or token ids), and the token count; every input is
        checked before any is queued."""
        request.state.adapter = self.adapter_of(model)
        ids = []
        for i, t in enumerate(texts):
            if isinstance(t, str):
                ids.append(await tokenize_text(self.tokenizer, t, self.max_len, "input"))
                continue
            if not t:
                raise ConfigError("input", f"input {i} has no tokens")
            check_token_ids(self.engine.model, t, "input")
            ids.append(list(t))
        request.state.tokens = sum(map(len, ids))  # the access log's token count
        for i, one in enumerate(ids):
            if self.max_len is not None and len(one) > self.max_len:
                raise ConfigError(
                    "input", f"text {i} has {len(one)} tokens, over the model's {self.max_len} positions"
                )
        queues = [asyncio.Queue() for _ in ids]
        handles = await self.loop.encode(ids, self.adapter_of(model), task, queues)
        try:
            for q in queues:
                while (await q.get())[0] != "done":
                    pass
        finally:  # also when the client goes away: nothing stays queued or tracked
            self.loop.release(handles)
        for h in handles:
            if h.error is not None:
                raise h.error
        return [h.result for h in handles], sum(map(len, ids))
