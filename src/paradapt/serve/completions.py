"""``/v1/completions`` and ``/v1/chat/completions``: requests with several choices, whole or streamed.

One HTTP request becomes one engine request per choice: every prompt of a batched ``prompt``
(string, strings, token ids, token-id lists) times ``n`` (or ``best_of``, of which the ``n``
with the highest cumulative log-probability are returned). Choice ``j`` of prompt ``i`` has
``index = i * n + j``, as OpenAI numbers them. Every prompt is checked before any is queued,
and a refusal of a later one (429) takes back the ones queued before it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ..errors import ConfigError
from .engine import RequestHandle, check_token_ids
from .limits import check_unicode, checked_tokens, tokenize_text
from .protocol import (
    ChatRequest,
    CompletionRequest,
    chat_logprobs,
    chat_prompt,
    check_positions,
    choice,
    chunk,
    completion_logprobs,
    error_event,
    error_response,
    finish_reason,
    refused_fields,
    sampling_params,
    streamable,
    token_texts,
    usage,
)
from .sampling import SamplingParams

SEED_SPAN = 2**64  # choice j of a seeded request draws from seed + j (mod 2**64)
ABORTED = "the server is shutting down: the request was cancelled before it finished; retry it"


@dataclass
class _Choice:
    """One engine request behind one (candidate) choice."""

    prompt: int  # index of its prompt in the request
    ids: list[int]
    params: SamplingParams
    handle: RequestHandle | None = None


class _Tagged:
    """An asyncio queue's ``put_nowait`` that tags each item with a choice's number, so one
    queue carries the tokens of every choice of a request."""

    def __init__(self, q: asyncio.Queue, tag: int):
        self.q, self.tag = q, tag

    def put_nowait(self, item) -> None:
        self.q.put_nowait((self.tag, *item))


# -- requests to choices ----------------------------------------------------------------------------


def prompts_of(server, prompt) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) of each prompt in OpenAI's four forms."""
    if isinstance(prompt, str):
        forms: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        forms = [prompt]
    else:
        forms = list(prompt)
    if not forms:
        raise ConfigError("prompt", "must not be empty")
    out = []
    for i, p in enumerate(forms):
        if isinstance(p, str):  # on a worker thread (completions): checked, then tokenized
            out.append((p, checked_tokens(server.tokenizer, p, server.max_len, "prompt")))
            continue
        if not p:
            raise ConfigError("prompt", f"prompt {i} has no tokens")
        check_token_ids(server.engine.model, list(p), "prompt")
        out.append((None, list(p)))
    return out


def _check_stream_options(req) -> None:
    opts = req.stream_options
    if opts is not None and not req.stream:
        raise ConfigError("stream_options", "is only allowed with stream: true (as in OpenAI's API)")
    if opts is not None and opts.continuous_usage_stats and not opts.include_usage:
        raise ConfigError("stream_options.continuous_usage_stats", "needs include_usage: true (as in vLLM)")


@dataclass(frozen=True)
class _StreamSpec:
    """What a stream carries besides the text: usage (a last chunk; on every chunk too with
    ``continuous``), token ids (vLLM's ``return_token_ids``), the echoed prompt."""

    include_usage: bool = False
    continuous: bool = False
    token_ids: bool = False
    echo: bool = False
    hide_output: bool = False  # max_tokens 0 with echo: the one generated token is not shown


def _stream_spec(req, **extra) -> _StreamSpec:
    opts = req.stream_options
    include = opts is not None and opts.include_usage
    return _StreamSpec(include, include and opts.continuous_usage_stats, req.return_token_ids, **extra)


def _choices(server, prompts: list[list[int]], params: SamplingParams, count: int) -> list[_Choice]:
    """``count`` engine requests per prompt; a seeded request's choices draw from distinct seeds."""
    check_token_ids(server.engine.model, [t for t, _ in params.logit_bias], "logit_bias")
    max_len = server.max_len
    out = []
    for i, ids in enumerate(prompts):
        check_positions(len(ids), params.max_new_tokens, max_len)
        for j in range(count):
            seed = None if params.seed is None else (params.seed + j) % SEED_SPAN
            out.append(_Choice(i, ids, replace(params, seed=seed) if j else params))
    return out


