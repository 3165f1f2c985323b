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
import hashlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.generation.continuous_batching.cache_allocators.cache_allocator import compute_block_hash
from transformers.generation.continuous_batching.requests import FutureRequestState
from transformers.generation.continuous_batching.requests import RequestState as KVState
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import ParadaptError
from .paged_attention import Attend, gather_attention

__all__ = ["KVState", "PagedKV", "lean_decode", "sdpa_gqa"]


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
        return update(_finite(key_states), _finite(value_states), *args, **kwargs)

    return finite_update


def _finite(t: torch.Tensor) -> torch.Tensor:
    """``t`` with NaN and infinities written as 0 (what every cache write here stores)."""
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


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


@contextlib.contextmanager
def lean_decode(device: torch.device, attend: Attend = gather_attention) -> Iterator[None]:
    """On CPU, every request attends over its own keys instead of over the whole packed row.

    transformers' SDPA path for the paged cache gathers every request's keys into one row and
    masks it block-diagonally, so each of B requests' queries is scored against all B requests'
    keys (B times the work; at 32 requests of 80 tokens, most of a step's attention time). Here
    a step takes one of two per-request paths (:func:`_per_request`):

    * the step reads keys back from the cache (decodes, later prompt chunks): the step's keys
      are written to their pages and each request's keys read back into its own row, padded to
      the longest (:func:`_write`, :func:`_step_layout`); single-token queries are scored by
      ``attend`` (:mod:`paradapt.serve.paged_attention`: the C++ kernel or the compiled version
      read the pages in place), each prompt chunk by its own causal SDPA (:func:`_attend_rows`);
    * the step reads nothing back (every request at its first chunk, a burst of arrivals): each
      request's queries over its own keys of the step, causal (:func:`_attend_own`).

    Any other step (sliding-window layers, a block table, dropout) goes to transformers' own
    function unchanged. Installed in transformers' attention registry only for the duration of
    our forward, so other models are untouched.
    """
    if device.type != "cpu":
        yield
        return
    registry = ALL_ATTENTION_FUNCTIONS._local_mapping
    before = registry.get("sdpa")
    registry["sdpa"] = _decode_attention(ALL_ATTENTION_FUNCTIONS["sdpa"], attend)
    try:
        with sdpa_gqa(device):
            yield
    finally:
        if before is None:
            registry.pop("sdpa", None)
        else:
            registry["sdpa"] = before


def _decode_attention(original, attend: Attend):
    """transformers' SDPA attention function, with the per-request path for paged steps.

    Every layer of a step reads its keys in the same layout, so the step's layout (which query
    rows are single tokens, their padded read positions, the prompt chunks' spans) is built once
    per step and cache allocator (``layouts``), not once per layer."""
    layouts: dict[int, tuple[torch.Tensor, StepLayout]] = {}

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, cache=None, **kwargs):
        path = _per_request(module, query, cache, dropout, kwargs)
        if path == "rows":
            return _attend_rows(cache, module.layer_idx, query, key, value, scaling, kwargs, layouts, attend), None
        if path == "own":
            return _attend_own(cache, module.layer_idx, query, key, value, scaling, kwargs), None
        return original(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, cache=cache, **kwargs
        )

    return attention


def _per_request(module, query: torch.Tensor, cache, dropout: float, kwargs: dict) -> str | None:
    """Which per-request path a paged, full-attention layer takes, nothing else asked: ``rows``
    when the step reads back every request's keys from the cache, ``own`` when it reads none
    (every request is at its first chunk: its keys are the step's own), None otherwise
    (transformers' function)."""
    cu_q = kwargs.get("cu_seq_lens_q")
    if not isinstance(cache, PagedAttentionCache) or not isinstance(cu_q, torch.Tensor):
        return None
    if query.shape[0] != 1 or int(cu_q[-1]) != query.shape[2] or dropout:
        return None
    if any(kwargs.get(k) is not None for k in ("block_table", "position_bias", "softcap", "sinks", "s_aux")):
        return None
    allocator = cache.layer_to_allocator[module.layer_idx]
    if allocator.layer_type != "full_attention":
        return None
    read = kwargs["read_index"][allocator.index]
    cu_k = kwargs["cu_seq_lens_k"][allocator.layer_type]
    if read.numel() == 0:  # transformers' write-only step: the keys are the step's, request by request
        return "own" if cu_k.shape == cu_q.shape and torch.equal(cu_k, cu_q) else None
    return "rows" if read.numel() == int(cu_k[-1]) else None


