"""Paged KV caches (transformers' continuous batching) under prefix adapters.

The serving Runner's packed forward hands every attention call transformers'
``PagedAttentionCache`` as ``cache``; the model's attention functions (sdpa, eager,
flash) write the step's new keys and values into the pages and read the request's
whole K/V back themselves when they get one. A prefix adapter puts its own key/value
columns in front of the keys *before* that function runs, so left to it the prefix
columns would be written into the pages as if they were tokens: they would take KV
space and shift every later position.

So when prefixes are present the cache is updated here first, on the new keys and
values alone, and the attention function runs on ``[prefixes; cached + new keys]``
with no cache. Prefixes never enter the KV pages and positions are unchanged
(docs/routing.md, "Prefix adapters in packed mode"; ``tests/serve/test_serve_packed_prefix.py``).
"""

from __future__ import annotations

import torch
from torch import nn


def update_pages(
    module: nn.Module, key: torch.Tensor, value: torch.Tensor, kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Take the paged cache out of an attention call's ``kwargs`` (so the attention function
    does not write to it again) and write ``key`` / ``value`` into its pages; returns the
    keys and values to attend over: the request's whole K/V read back from the pages, or
    ``key`` / ``value`` as given when the call has no cache.
    """
    cache = kwargs.pop("cache", None)
    if cache is None:
        return key, value
    return cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx, kwargs=kwargs)