async def _submit(
    server, adapter: str | None, choices: list[_Choice], q: asyncio.Queue, handles: list[RequestHandle]
) -> None:
    """Queue every choice, or none: a refusal cancels the ones queued before it. The queued
    handles are appended to ``handles`` (the access log's token count: ``request.state.handles``)."""
    try:
        for k, c in enumerate(choices):
            c.handle = await server.loop.generate(c.ids, adapter, c.params, _Tagged(q, k))
            handles.append(c.handle)
    except BaseException:
        server.loop.release([c.handle for c in choices if c.handle is not None])
        raise


def _cumulative(h: RequestHandle) -> float:
    return sum(e.logprob for e in h.logprobs)


def _best(choices: list[_Choice], n: int, prompts: int) -> list[_Choice]:
    """Per prompt, the ``n`` candidates of highest cumulative log-probability (best_of), in prompt order."""
    out = []
    for i in range(prompts):
        mine = [c for c in choices if c.prompt == i]
        out.extend(sorted(mine, key=lambda c: -_cumulative(c.handle))[:n] if len(mine) > n else mine)
    return out


# -- completions ------------------------------------------------------------------------------------


async def completions(server, req: CompletionRequest, request: Request):
    """POST /v1/completions."""
    _for_access_log(server, req, request)
    refused_fields(req)
    _check_stream_options(req)
    n = req.n
    best_of = req.best_of or n
    if best_of < n:
        raise ConfigError("best_of", f"must be >= n ({n}), got {best_of}")
    if req.stream and best_of > n:
        raise ConfigError("best_of", "cannot be used with stream (as in OpenAI's API)")
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if max_tokens == 0 and not req.echo:
        raise ConfigError("max_tokens", "0 is only allowed with echo (to score the prompt)")
    lp = req.logprobs if req.logprobs is not None else (0 if best_of > n else None)
    extra = {"logprobs": lp, "prompt_logprobs": req.logprobs if req.echo else None}
    # max_tokens 0 (echo): one token is generated, then hidden; the prompt's scores are the answer
    params = sampling_params(max(max_tokens, 1), req, **extra)
    prompts = await asyncio.to_thread(prompts_of, server, req.prompt)
    choices = _choices(server, [ids for _, ids in prompts], params, best_of)
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    q: asyncio.Queue = asyncio.Queue()
    await _submit(server, server.adapter_of(req.model), choices, q, request.state.handles)
    if req.stream:
        spec = _stream_spec(req, echo=req.echo, hide_output=max_tokens == 0)
        texts = [p for p, _ in prompts] if req.echo else None
        gen = _sse(server, choices, q, req.model, rid, chat=False, spec=spec, prompt_texts=texts)
        return StreamingResponse(gen, media_type="text/event-stream")
    if not await _wait(server, choices, q, request):
        return Response(status_code=499)
    if _cancelled(choices):
        return error_response(503, ABORTED, "server_error")
    kept = _best(choices, n, len(prompts))
    out = []
    for k, c in enumerate(kept):
        h = c.handle
        text, tokens, entries = h.text or "", list(h.tokens), list(h.logprobs)
        pieces = list(h.text_pieces) if server.tokenizer is not None else None
        if max_tokens == 0:
            text, tokens, entries, pieces = "", [], [], []
        context = c.ids
        if req.echo:
            ptext = prompts[c.prompt][0]
            ptext = ptext if ptext is not None else _decode(server, c.ids)
            text = ptext + text
            if pieces is not None:
                pieces = [*token_texts(server.tokenizer, [], c.ids), *pieces]
            context, tokens, entries = [], [*c.ids, *tokens], [*h.prompt_logprobs, *entries]
        logprobs = None
        if req.logprobs is not None:
            # decodes two strings per alternative: off the event loop, which serves every stream
            logprobs = await asyncio.to_thread(
                completion_logprobs, server.tokenizer, context, tokens, entries, pieces
            )
        reason = finish_reason(h.finish_reason)
        one = choice(False, text, reason, delta=False, index=k, logprobs=logprobs)
        if req.return_token_ids:  # vLLM's: per choice, the prompt's ids and the generated ids
            one["prompt_token_ids"] = list(c.ids)
            one["token_ids"] = [] if max_tokens == 0 else list(h.tokens)
        out.append(one)
    generated = 0 if max_tokens == 0 else sum(len(c.handle.tokens) for c in kept)
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": out,
        "usage": usage(sum(len(ids) for _, ids in prompts), generated, _cached(choices)),
    }


