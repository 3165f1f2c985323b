"""The HTTP API's wire format: OpenAI-shaped request models, error bodies, SSE chunks, and the
pure helpers between them and the engine (sampling parameters, prompts, stop-string holding).

Nothing here touches the engine or its thread; :mod:`paradapt.serve.app` wires it to them.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..errors import AdapterNotFoundError, ConfigError, ParadaptError
from .cache import AdapterPinnedError
from .core import AdapterAccessError, AdapterLoadError
from .engine_thread import EngineStoppedError
from .limits import bounded_stop
from .runner import NonFiniteLogitsError
from .sampling import MAX_CACHE_SALT, SamplingParams
from .scheduler import QueueFullError, RequestTooLargeError

# -- requests -------------------------------------------------------------------------------------

MAX_LOGPROBS = 20  # OpenAI's bound on top log-probabilities
MAX_CHOICES = 16  # n and best_of: each choice is one engine request


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage on every chunk (with include_usage)


class _Sampling(BaseModel):
    """The sampling fields completions and chat share: OpenAI's names, plus vLLM's ``top_k``,
    ``ignore_eos``, ``repetition_penalty``, ``min_tokens`` and ``cache_salt``.

    Unknown fields are refused with a 400 naming them, as OpenAI does (``extra="forbid"``);
    fields OpenAI takes that this server does not implement are declared and refused when set
    (:func:`refused_fields`), never ignored.
    """

    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**64)  # torch's seed range; larger ones failed the whole step
    stop: Annotated[str | list[str] | None, AfterValidator(bounded_stop)] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever EOS says
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10)  # vLLM's extension
    min_tokens: int = Field(0, ge=0)  # vLLM's extension
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored, as OpenAI's end-user id is
    return_token_ids: bool = False  # vLLM's: prompt_token_ids and each choice's token_ids
    # vLLM's: the prefix cache shares pages only between requests with the same salt
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT)


#: Fields OpenAI accepts that this server does not implement: a request that sets one (to
#: anything but its "off" value) gets a 400 naming it. Field -> the values that mean "off".
REFUSED: dict[str, tuple] = {
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}


def refused_fields(req: BaseModel) -> None:
    """400 naming the first OpenAI field this request sets that the server does not implement."""
    for name, off in REFUSED.items():
        if name in type(req).model_fields and getattr(req, name) not in off:
            raise ConfigError(name, "is not supported by this server (see docs/serving.md, API reference)")


class CompletionRequest(_Sampling):
    # a string, a list of strings, token ids, or a list of token-id lists (OpenAI's four forms)
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0 only with echo: score the prompt
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: str | None = None  # refused when set


class TextPart(BaseModel):
    """One part of a message in OpenAI's list form; only text parts (this server serves text models)."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        """The content as one string (list-form text parts joined, as OpenAI's server does)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # OpenAI fields refused when set (see REFUSED)
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # unknown fields: 400 naming them, as everywhere

    model: str
    input: str | list[str] = Field(min_length=1)


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request: ``input`` is a text, texts, token ids, or token-id lists."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    encoding_format: Literal["float"] = "float"  # OpenAI's default; base64 is not implemented
    user: str | None = None  # accepted and ignored, as OpenAI's end-user id is


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
    name_field = (
        "name"
        if path.startswith("/v1/adapters")
        else "lora_name"
        if path.startswith(("/v1/load_lora_adapter", "/v1/unload_lora_adapter"))
        else "model"
    )
    if isinstance(exc, AdapterNotFoundError):
        return error_response(404, str(exc), "not_found_error", name_field)
    if isinstance(exc, QueueFullError):
        return error_response(429, str(exc), "rate_limit_error")
    if isinstance(exc, EngineStoppedError):
        return error_response(503, str(exc), "server_error")
    if isinstance(exc, AdapterPinnedError):
        return error_response(409, str(exc), "conflict_error", "name")
    if isinstance(exc, AdapterAccessError):
        return error_response(403, str(exc), "permission_error", "lora_path")
    if isinstance(exc, NonFiniteLogitsError):
        return error_response(422, str(exc), "non_finite_error", "model")
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