def _attend_own(cache, layer: int, query, key, value, scaling: float | None, kwargs: dict) -> torch.Tensor:
    """A step in which every request brings its first tokens (a burst of new requests): each
    request's queries over its own keys of this step, causal, one SDPA per request, after
    writing the keys to their pages. transformers scores the packed row as one sequence under a
    block-diagonal mask, B times the work for B requests: profiled on SmolLM2 with 16 chat
    prompts of ~92 tokens, that one SDPA per layer was 36 % of the step time, and a burst of 48
    such prompts is served 1.43x faster this way (``benchmarks/prefill_paths.py``).
    ``query`` ``[1, H, T, D]``, ``key``/``value`` ``[1, Hkv, T, D]``; returns ``[1, T, H, D]``."""
    _write(cache, layer, key, value, kwargs)
    # the raw keys, not the pages' finite copies: each request has its own SDPA, so a broken
    # row's NaN stays in its own output, where the engine sees it and fails that request alone
    bounds = kwargs["cu_seq_lens_q"].tolist()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    gqa = query.shape[1] != key.shape[1]
    out = torch.empty_like(query)
    for a, b in zip(bounds, bounds[1:], strict=False):
        if b > a:
            out[:, :, a:b] = F.scaled_dot_product_attention(
                query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scale, enable_gqa=gqa
            )
    return out.transpose(1, 2)


def _padded_rows(cu_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [B, L], valid [B, L])``: request ``i``'s positions ``cu_k[i]:cu_k[i+1]`` of the
    packed key order, padded to the longest request (padding repeats a real position, masked)."""
    starts = cu_k[:-1].long()
    lengths = cu_k[1:].long() - starts
    pos = torch.arange(int(lengths.max()), device=cu_k.device)
    rows = (starts[:, None] + pos[None, :]).clamp_max(int(cu_k[-1]) - 1)
    return rows, pos[None, :] < lengths[:, None]


def _write(cache, layer: int, key: torch.Tensor, value: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``cache.update`` writes for a full-attention layer: the step's keys and values into
    their pages (non-finite values as 0, like every other write here). ``key``/``value``
    ``[1, Hkv, T, D]``; returns the layer's whole ``(k_cache, v_cache)`` ``[rows, Hkv, D]``."""
    allocator = cache.layer_to_allocator[layer]
    k_cache, v_cache = allocator._kv_token_views[layer]
    write = kwargs["write_index"][allocator.index]
    for store, new in ((k_cache, key), (v_cache, value)):
        store.index_copy_(0, write, _finite(new).squeeze(0).transpose(0, 1))
    return k_cache, v_cache


@dataclass(frozen=True)
class StepLayout:
    """Where each request's queries and keys sit in one step (the same for every layer).

    ``single``: the query rows of requests with one query token (decodes, one-token chunks), in
    request order, with ``where [S, L]``/``valid [S, L]`` their keys' cache rows padded to the
    longest; ``None`` when every request has one. ``chunks``: ``(query rows, cache rows of its
    keys)`` per request with several query tokens (prompt chunks), its queries being the last
    of its keys."""

    single: torch.Tensor | None
    where: torch.Tensor | None
    valid: torch.Tensor | None
    chunks: tuple[tuple[slice, torch.Tensor], ...]


def _step_layout(allocator, kwargs: dict, layouts: dict) -> StepLayout:
    """This step's :class:`StepLayout` for ``allocator``'s layers, built at its first layer. The
    entry keeps the step's ``cu_seq_lens_k`` tensor and is reused only for that very tensor, so
    a layout never outlives its step."""
    cu_k = kwargs["cu_seq_lens_k"][allocator.layer_type]
    known = layouts.get(allocator.index)
    if known is not None and known[0] is cu_k:
        return known[1]
    read = kwargs["read_index"][allocator.index]
    cu_q = kwargs["cu_seq_lens_q"]
    q_lens = (cu_q[1:] - cu_q[:-1]).tolist()
    ones = [i for i, n in enumerate(q_lens) if n == 1]
    rows, valid = _padded_rows(cu_k)
    if len(ones) == len(q_lens):
        layout = StepLayout(None, read.index_select(0, rows.reshape(-1)).view(rows.shape), valid, ())
    else:
        qs, ks = cu_q.tolist(), cu_k.tolist()
        chunks = tuple((slice(qs[i], qs[i + 1]), read[ks[i] : ks[i + 1]]) for i, n in enumerate(q_lens) if n > 1)
        where = valid_ones = single = None
        if ones:  # the single-token requests' rows of the padded layout, cut to the longest of them
            sel = torch.tensor(ones, dtype=torch.long, device=cu_k.device)
            valid_ones = valid.index_select(0, sel)
            width = int(valid_ones.sum(1).max())
            valid_ones = valid_ones[:, :width]
            picked = rows.index_select(0, sel)[:, :width]
            where = read.index_select(0, picked.reshape(-1)).view(picked.shape)
            single = cu_q[:-1].long().index_select(0, sel)
        layout = StepLayout(single, where, valid_ones, chunks)
    layouts[allocator.index] = (cu_k, layout)
    return layout