def _for_access_log(server, req, request: Request) -> None:
    """What :class:`~paradapt.serve.security.Guard`'s access line reports: the adapter, and the
    handles whose prompt and generated tokens it counts."""
    request.state.adapter = server.adapter_of(req.model)
    request.state.handles = []


def _cancelled(choices: list[_Choice]) -> bool:
    """Whether the server cancelled a choice (SIGTERM past the drain): the answer is a 503."""
    return any(c.handle.status == "cancelled" for c in choices)


def _cached(choices: list[_Choice]) -> int:
    """Prompt tokens served from the prefix cache, each prompt counted once (as its tokens are
    in ``prompt_tokens``): the least any of its choices found cached."""
    per_prompt: dict[int, int] = {}
    for c in choices:
        n = c.handle.cached_tokens if c.handle is not None else 0
        per_prompt[c.prompt] = min(per_prompt.get(c.prompt, n), n)
    return sum(per_prompt.values())


def _decode(server, ids: list[int]) -> str:
    if server.tokenizer is None:
        return ""
    return server.tokenizer.decode(ids)


# -- chat -------------------------------------------------------------------------------------------


async def chat(server, req: ChatRequest, request: Request):
    """POST /v1/chat/completions."""
    _for_access_log(server, req, request)
    refused_fields(req)
    _check_stream_options(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise ConfigError("top_logprobs", "needs logprobs: true")
    lp = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req.max_completion_tokens or req.max_tokens or 16, req, logprobs=lp)
    for i, m in enumerate(req.messages):
        check_unicode(m.text(), f"messages.{i}.content")
    # templates render arbitrary message text: off the event loop, as tokenizing is
    prompt = await asyncio.to_thread(chat_prompt, server.tokenizer, req.messages, server.chat_template)
    ids = await tokenize_text(server.tokenizer, prompt, server.max_len, "messages")
    choices = _choices(server, [ids], params, req.n)
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    q: asyncio.Queue = asyncio.Queue()
    await _submit(server, server.adapter_of(req.model), choices, q, request.state.handles)
    if req.stream:
        gen = _sse(server, choices, q, req.model, rid, chat=True, spec=_stream_spec(req))
        return StreamingResponse(gen, media_type="text/event-stream")
    if not await _wait(server, choices, q, request):
        return Response(status_code=499)
    if _cancelled(choices):
        return error_response(503, ABORTED, "server_error")
    out = []
    for k, c in enumerate(choices):
        h = c.handle
        pieces = h.text_pieces if server.tokenizer is not None else None
        logprobs = None
        if req.logprobs:  # off the event loop, as for completions
            logprobs = await asyncio.to_thread(chat_logprobs, server.tokenizer, c.ids, h.tokens, h.logprobs, pieces)
        one = choice(True, h.text or "", finish_reason(h.finish_reason), delta=False, index=k, logprobs=logprobs)
        if req.return_token_ids:  # vLLM's: the generated ids per choice, the prompt's once
            one["token_ids"] = list(h.tokens)
        out.append(one)
    body = {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": out,
        "usage": usage(len(ids), sum(len(c.handle.tokens) for c in choices), _cached(choices)),
    }
    if req.return_token_ids:
        body["prompt_token_ids"] = list(ids)
    return body


# -- waiting and streaming --------------------------------------------------------------------------