def sampling_params(max_tokens: int, req: Any, **extra) -> SamplingParams:
    """The engine's sampling parameters of a completion or chat request (``extra``: the
    log-probability fields, set by the caller that knows the endpoint's names for them)."""
    stop = () if req.stop is None else (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        stop=stop,
        ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        min_tokens=req.min_tokens,
        logit_bias=_logit_bias(req.logit_bias),
        cache_salt=req.cache_salt,
        **extra,
    )


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` (token id as a JSON key -> bias in [-100, 100])."""
    out = []
    for key, b in (bias or {}).items():
        try:
            t = int(key)
        except ValueError:
            raise ConfigError("logit_bias", f"keys are token ids, got {key!r}") from None
        if t < 0 or not -100 <= b <= 100:
            raise ConfigError("logit_bias", f"token {key}: ids must be >= 0 and biases in [-100, 100]")
        out.append((t, float(b)))
    return tuple(out)


def chat_prompt(tokenizer, messages: list[ChatMessage], template: str | None = None) -> str:
    """The prompt of a chat: ``template`` (the server's ``--chat-template``) or the tokenizer's.

    A tokenizer without one is refused (400 on ``messages``) rather than given an invented
    format the model was never trained on.
    """
    template = template or getattr(tokenizer, "chat_template", None)
    if tokenizer is None or not template:
        raise ConfigError(
            "messages",
            "this model's tokenizer has no chat template; use /v1/completions, or start the server "
            "with --chat-template FILE",
        )
    msgs = [{"role": m.role, "content": m.text()} for m in messages]
    return tokenizer.apply_chat_template(
        msgs, chat_template=template, tokenize=False, add_generation_prompt=True
    )


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


def choice(
    chat: bool, text: str | None, reason: str | None, *, delta: bool, index: int = 0, logprobs=None
) -> dict:
    """One choice of a response (``delta``: of a stream chunk); ``text`` None: no content."""
    if not chat:
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
    if not delta:
        msg = {"role": "assistant", "content": text}
        return {"index": index, "message": msg, "logprobs": logprobs, "finish_reason": reason}
    body = {"index": index, "delta": {} if text is None else {"content": text}, "finish_reason": reason}
    return body if logprobs is None else {**body, "logprobs": logprobs}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """OpenAI's usage object; ``cached_tokens``: the prompt tokens served from the prefix cache
    (``prompt_tokens_details``, as OpenAI reports it; left out where unknown)."""
    out: dict = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


# -- log-probabilities --------------------------------------------------------------------------

_CONTEXT = 4  # tokens of left context when decoding one token's text (leading spaces, merges)


def token_text(tokenizer, context: list[int], token: int) -> str:
    """The text ``token`` adds after ``context`` (its last few tokens), as in incremental
    detokenization; ``token_id:N`` without a tokenizer (vLLM's ``return_tokens_as_token_ids``)."""
    if tokenizer is None:
        return f"token_id:{token}"
    ctx = context[-_CONTEXT:]
    before = tokenizer.decode(ctx) if ctx else ""
    after = tokenizer.decode([*ctx, token])
    return after[len(before) :] if after.startswith(before) else after


def token_texts(tokenizer, context: list[int], tokens: list[int]) -> list[str]:
    """Each token's text after ``context`` and the tokens before it."""
    ids = list(context)
    out = []
    for t in tokens:
        out.append(token_text(tokenizer, ids, t))
        ids.append(t)
    return out


def chosen_texts(tokenizer, context: list[int], tokens: list[int], pieces: list[str] | None) -> list[str]:
    """The text of each chosen token: the detokenizer's ``pieces`` where it has them (what each
    generated token added to the answer, so they join to its text), else decoded after
    ``context`` (prompt tokens, and a generated EOS, which adds no text to the answer)."""
    pieces = list(pieces or ())[: len(tokens)]
    rest = token_texts(tokenizer, [*context, *tokens[: len(pieces)]], tokens[len(pieces) :])
    return [*pieces, *rest]


def completion_logprobs(
    tokenizer, context: list[int], tokens: list[int], entries: list, pieces: list[str] | None = None
) -> dict:
    """OpenAI's completions ``logprobs`` object over ``tokens`` (their ``entries``:
    :class:`~paradapt.serve.sampling.TokenLogprob` or None for the first prompt token).

    ``top_logprobs`` maps each alternative's text to its log-probability, the chosen token
    included (as vLLM); ``text_offset`` counts characters from the start of the choice's text.
    ``pieces``: the generated tokens' texts from the detokenizer (:func:`chosen_texts`).
    """
    texts = chosen_texts(tokenizer, context, tokens, pieces)
    offsets, at = [], 0
    for t in texts:
        offsets.append(at)
        at += len(t)
    tops: list[dict | None] = []
    for i, e in enumerate(entries):
        if e is None:
            tops.append(None)
            continue
        ctx = [*context, *tokens[:i]]
        top = {token_text(tokenizer, ctx, a): lp for a, lp in e.top}
        top.setdefault(texts[i], e.logprob)
        tops.append(top)
    return {
        "tokens": texts,
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(
    tokenizer, context: list[int], tokens: list[int], entries: list, pieces: list[str] | None = None
) -> dict:
    """OpenAI's chat ``logprobs`` object: ``content[]`` of token, logprob, bytes, top_logprobs."""
    texts = chosen_texts(tokenizer, context, tokens, pieces)
    content = []
    for i, e in enumerate(entries):
        ctx = [*context, *tokens[:i]]
        alts = []
        for a, lp in e.top:
            t = token_text(tokenizer, ctx, a)
            alts.append({"token": t, "logprob": lp, "bytes": list(t.encode("utf-8", "replace"))})
        content.append(
            {
                "token": texts[i],
                "logprob": e.logprob,
                "bytes": list(texts[i].encode("utf-8", "replace")),
                "top_logprobs": alts,
            }
        )
    return {"content": content}


def chunk(
    rid: str,
    obj: str,
    created: int,
    model: str,
    choice: dict | None,
    use: dict | None = None,
    extra: dict | None = None,
) -> str:
    """One server-sent event carrying a completion chunk (``choice`` None: the usage chunk;
    ``extra``: more top-level fields, e.g. chat's ``prompt_token_ids``)."""
    body = {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [] if choice is None else [choice],
        **(extra or {}),
    }
    if use is not None:
        body["usage"] = use
    return f"data: {json.dumps(body)}\n\n"


def error_event(error: Exception) -> str:
    """The server-sent event of a request that failed mid-stream."""
    return f"data: {json.dumps({'error': {'message': str(error), 'type': 'server_error'}})}\n\n"