def _attend_rows(
    cache, layer: int, query, key, value, scaling: float | None, kwargs: dict, layouts: dict, attend: Attend
) -> torch.Tensor:
    """Each request's queries over its own keys (the step's just written among them), not over
    the whole packed row: single-token queries together through ``attend``, each prompt chunk
    through its own causal SDPA (its queries are its last keys: bottom-right aligned).
    ``query`` ``[1, H, T, D]``; returns ``[1, T, H, D]`` as transformers does."""
    k_cache, v_cache = _write(cache, layer, key, value, kwargs)
    layout = _step_layout(cache.layer_to_allocator[layer], kwargs, layouts)
    q = query[0].transpose(0, 1)  # [T, H, D]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if layout.single is None and not layout.chunks:
        return attend(q, k_cache, v_cache, layout.where, layout.valid, scale).unsqueeze(0)
    out = torch.empty_like(q)
    if layout.single is not None:
        out[layout.single] = attend(q[layout.single], k_cache, v_cache, layout.where, layout.valid, scale)
    for rows, read in layout.chunks:
        out[rows] = _attend_chunk(q[rows], k_cache, v_cache, read, scale)
    return out.unsqueeze(0)


def _attend_chunk(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, read: torch.Tensor, scale: float
) -> torch.Tensor:
    """One prompt chunk: ``q [n, H, D]`` over its request's keys ``read`` (cache rows, the
    chunk's own last), causal from the bottom right; ``[n, H, D]``."""
    n, length = q.shape[0], read.shape[0]
    k = k_cache.index_select(0, read).transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
    v = v_cache.index_select(0, read).transpose(0, 1).unsqueeze(0)
    mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out[0].transpose(0, 1)


def _tokens(prompt: list[int], output: list[int], start: int, stop: int) -> list[int]:
    """``(prompt + output)[start:stop]`` without building the whole list."""
    n = len(prompt)
    if stop <= n:
        return prompt[start:stop]
    if start >= n:
        return output[start - n : stop - n]
    return prompt[start:] + output[: stop - n]


