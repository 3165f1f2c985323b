"""transformers' paged KV cache and packed-batch inputs: the one module that uses their private API.

The :class:`~paradapt.serve.runner.Runner` runs our scheduler's steps through transformers'
own paged-attention forward (docs/serving.md, section 4): one packed ``[1, T]`` row per step,
KV in a ``PagedAttentionCache``, inputs built by ``ContinuousBatchingIOs``, driven by our loop
with no manager thread. Those classes are internals of
``transformers.generation.continuous_batching`` (created through the private
``model.init_continuous_batching(...)._create_batch_processor()``), tested on transformers
5.19 to 5.23 (pyproject's range; 5.18 lacks a config field used here). Everything paradapt uses of them is here, in :class:`PagedKV`, so a
transformers upgrade touches this file only; ``tests/serve/test_serve_hf_paged.py`` checks the
contract (greedy outputs of our scheduler's packed steps equal ``model.generate``) and fails
first when an upgrade changes it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.requests import FutureRequestState
from transformers.generation.continuous_batching.requests import RequestState as KVState

from ..errors import ParadaptError

__all__ = ["KVState", "PagedKV", "sdpa_gqa"]


def _finite_writes(update):
    """The cache's ``update`` with non-finite keys and values written as 0.

    One packed row holds every request's tokens, and attention reads the whole row under a
    mask: a masked-out NaN still poisons the sum (``0 * nan`` is nan) and an infinite key
    turns a masked score into nan. So one request whose hidden states went non-finite (a
    broken adapter, an overflow) would corrupt every other request of the step. Finite values
    pass through unchanged (other rows stay bit-identical); the broken row's own output is
    garbage either way.
    """

    def finite_update(key_states, value_states, *args, **kwargs):
        key_states = torch.nan_to_num(key_states, nan=0.0, posinf=0.0, neginf=0.0)
        value_states = torch.nan_to_num(value_states, nan=0.0, posinf=0.0, neginf=0.0)
        return update(key_states, value_states, *args, **kwargs)

    return finite_update


_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextlib.contextmanager
def sdpa_gqa(device: torch.device) -> Iterator[None]:
    """On CPU, let transformers' SDPA attention read grouped KV heads as they are (``enable_gqa``).

    With a mask (a packed step always has one) transformers repeats each KV head for its query
    heads first (``repeat_kv``: a copy of every gathered key and value, per layer), because on
    CUDA a masked GQA call falls back to SDPA's slow math kernel. On CPU the masked GQA call is
    the fast one and gives bit-identical results: measured here for SmolLM2's 9 query / 3 KV
    heads, decode-shaped (16 queries over 1,600 keys) 5-8x faster, and equal outputs. transformers
    reads its switch ``TRANSFORMERS_SDPA_FORCE_GQA`` at every attention call, so it is set only
    around our forward and restored after (other models in the process are left alone).
    """
    if device.type != "cpu":
        yield
        return
    before = os.environ.get(_FORCE_GQA)
    os.environ[_FORCE_GQA] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_FORCE_GQA, None)
        else:
            os.environ[_FORCE_GQA] = before


class PagedKV:
    """Paged KV pages for every running request, and the packed inputs of one step.

    ``num_blocks`` pages of ``page_size`` tokens; ``max_batch_tokens`` bounds one step's
    tokens. Block sharing (prefix caching) is off: the scheduler reserves whole pages per
    request, in the units :attr:`kv_block` and :attr:`kv_tokens` say.
    """

    def __init__(self, model: nn.Module, *, page_size: int, num_blocks: int, max_batch_tokens: int):
        gc = GenerationConfig(
            max_new_tokens=1, do_sample=False, eos_token_id=-1
        )  # we sample and stop ourselves
        cb = ContinuousBatchingConfig(
            page_size=page_size,
            num_blocks=num_blocks,
            max_batch_tokens=max_batch_tokens,
            max_blocks_per_request=0,
            allow_block_sharing=False,  # the scheduler reserves whole pages per request
            auto_switch_to_flash=False,
        )
        # creates the cache and IO buffers without starting the manager's thread
        bp = model.init_continuous_batching(
            generation_config=gc, continuous_batching_config=cb
        )._create_batch_processor()
        self.cache, self.io, self._lp = bp.cache, bp.inputs_and_outputs, bp.logit_processor
        self.cache.update = _finite_writes(self.cache.update)
        self.max_batch_tokens: int = bp.max_batch_tokens
        self.kv_block: int = self.cache.tokens_per_sector  # allocation unit: the scheduler reserves in these
        self.kv_tokens: int = self.cache.pool.num_free_sectors * self.kv_block  # all pages, free at start

    @property
    def attention_kinds(self) -> list[str]:
        """The model's attention layer types (``["full_attention"]`` for the models served today)."""
        return list(self.cache.cache_allocators)

    # -- requests -----------------------------------------------------------------
    @staticmethod
    def new_request(request_id: str, prompt: list[int], max_new_tokens: int) -> KVState:
        """A request's KV bookkeeping (its pages are allocated as its tokens run)."""
        return KVState(request_id=request_id, initial_tokens=list(prompt), max_new_tokens=max_new_tokens)

    def free(self, request_id: str) -> None:
        """Give a request's pages back."""
        self.cache.free_blocks(request_id)

    def pages_in_use(self, request_id: str | None = None) -> int:
        """KV pages held by one request (or by all)."""
        tables = [a.block_table for a in self.cache.cache_allocators.values()]
        if request_id is not None:
            return sum(len(t.get(request_id, ())) for t in tables)
        return sum(len(b) for t in tables for b in t.values())

    # -- one step -----------------------------------------------------------------
    def step_inputs(self, batch: list[tuple[KVState, list[int], bool]]) -> dict[str, Any]:
        """The model kwargs of one packed step: ``batch`` is (request, tokens to run, samples a
        token) per sequence; allocates the pages the tokens need.

        The samplers' rows come first in ``logits_indices`` (see :meth:`sampler_rows`).
        """
        futures = [self._future(kv, tokens, samples) for kv, tokens, samples in batch]
        num_q = sum(len(tokens) for _, tokens, _ in batch)
        max_kv_read = sum(f.state.position_offset for f in futures)
        self.io.prepare_batch_tensors(futures, self._lp, False, num_q, max_kv_read, use_padding=False)
        return self.io.get_model_kwargs()

    @staticmethod
    def sampler_rows(inputs: dict[str, Any], samplers: int) -> torch.Tensor:
        """Positions in the packed row of the samplers' last tokens, in batch order (the
        ``logits_to_keep`` of the forward); ``logits_indices`` is sized per sequence."""
        return inputs["logits_indices"][:samplers]

    def _future(self, kv: KVState, tokens: list[int], samples: bool) -> FutureRequestState:
        kv.tokens_to_process = tokens
        if not self.cache.can_store_request_tokens(kv, len(tokens)):  # allocates the pages
            raise ParadaptError(
                f"request {kv.request_id!r}: no free KV page for {len(tokens)} tokens; the scheduler's "
                f"kv_tokens/kv_block must match the Runner's ({self.kv_tokens} tokens in blocks of "
                f"{self.kv_block})"
            )
        return FutureRequestState(kv, has_new_token=samples, complete_blocks={}, query_length=len(tokens))
