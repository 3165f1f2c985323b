"""Prefix adapters under packed (per-token) routes: each request's prefix is visible to its tokens only.

A packed ``[1, T]`` row holds several requests; a prefix adapter's keys and values must join the
attention of exactly its own request's tokens, as if that request ran alone with the adapter.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_routing_packed import alone, packed_forward, seqs_for

import paradapt as pa


def add_prefix_zoo(model) -> None:
    """Joint and gated prefixes of different lengths, a MAM adapter, and a LoRA beside them."""
    pa.add_adapter(model, "lo", pa.LoRAConfig(r=4, init="random"))
    pa.add_adapter(model, "pre", pa.PrefixConfig(num_virtual_tokens=2, init="random"))
    pa.add_adapter(model, "pre5", pa.PrefixConfig(num_virtual_tokens=5, init="random", reparam=False))
    pa.add_adapter(model, "gate", pa.PrefixConfig(num_virtual_tokens=3, init="random", gated=True))
    pa.add_adapter(model, "mam", pa.MAMConfig(num_virtual_tokens=2, r=8, init="random"))


ROUTES = ["pre", "lo", None, "pre5", "gate", "pre", "mam", pa.Stack("lo", "pre"), pa.Stack("pre", "gate")]
LENGTHS = [3, 1, 4, 2, 5, 1, 3, 4, 2]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_prefixes_equal_each_request_alone(family):
    model = tiny_model(family)
    add_prefix_zoo(model)
    seqs = seqs_for(LENGTHS, seed=3)
    with torch.no_grad():
        got = packed_forward(model, seqs, ROUTES)
        ref = alone(model, seqs, ROUTES)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_packed_prefix_alone_in_the_step_and_per_token_entries():
    model = tiny_model("llama")
    add_prefix_zoo(model)
    seqs = seqs_for([4, 2], seed=4)
    with torch.no_grad():
        for routes in (["pre", "pre"], ["gate", None]):
            ref = alone(model, seqs, routes)
            torch.testing.assert_close(packed_forward(model, seqs, routes), ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                packed_forward(model, seqs, routes, per_token=True), ref, atol=1e-5, rtol=1e-5
            )


def test_packed_prefix_needs_a_mask_based_attention():
    model = tiny_model("llama")
    pa.add_adapter(model, "pre", pa.PrefixConfig(num_virtual_tokens=2, init="random"))
    site = next(s for s in pa.state.get_state(model).sites.values() if s.kind == "attention")
    site.original_config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(pa.RoutingError, match="'pre'.*'sdpa' or 'eager'"):
        with pa.route(model, ["pre", None], packed=True, lengths=[2, 3]):
            pass