async def _wait(
    server, choices: list[_Choice], q: asyncio.Queue, request: Request, poll: float = 0.25
) -> bool:
    """Wait for every choice's ``done``; False (all cancelled) as soon as the client has gone.

    Starlette does not cancel a handler whose client went away, so a non-streamed request
    would otherwise generate to the end for nobody, holding its KV pages and adapter slots.
    Raises the first choice's error, if one failed; hands the finished handles back.
    """
    handles = [c.handle for c in choices]
    left = len(handles)
    check = time.monotonic() + poll
    get: asyncio.Future | None = None
    finished = False
    try:
        while left:
            get = get or asyncio.ensure_future(q.get())
            await asyncio.wait({get}, timeout=max(0.0, check - time.monotonic()))
            if get.done():
                left -= get.result()[1] == "done"
                get = None
            if left and time.monotonic() >= check:
                if await request.is_disconnected():
                    if get is not None:
                        get.cancel()
                    return False
                check = time.monotonic() + poll
        finished = True
    finally:
        if not finished:  # the client went away (or the wait was cancelled): cancel and forget them,
            server.loop.release(handles)  # freeing KV space and slots and dropping the handles
    for h in handles:
        if h.error is not None:
            server.loop.release(handles)
            raise h.error
    for h in handles:
        server.loop.post(server.engine.pop, h.id)
    return True


class _StreamedChoice:
    """What of one streamed choice went out: its text (held back at possible stop strings), and
    the tokens whose log-probabilities and ids went with it. Each chunk carries those of the
    tokens generated since the previous chunk; the last chunk carries the rest.

    A new token whose text is held back (part of a character, a skipped special token, a
    possible stop string) still gets its chunk, with empty text, as vLLM sends one
    (``delta_token_ids`` without ``delta_text``): a client measures its first token and the
    pace of the stream from the chunks, and a request whose first tokens add no text would
    otherwise look stalled until they do.
    """

    def __init__(self, server, c: _Choice, index: int, chat: bool, spec: _StreamSpec):
        self.server, self.tokenizer, self.c, self.index = server, server.tokenizer, c, index
        self.chat, self.spec = chat, spec
        self.sent_prompt = False  # a completion choice's prompt ids go with its first chunk
        self.text = ""  # text sent
        self.scored = 0  # tokens whose log-probabilities went out
        self.ids = 0  # tokens whose ids went out
        self.offset = 0  # characters sent before the next token's text (completions' text_offset)
        self.chunked = 0  # tokens a chunk went out for

    def _shown(self) -> list[int]:
        return [] if self.spec.hide_output else self.c.handle.tokens

    def logprobs(self) -> dict | None:
        """The log-probabilities of the tokens generated since the last call (None: not asked)."""
        h = self.c.handle
        if h.params.logprobs is None:
            return None
        tokens = self._shown()
        n = min(len(h.logprobs), len(tokens))  # the engine thread may be one token ahead
        context, new = [*self.c.ids, *tokens[: self.scored]], tokens[self.scored : n]
        entries = h.logprobs[self.scored : n]
        pieces = h.text_pieces[self.scored : n] if self.tokenizer is not None else None
        self.scored = n
        if self.chat:
            return chat_logprobs(self.tokenizer, context, new, entries, pieces)
        return self._offsets(completion_logprobs(self.tokenizer, context, new, entries, pieces))

    def _offsets(self, out: dict) -> dict:
        out["text_offset"] = [self.offset + o for o in out["text_offset"]]
        self.offset += sum(map(len, out["tokens"]))
        return out

    def delta(self, final: bool) -> str | None:
        """The text to send now: ``""`` for new tokens that add no text yet, None when no token
        is new."""
        h = self.c.handle
        if self.spec.hide_output:
            return None
        text = streamable(h.text or "", h.params.stop, final=final)
        tokens = len(h.tokens)
        if len(text) > len(self.text) and text.startswith(self.text):
            out, self.text, self.chunked = text[len(self.text) :], text, tokens
            return out
        if tokens > self.chunked and not final:  # the final chunk carries them with its reason
            self.chunked = tokens
            return ""
        return None

    def body(self, text: str | None, reason: str | None, logprobs) -> dict:
        """One chunk's choice, with the new token ids (``return_token_ids``) and, on a
        completion choice's first chunk, its prompt's ids."""
        one = choice(self.chat, text, reason, delta=True, index=self.index, logprobs=logprobs)
        if self.spec.token_ids:
            tokens = self._shown()
            one["token_ids"] = list(tokens[self.ids :])
            if not self.chat and self.ids == 0 and not self.sent_prompt:
                one["prompt_token_ids"] = list(self.c.ids)
            self.ids, self.sent_prompt = len(tokens), True
        return one

    def echo(self, prompt_text: str | None) -> dict:
        """The first chunk of an echoing completion: the prompt's text, and with ``logprobs`` its
        tokens' (the prompt's log-probabilities are complete once its first token is out)."""
        h = self.c.handle
        text = prompt_text if prompt_text is not None else _decode(self.server, self.c.ids)
        logprobs = None
        if h.params.logprobs is not None:
            entries = h.prompt_logprobs[: len(self.c.ids)]
            logprobs = self._offsets(completion_logprobs(self.tokenizer, [], self.c.ids, entries))
        else:
            self.offset += len(text)
        one = choice(False, text, None, delta=True, index=self.index, logprobs=logprobs)
        if self.spec.token_ids:
            one["prompt_token_ids"], one["token_ids"] = list(self.c.ids), []
            self.sent_prompt = True
        return one

    def usage(self) -> dict:
        """This choice's usage so far (vLLM's ``continuous_usage_stats``)."""
        return usage(len(self.c.ids), len(self.c.handle.tokens))