class PagedKV:
    """Paged KV pages for every running request, and the packed inputs of one step.

    ``num_blocks`` pages of ``page_size`` tokens; ``max_batch_tokens`` bounds one step's
    tokens. The scheduler reserves whole pages per request, in the units :attr:`kv_block` and
    :attr:`kv_tokens` say.

    Prefix caching (:meth:`match_prefix`, :meth:`mark_complete`): a full page of KV is keyed by
    a chain hash of its tokens and every token before it, rooted in a *salt* (the request's
    adapter and its version, see ``Runner.add``), because the same tokens under another adapter
    have other keys and values. A later request whose prompt starts with the same pages under
    the same salt shares them (reference counted in transformers' block ledger) and starts its
    prefill after them, as vLLM's automatic prefix caching does (its block hashes carry the
    LoRA id the same way). A page no request references stays cached until a request needs
    its room (:meth:`_future` evicts the least recently released first). The scheduler's
    reservations are unchanged (a shared page counts in every sharer's reservation), so a
    running request never waits for a page: cached pages can always be evicted.
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
            allow_block_sharing=False,  # transformers' own (unsalted) matching stays off: ours is below
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
        self._marked: dict[str, int] = {}  # request -> its leading pages already hashed
        # the full-attention layers' allocator (the Runner refuses models with other kinds): the
        # prefix cache's block tables, ledger and pool, looked up once rather than every step
        self._allocator = next(iter(self.cache.cache_allocators.values()))

    def kv_layout(self) -> tuple[int, int, torch.dtype, torch.device]:
        """``(kv heads, head dim, dtype, device)`` of the cache's pages (what decode attention reads)."""
        layer, allocator = next(iter(self.cache.layer_to_allocator.items()))
        k_cache = allocator._kv_token_views[layer][0]
        return k_cache.shape[1], k_cache.shape[2], k_cache.dtype, k_cache.device

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
        """Give a request's pages back (its hashed pages stay cached for later prefixes)."""
        self._marked.pop(request_id, None)
        self.cache.free_blocks(request_id)

    # -- prefix caching -------------------------------------------------------------
    @staticmethod
    def _root(salt: str) -> int:
        """The hash every chain of ``salt``'s pages starts from."""
        digest = hashlib.blake2b(salt.encode("utf-8", "surrogatepass"), digest_size=8, person=b"paradapt-kv")
        return int.from_bytes(digest.digest(), "little")

    def match_prefix(self, kv: KVState, salt: str) -> int:
        """Share the cached pages that hold the start of ``kv``'s prompt under ``salt``; returns
        the tokens they cover (0: none), where the request's prefill starts. Never the whole
        prompt: its last token must run to give the first sampled token its logits."""
        alloc = self._allocator
        page, prompt = alloc.tokens_per_page, kv.initial_tokens
        h, blocks = self._root(salt), []
        for b in range((len(prompt) - 1) // page):
            h = compute_block_hash(h, prompt[b * page : (b + 1) * page])
            block = alloc.ledger.hash_to_block.get(h)
            if block is None:
                break
            blocks.append(block)
        if not blocks:
            return 0
        for block in blocks:
            alloc.ledger.acquire(block)
        alloc.block_table[kv.request_id] = blocks
        self._marked[kv.request_id] = len(blocks)
        kv.position_offset = len(blocks) * page
        return kv.position_offset

    def mark_complete(self, kv: KVState, output: list[int], salt: str) -> None:
        """Hash the pages ``kv`` has filled since the last call (its prompt, then ``output``, the
        tokens it generated), so later requests can share them. A page whose content is already
        cached under the same hash is replaced by that one and freed. Costs a comparison on the
        steps that complete no page (most decode steps)."""
        alloc = self._allocator
        page, ledger = alloc.tokens_per_page, alloc.ledger
        table = alloc.block_table.get(kv.request_id, [])
        full, done = min(kv.position_offset // page, len(table)), self._marked.get(kv.request_id, 0)
        if full <= done:
            return
        h = ledger.block_to_hash[table[done - 1]] if done else self._root(salt)
        for i in range(done, full):
            block = table[i]
            known = ledger.block_to_hash.get(block)
            if known is None:
                known = compute_block_hash(h, _tokens(kv.initial_tokens, output, i * page, (i + 1) * page))
                same = ledger.register_new_hash(block, known)
                if same is not None:  # another request cached these tokens first: share its page
                    ledger.acquire(same)
                    table[i] = same
                    if ledger.release(block):
                        alloc.pool.free_blocks(alloc.index, [block])
            h = known
        self._marked[kv.request_id] = full

    @property
    def cached_pages(self) -> int:
        """Pages no request uses, kept for the prefixes they hold."""
        return len(self._allocator.ledger.cached_blocks)

    def _evict(self, pages: int) -> int:
        """Give up to ``pages`` cached pages back to the pool, least recently released first."""
        alloc = self._allocator
        ledger = alloc.ledger
        victims = list(itertools.islice(ledger.cached_blocks, max(pages, 0)))
        for block in victims:
            del ledger.cached_blocks[block]
            ledger.hash_to_block.pop(ledger.block_to_hash.pop(block))
        if victims:
            alloc.pool.free_blocks(alloc.index, victims)
            self.cache.pool.try_to_free_sectors()
        return len(victims)

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
        if not self.cache.can_store_request_tokens(kv, len(tokens)) and not (  # allocates the pages
            self._evict(self._allocator.needs_new_blocks(kv.request_id, kv.position_offset, len(tokens)))
            and self.cache.can_store_request_tokens(kv, len(tokens))
        ):
            raise ParadaptError(
                f"request {kv.request_id!r}: no free KV page for {len(tokens)} tokens; the scheduler's "
                f"kv_tokens/kv_block must match the Runner's ({self.kv_tokens} tokens in blocks of "
                f"{self.kv_block})"
            )
        return FutureRequestState(kv, has_new_token=samples, complete_blocks={}, query_length=len(tokens))
