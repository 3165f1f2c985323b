"""The HTTP API's wire format: OpenAI-shaped request models, error bodies, SSE chunks, and the
pure helpers between them and the engine (sampling parameters, prompts, stop-string holding).

Nothing here touches the engine or its thread; :mod:`paradapt.serve.app` wires it to them.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field

from ..errors import AdapterNotFoundError, ConfigError, ParadaptError
from .cache import AdapterPinnedError
from .core import AdapterLoadError
from .limits import bounded_stop
from .sampling import SamplingParams
from .scheduler import QueueFullError, RequestTooLargeError

# -- requests -------------------------------------------------------------------------------------


class _Sampling(BaseModel):
    """The sampling fields completions and chat share (OpenAI's names, plus vLLM's top_k/ignore_eos)."""

    model: str
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**64)  # torch's seed range; larger ones failed the whole step
    stop: Annotated[str | list[str] | None, AfterValidator(bounded_stop)] = None
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


# -- errors ---------------------------------------------------------------------------------------


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    """OpenAI's error body: ``{"error": {"message", "type", "param"}}``."""
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": param}}
    )


_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|[A-Z]\w*)$")


def validation_error(errors: list) -> JSONResponse:
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
        return error_response(400, f"body: not valid JSON ({msg}){where}", "invalid_request_error", "body")
    field = ".".join(p for p in loc[1:] if not _UNION_TAG.match(p)) or "body"
    return error_response(400, f"{field}: {msg}", "invalid_request_error", field)


def paradapt_error(exc: ParadaptError, path: str, decoder: bool) -> JSONResponse:
    """A library error as an HTTP error: 404 unknown adapter, 429 queue full, 409 adapter in
    use, 422 adapter folder that fails to load, 400 bad parameter (naming the request's field:
    ``name`` on the adapter routes, ``model`` elsewhere, ``input`` for encoder texts), else 500."""
    name_field = "name" if path.startswith("/v1/adapters") else "model"
    if isinstance(exc, AdapterNotFoundError):
        return error_response(404, str(exc), "not_found_error", name_field)
    if isinstance(exc, QueueFullError):
        return error_response(429, str(exc), "rate_limit_error")
    if isinstance(exc, AdapterPinnedError):
        return error_response(409, str(exc), "conflict_error", "name")
    if isinstance(exc, AdapterLoadError):
        return error_response(422, str(exc), "adapter_load_error", name_field)
    if isinstance(exc, (ConfigError, RequestTooLargeError)):
        field = getattr(exc, "field", None)
        if field == "adapter":
            field = name_field
        elif field in ("prompt", "tokens") and not decoder:
            field = "input"  # the encoder endpoints' name for the texts
        return error_response(400, str(exc), "invalid_request_error", field)
    return error_response(500, str(exc), "server_error")


# -- from requests to the engine ------------------------------------------------------------------


def sampling_params(max_tokens: int, req: Any) -> SamplingParams:
    """The engine's sampling parameters of a completion or chat request."""
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


def tokenize(tokenizer, text: str) -> list[int]:
    """``text``'s token ids (a 400 on ``prompt`` when the server has no tokenizer)."""
    if tokenizer is None:
        raise ConfigError("prompt", "text needs the server's tokenizer; send token ids")
    return list(tokenizer(text)["input_ids"])


def chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    """The tokenizer's chat template when it has one, else ``role: content`` lines."""
    msgs = [{"role": m.role, "content": m.text()} for m in messages]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"


def check_positions(prompt: int, new: int, max_len: int | None) -> None:
    """Refuse a prompt plus new tokens over the model's positions, naming the field to change."""
    if max_len is None or prompt + new <= max_len:
        return
    if prompt >= max_len:
        raise ConfigError("prompt", f"{prompt} tokens, over the model's {max_len} positions")
    raise ConfigError(
        "max_tokens",
        f"{prompt} prompt + {new} new tokens = {prompt + new}, over the model's {max_len} positions "
        f"(at most {max_len - prompt} new tokens for this prompt)",
    )


# -- from the engine to responses -----------------------------------------------------------------


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


def finish_reason(engine_reason: str | None) -> str:
    """OpenAI's finish reason of the engine's (EOS and stop strings both read ``stop``)."""
    return "stop" if engine_reason in ("eos", "stop") else "length"


def choice(chat: bool, text: str | None, reason: str | None, *, delta: bool) -> dict:
    """One choice of a response (``delta``: of a stream chunk); ``text`` None: no content."""
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    if not delta:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
    return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": reason}


def chunk(rid: str, obj: str, created: int, model: str, choice: dict) -> str:
    """One server-sent event carrying a completion chunk."""
    body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    return f"data: {json.dumps(body)}\n\n"


def error_event(error: Exception) -> str:
    """The server-sent event of a request that failed mid-stream."""
    return f"data: {json.dumps({'error': {'message': str(error), 'type': 'server_error'}})}\n\n"