async def _sse(
    server,
    choices: list[_Choice],
    q: asyncio.Queue,
    model: str,
    rid: str,
    chat: bool,
    spec: _StreamSpec,
    prompt_texts: list[str | None] | None = None,
) -> AsyncIterator[str]:
    """The stream's events: per choice, the role (chat; with the prompt's token ids when asked),
    the echoed prompt (completions with ``echo``), text deltas held back at possible stop strings,
    its finish reason; usage on every chunk (``continuous_usage_stats``) and a last usage chunk
    when asked; an error event if a choice failed; ``[DONE]``."""
    handles = [c.handle for c in choices]
    streamed = [_StreamedChoice(server, c, k, chat, spec) for k, c in enumerate(choices)]
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    left = len(handles)

    def event(k: int, one: dict) -> str:
        use = streamed[k].usage() if spec.continuous else None
        return chunk(rid, obj, created, model, one, use)

    try:
        if chat:
            for k in range(len(handles)):
                first = {"index": k, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}
                if spec.token_ids:
                    first["token_ids"] = []
                extra = {"prompt_token_ids": list(choices[k].ids)} if spec.token_ids and k == 0 else None
                use = streamed[k].usage() if spec.continuous else None
                yield chunk(rid, obj, created, model, first, use, extra)
        echoed = [not spec.echo] * len(handles)
        while left:
            k, kind, _ = await q.get()
            h, st = handles[k], streamed[k]
            if not echoed[k]:  # the prompt's log-probabilities are complete once a token is out
                echoed[k] = True
                if h.tokens and h.error is None:  # a request that ended before its prompt ran echoes nothing
                    yield event(k, st.echo(prompt_texts[choices[k].prompt] if prompt_texts else None))
            text = st.delta(final=kind == "done")
            if text is not None:
                yield event(k, st.body(text, None, st.logprobs()))
            if kind != "done":
                continue
            left -= 1
            if h.error is not None:
                yield error_event(server.public_error(h.error, rid))
                break
            # a request the server cancelled (shutdown) ends with vLLM's "abort"
            reason = "abort" if h.status == "cancelled" else finish_reason(h.finish_reason)
            yield event(k, st.body(None, reason, st.logprobs()))
        else:
            if spec.include_usage:
                prompt_tokens = sum(len(ids) for ids in {id(c.ids): c.ids for c in choices}.values())
                generated = 0 if spec.hide_output else sum(len(h.tokens) for h in handles)
                yield chunk(rid, obj, created, model, None, usage(prompt_tokens, generated, _cached(choices)))
        yield "data: [DONE]\n\n"
    finally:
        for h in handles:
            if not h.done:  # the client went away mid-stream: free its KV space and slot
                server.loop.cancel(h.id)
        server.loop.release(handles)  # runs after the cancels: commands keep their order
