"""Packed (per-token) routing: one [1, T] sequence holding several requests back to back.

Continuous batching packs every scheduled request's tokens into one row; ``pa.route(...,
packed=True)`` routes each token by its request's adapter. Each test compares a packed forward
(block-diagonal mask, per-request positions) with every request run alone.
"""

from __future__ import annotations

import pytest
import torch
from conftest import outputs, tiny_model

import paradapt as pa
from paradapt import kernels
from paradapt.state import get_state


def packed_inputs(seqs: list[list[int]], causal: bool = True) -> dict:
    """``input_ids``, ``position_ids`` and a block-diagonal additive mask for one packed row."""
    total = sum(len(s) for s in seqs)
    allowed = torch.zeros(total, total, dtype=torch.bool)
    o = 0
    for s in seqs:
        block = torch.ones(len(s), len(s), dtype=torch.bool)
        allowed[o : o + len(s), o : o + len(s)] = block.tril() if causal else block
        o += len(s)
    return {
        "input_ids": torch.tensor([[t for s in seqs for t in s]]),
        "position_ids": torch.tensor([[i for s in seqs for i in range(len(s))]]),
        "attention_mask": torch.zeros(1, 1, total, total).masked_fill(~allowed, float("-inf")),
    }


def packed_forward(model, seqs, routes, *, per_token: bool = False) -> torch.Tensor:
    """Outputs of the packed row ``[1, T, ...]`` under per-request ``routes``."""
    kw = packed_inputs(seqs, causal=model.config.model_type != "bert")
    ids = kw.pop("input_ids")
    if per_token:
        ctx = pa.route(model, [r for r, s in zip(routes, seqs, strict=True) for _ in s], packed=True)
    else:
        ctx = pa.route(model, routes, packed=True, lengths=[len(s) for s in seqs])
    with ctx:
        return outputs(model, ids, **kw)


def alone(model, seqs, routes) -> torch.Tensor:
    """Each request run on its own with its route, concatenated along the sequence."""
    outs = []
    for s, r in zip(seqs, routes, strict=True):
        with pa.route(model, r):
            outs.append(outputs(model, torch.tensor([s])))
    return torch.cat(outs, dim=1)


def add_zoo(model) -> None:
    """Every bottleneck kind, (IA)^3, SSF, and mixed ranks."""
    pa.add_adapter(model, "lora4", pa.LoRAConfig(r=4, init="random"))
    pa.add_adapter(model, "lora8", pa.LoRAConfig(r=8, init="random", targets="all-linear"))
    pa.add_adapter(model, "par", pa.ParallelConfig(r=8, init="random", location="both", act="gelu"))
    pa.add_adapter(model, "par_ls", pa.ParallelConfig(r=4, init="random", scale="learned", bias=False))
    pa.add_adapter(model, "ser", pa.SeriesConfig(r=4, init="random", variant="houlsby", act="silu"))
    pa.add_adapter(model, "ia3", pa.IA3Config(init="random"))
    pa.add_adapter(model, "ssf", pa.SSFConfig(init="random"))


ROUTES = ["lora4", "par", None, "lora8", "ser", "lora4", "par_ls", "ia3", "ssf", pa.Stack("lora4", "par")]
LENGTHS = [3, 1, 5, 2, 4, 1, 6, 3, 2, 4]


def seqs_for(lengths=LENGTHS, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("strategy", [*kernels.STRATEGIES, None])
def test_packed_equals_each_request_alone(family, strategy):
    model = tiny_model(family)
    add_zoo(model)
    seqs = seqs_for()
    with torch.no_grad():
        ref = alone(model, seqs, ROUTES)
        with kernels.force(strategy):
            got = packed_forward(model, seqs, ROUTES)
    assert not torch.allclose(ref, alone(model, seqs, [None] * len(seqs)), atol=1e-3)  # adapters matter
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_per_token_entries_equal_segments_and_share_one_segment_build():
    model = tiny_model("llama")
    add_zoo(model)
    seqs = seqs_for()
    with torch.no_grad():
        a = packed_forward(model, seqs, ROUTES)
        b = packed_forward(model, seqs, ROUTES, per_token=True)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with torch.no_grad(), pa.route(model, ROUTES, packed=True, lengths=LENGTHS) as route_map:
        kw = packed_inputs(seqs)
        outputs(model, kw.pop("input_ids"), **kw)
    layouts = {id(b.layout) for site in get_state(model).sites.values() for b in site.banks.values()}
    assert route_map.segment_builds == len(layouts)  # once per bank layout in the forward, not per site or layer
    assert len(layouts) < sum(len(site.banks) for site in get_state(model).sites.values())


def test_packed_with_autograd_takes_the_general_path_and_matches():
    """Training-mode forwards (grad enabled) route tokens per group, as autograd needs."""
    model = tiny_model("llama")
    add_zoo(model)
    seqs = seqs_for([4, 3, 5, 2], seed=2)
    routes = ["lora8", "ser", None, "ia3"]
    got = packed_forward(model, seqs, routes)
    with torch.no_grad():
        ref = alone(model, seqs, routes)
    torch.testing.assert_close(got.detach(), ref, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".lora8." in f".{n}.")
    assert all(g is None for n, g in grads.items() if n.startswith("paradapt.par."))  # not routed


def test_all_tokens_base_or_one_adapter():
    model = tiny_model("gpt2")
    add_zoo(model)
    seqs = seqs_for([3, 4])
    with torch.no_grad():
        torch.testing.assert_close(
            packed_forward(model, seqs, [None, None]), alone(model, seqs, [None, None]), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            packed_forward(model, seqs, ["par", "par"]),
            alone(model, seqs, ["par", "par"]),
            atol=1e-5,
            rtol=1e-5,
        )


def test_prefix_adapter_on_the_model_but_not_routed_is_fine():
    model = tiny_model("llama")
    pa.add_adapter(model, "lo", pa.LoRAConfig(r=4, init="random"))
    pa.add_adapter(model, "pre", pa.PrefixConfig(num_virtual_tokens=2, init="random"))
    seqs = seqs_for([2, 3])
    with torch.no_grad():  # packed prefixes themselves: tests/core/test_routing_packed_prefix.py
        torch.testing.assert_close(
            packed_forward(model, seqs, ["lo", None]), alone(model, seqs, ["lo", None]), atol=1e-5, rtol=1e-5
        )


def test_packed_route_errors_name_the_mismatch():
    model = tiny_model("llama")
    pa.add_adapter(model, "lo", pa.LoRAConfig(r=4, init="random"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(pa.RoutingError, match="3 token entries but the packed sequence has 4 tokens"):
        with pa.route(model, ["lo", None, "lo"], packed=True):
            model(ids)
    with pytest.raises(pa.RoutingError, match="one packed row"):
        with pa.route(model, ["lo"] * 4, packed=True):
            model(torch.tensor([[5, 6], [7, 8]]))
    with pytest.raises(pa.RoutingError, match="2 entries but 3 segment lengths"):
        with pa.route(model, ["lo", None], packed=True, lengths=[1, 2, 1]):
            pass
    with pytest.raises(pa.RoutingError, match=r"lengths\[1\]"):
        with pa.route(model, ["lo", None], packed=True, lengths=[1, -2]):
            pass
    with pytest.raises(pa.RoutingError, match="packed=True"):
        with pa.route(model, ["lo"], lengths=[4]):
            pass
    with pytest.raises(pa.RoutingError, match="takes a list"):
        with pa.route(model, "lo", packed=True):
            pass
