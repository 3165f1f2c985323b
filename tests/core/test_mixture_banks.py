"""A mixture's experts through the banks (issue 19, ``paradapt.mixture_banks``).

In a mixed batch at inference (a packed step, a padded batch of several routes) a mixture's
bankable experts run in the site's banks, not as their own modules: these tests count the
experts' module calls (zero) and the rows each bank call gets (top_k per mixture token), and
check the numbers: each row equals itself alone (to the banks' usual tolerance: a bank rounds
differently from a module), and a one-hot gate's tokens equal its expert's banked tokens in the
same step bit for bit. Experts a bank does not hold ((IA)^3), or in training mode, keep the
module path.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import FAMILIES, outputs, tiny_model
from test_mixture import force
from test_routing_packed import alone, packed_forward, seqs_for

import paradapt as pa
from paradapt import kernels
from paradapt.banks import Bank
from paradapt.bottleneck import Bottleneck
from paradapt.scale_shift import ScaleShift

STRATEGIES = [*kernels.STRATEGIES, None]


def rnd(cfg):
    return dataclasses.replace(cfg, init="random")


@pytest.fixture
def module_calls(monkeypatch):
    """Every bottleneck module's ``delta`` call (its input's shape): a banked row makes none."""
    calls: list[tuple] = []
    orig = Bottleneck.delta

    def counting(self, src):
        calls.append(tuple(src.shape))
        return orig(self, src)

    monkeypatch.setattr(Bottleneck, "delta", counting)
    return calls


@pytest.fixture
def bank_rows(monkeypatch):
    """The rows of every bank call, as (rows, tokens per row)."""
    rows: list[tuple[int, int]] = []
    orig = Bank.delta

    def recording(self, src, seg):
        rows.append((src.shape[0], src.shape[1]))
        return orig(self, src, seg)

    monkeypatch.setattr(Bank, "delta", recording)
    return rows


def zoo(family: str):
    """LoRA experts of two ranks (two banks per linear), FFN experts of two kinds, mixtures over them."""
    model = tiny_model(family)
    pa.add_adapter(model, "l4", rnd(pa.LoRAConfig(r=4)))
    pa.add_adapter(model, "l8", rnd(pa.LoRAConfig(r=8)))
    pa.add_adapter(model, "l4b", rnd(pa.LoRAConfig(r=4)))
    pa.add_adapter(model, "par", rnd(pa.ParallelConfig(r=4, act="gelu")))
    pa.add_adapter(model, "ser", rnd(pa.SeriesConfig(r=8)))
    pa.add_mixture(model, "top2", pa.Mixture(experts=["l4", "l8", "l4b"], top_k=2, init="random"))
    pa.add_mixture(model, "dense", pa.Mixture(experts=["l8", "l4"], init="random"))
    pa.add_mixture(model, "ffn", pa.Mixture(experts=["par", "ser"], top_k=1, init="random"))
    return model


ROUTES = ["top2", "l4", None, "ffn", "dense", "top2", "ser", "ffn"]
LENGTHS = [3, 2, 4, 1, 5, 1, 3, 2]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_mixture_rows_run_their_experts_in_the_banks(family, strategy, module_calls):
    model = zoo(family)
    seqs = seqs_for(LENGTHS)
    with torch.no_grad():
        want = alone(model, seqs, ROUTES)
        module_calls.clear()
        with kernels.force(strategy):
            got = packed_forward(model, seqs, ROUTES)
        assert module_calls == []  # no expert ran as its own module: mixtures and plain rows alike
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        base = alone(model, seqs, [None if r in ("top2", "dense", "ffn") else r for r in ROUTES])
    assert not torch.allclose(got, base, atol=1e-3)  # the mixtures did something


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_mixed_batch_runs_mixture_experts_in_the_banks(family, module_calls):
    model = zoo(family)
    rows = ["top2", "l8", None, "ffn", "dense"]
    ids = torch.randint(1, 96, (len(rows), 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        module_calls.clear()
        with pa.route(model, rows):
            got = outputs(model, ids)
        assert module_calls == []
        for i, entry in enumerate(rows):
            with pa.route(model, [entry]):
                want = outputs(model, ids[i : i + 1])
            torch.testing.assert_close(got[i], want[0], atol=1e-5, rtol=1e-5, msg=f"row {i} ({entry})")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("family", FAMILIES)
def test_one_hot_gate_in_a_packed_step_equals_its_experts_banked_tokens(family, strategy):
    """The same token routed to a one-hot mixture and to its expert, in one step: bit-exact with
    one row-wise strategy for every bank call (the same slot, the same math, though the calls' row
    counts differ), and both equal the expert alone up to the banks' rounding. ``segments`` and
    ``grouped`` multiply a segment's rows at once, and a matmul's bits may depend on its row count
    (MKL on an AMD EPYC: one row and two round differently); the measured choice may pick another
    strategy for the mixture's call (another shape class): for these, only rounding."""
    model = zoo(family)
    # The two copies are one token each: a lone token's attention is its own value exactly, so
    # their bits cannot differ through the base model's packed attention, whose rounding depends
    # on a row's offset in the packed block on some CPUs (an AMD EPYC here), not only on its data.
    seqs = seqs_for([1, 3, 1, 2, 1])
    seqs[2] = seqs[0]
    for expert, i in (("l8", 1), ("l4b", 2)):
        force(model, "top2", i)  # top_k=2 forced one-hot: the other kept expert weighs exactly 0
        routes = ["top2", "l4", expert, "dense", "top2"]
        with torch.no_grad(), kernels.force(strategy):
            got = packed_forward(model, seqs, routes)
            want = alone(model, seqs, [expert, "l4", expert, "dense", expert])
        if strategy in ("gather", "kernel"):
            assert torch.equal(got[0, 0], got[0, 4]), expert
        torch.testing.assert_close(got[0, 0], got[0, 4], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k,per_token", [(1, 1), (2, 2), (None, 3)])
def test_each_bank_call_gets_top_k_rows_per_mixture_token(top_k, per_token, bank_rows):
    """Three same-rank experts share one bank per site: one call there, ``top_k`` rows per token
    (the dense gate: all three), each row a single token."""
    model = tiny_model("llama")
    for n in ("e0", "e1", "e2"):
        pa.add_adapter(model, n, rnd(pa.LoRAConfig(r=4)))
    pa.add_mixture(model, "mx", pa.Mixture(experts=["e0", "e1", "e2"], top_k=top_k, init="random"))
    seqs = seqs_for([3, 2, 4])
    with torch.no_grad():
        bank_rows.clear()
        got = packed_forward(model, seqs, ["mx", None, "mx"])
        calls = list(bank_rows)
        torch.testing.assert_close(got, alone(model, seqs, ["mx", None, "mx"]), atol=1e-5, rtol=1e-5)
    sites = sum(1 for _ in model.paradapt["e0"].components)
    assert len(calls) == sites
    assert calls == [(per_token * 7, 1)] * sites


def test_experts_a_bank_does_not_hold_keep_the_module_path(monkeypatch, module_calls):
    """(IA)^3 experts are no bottlenecks: their mixture's rows take the general path (each expert
    as its own module), next to a LoRA mixture's banked rows in the same step."""
    scale_calls = []
    orig = ScaleShift.delta

    def counting(self, src):
        scale_calls.append(tuple(src.shape))
        return orig(self, src)

    monkeypatch.setattr(ScaleShift, "delta", counting)
    model = tiny_model("llama")
    pa.add_adapter(model, "i0", rnd(pa.IA3Config()))
    pa.add_adapter(model, "i1", rnd(pa.IA3Config()))
    pa.add_adapter(model, "l0", rnd(pa.LoRAConfig(r=4)))
    pa.add_adapter(model, "l1", rnd(pa.LoRAConfig(r=2)))
    pa.add_mixture(model, "m_ia3", pa.Mixture(experts=["i0", "i1"], top_k=1, init="random"))
    pa.add_mixture(model, "m_lora", pa.Mixture(experts=["l0", "l1"], top_k=1, init="random"))
    seqs = seqs_for([3, 2, 4])
    routes = ["m_ia3", "m_lora", None]
    with torch.no_grad():
        scale_calls.clear()
        module_calls.clear()
        got = packed_forward(model, seqs, routes)
        assert scale_calls and module_calls == []
        torch.testing.assert_close(got, alone(model, seqs, routes), atol=1e-5, rtol=1e-5)


def test_experts_in_training_mode_keep_the_module_path(module_calls):
    """An expert in training mode (dropout) is never banked, as a plain adapter in training is not."""
    model = zoo("llama")
    seqs = seqs_for([3, 2])
    routes = ["dense", "l4"]
    with torch.no_grad():
        want = alone(model, seqs, routes)
        model.paradapt["l8"].train()
        module_calls.clear()
        got = packed_forward(model, seqs, routes)
    assert module_calls  # l8 (and its mixture's l4, at the same sites) ran as modules
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gradients_take_the_module_path_and_reach_the_router(module_calls):
    """With autograd on (training a router) a mixed batch runs the experts as modules, which
    autograd sees through; the banks are for inference only."""
    model = zoo("llama")
    ids = torch.randint(1, 96, (3, 5), generator=torch.Generator().manual_seed(3))
    with pa.route(model, ["top2", "l4", None]):
        outputs(model, ids).square().mean().backward()
    assert module_calls
    routers = [p.grad for n, p in model.named_parameters() if n.startswith("paradapt.top2.")]
    assert routers and all(g is not None and g.abs().sum() > 0 for g in routers)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_sequence_gate_in_a_padded_batch_runs_in_the_banks(family, module_calls):
    """A sequence gate's row weight (pooled over real tokens only) weighs every token's banked
    expert rows: right-padded rows equal themselves alone, unpadded."""
    model = zoo(family)
    pa.add_mixture(model, "seq", pa.Mixture(experts=["par", "ser"], granularity="sequence", init="random"))
    rows = ["seq", "l4", "seq", "top2"]
    ids = torch.randint(1, 96, (len(rows), 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    mask[2, -1:] = 0
    with torch.no_grad():
        module_calls.clear()
        with pa.route(model, rows):
            got = outputs(model, ids, attention_mask=mask)
        assert module_calls == []
        for i, entry in enumerate(rows):
            n = int(mask[i].sum())
            with pa.route(model, [entry]):
                want = outputs(model, ids[i : i + 1, :n])
            torch.testing.assert_close(got[i, :n], want[0], atol=1e-5, rtol=1e-5, msg=f"row {i} ({entry})")
