"""The routes beyond generation that OpenAI and vLLM clients call: one model's card, the
tokenizer, the version, and vLLM's multi-LoRA adapter endpoints as aliases of ours.

- ``GET /v1/models/{id}``: OpenAI's Model object (404 in OpenAI's error shape when unknown).
- ``POST /tokenize`` / ``POST /detokenize``: vLLM's shapes (``{count, max_model_len, tokens}``
  and ``{prompt}``).
- ``GET /version``: ``{"version": paradapt's version}``.
- ``POST /v1/load_lora_adapter`` ``{lora_name, lora_path}`` and ``POST /v1/unload_lora_adapter``
  ``{lora_name}``: vLLM's plain-text answers; the path must name a folder directly inside the
  adapter root (403 otherwise, without echoing the path), the name may differ from the folder's.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..errors import AdapterNotFoundError, ConfigError
from .engine import check_token_ids
from .limits import check_unicode, checked_tokens
from .protocol import ChatMessage, chat_prompt


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize``: a ``prompt`` (completions form) or ``messages`` (chat form)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int] = Field(min_length=0)


class LoadLoRARequest(BaseModel):
    """vLLM's ``/v1/load_lora_adapter`` body (``load_inplace`` accepted: a reload is always in place)."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None


def extra_routes(app: FastAPI, server) -> None:
    """Register the model card, version, tokenizer (decoders and encoders) and vLLM adapter routes."""

    @app.get("/v1/models/{model_id}")
    def model_card(model_id: str) -> dict:
        for card in server.models()["data"]:
            if card["id"] == model_id:
                return card
        raise AdapterNotFoundError(f"unknown model {model_id!r}")

    @app.get("/version")
    def version() -> dict:
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize_route(req: TokenizeRequest) -> dict:
        return await asyncio.to_thread(_tokenize, server, req)

    @app.post("/detokenize")
    async def detokenize_route(req: DetokenizeRequest) -> dict:
        tok = _tokenizer(server, "tokens")
        check_token_ids(server.engine.model, req.tokens, "tokens")
        return {"prompt": await asyncio.to_thread(tok.decode, req.tokens)}

    @app.post("/v1/load_lora_adapter")
    def load_lora(req: LoadLoRARequest) -> PlainTextResponse:
        server.loop.call(server.engine.store.alias, req.lora_name, req.lora_path)
        server.loop.call(server.engine.load_adapter, req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    def unload_lora(req: UnloadLoRARequest) -> PlainTextResponse:
        server.engine.store.folder(req.lora_name)  # 400/404 for bad or unknown names
        server.loop.call(server.engine.unload_adapter, req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")


def _tokenizer(server, field: str):
    if server.tokenizer is None:
        raise ConfigError(field, "the server has no tokenizer")
    return server.tokenizer


def _tokenize(server, req: TokenizeRequest) -> dict:
    """vLLM's tokenize answer: the ids of the prompt, or of the chat's prompt."""
    tok = _tokenizer(server, "prompt")
    if (req.prompt is None) == (req.messages is None):
        raise ConfigError("prompt", "send exactly one of prompt and messages")
    # the bounds every generation request gets (valid Unicode, a length that can fit the model)
    if req.messages is not None:
        for i, m in enumerate(req.messages):
            check_unicode(m.text(), f"messages.{i}.content")
        text, field = chat_prompt(tok, req.messages, server.chat_template), "messages"
    else:
        text, field = req.prompt, "prompt"
    ids = checked_tokens(tok, text, server.max_len, field, add_special_tokens=req.add_special_tokens)
    out = {"count": len(ids), "max_model_len": server.max_len, "tokens": ids}
    if req.return_token_strs:
        out["token_strs"] = tok.convert_ids_to_tokens(ids)
    return out
