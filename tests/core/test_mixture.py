"""Learned mixtures of adapters (pa.Mixture, pa.add_mixture): the invariants and bad input.

Invariants: a gate forced one-hot equals that expert alone (bit-exact, fp32); identical experts
equal one expert; top_k = K with the zero-initialised (uniform) router equals ``Average``;
gradients reach the router only (frozen experts) or router and experts (joint); save/load
round-trips bit-exactly; a mixed batch with mixtures equals each row alone (padded, packed,
in generate; a sequence gate pools only real tokens).
Bad input: each error names its field, and the model is left as it was.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import FAMILIES, outputs, tiny_model
from test_routing_packed import alone, packed_forward, seqs_for

import paradapt as pa
from paradapt.gate import MixtureGate

# pairs of experts that share their sites, of mixed ranks and kinds
PAIRS = {
    "parallel": (pa.ParallelConfig(r=4), pa.ParallelConfig(r=8)),
    "parallel+series": (pa.ParallelConfig(r=8), pa.SeriesConfig(r=4)),
    "lora": (pa.LoRAConfig(r=2), pa.LoRAConfig(r=8, alpha=4)),
    "ia3": (pa.IA3Config(), pa.IA3Config()),
    "ssf+lora_all": (pa.SSFConfig(), pa.LoRAConfig(r=4, targets="all-linear")),
}


def rnd(cfg):
    return dataclasses.replace(cfg, init="random")


def ids_for(batch=3, seq=6, seed=1):
    return torch.randint(1, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


def with_pair(pair: str, family: str = "llama", **kw):
    model = tiny_model(family, **kw)
    a, b = PAIRS[pair]
    pa.add_adapter(model, "a", rnd(a))
    pa.add_adapter(model, "b", rnd(b))
    return model


def gates(model, name: str) -> list[MixtureGate]:
    return list(model.paradapt[name].components.values())


@torch.no_grad()
def force(model, name: str, expert: int) -> None:
    """Make every gate of mixture ``name`` pick expert index ``expert`` (a one-hot gate)."""
    for g in gates(model, name):
        g.router.weight.zero_()
        g.router.bias.fill_(-1e4)
        g.router.bias[expert] = 0.0


def snapshot(model):
    st = getattr(model, "_paradapt_state", None)
    return (
        pa.list_adapters(model),
        None if st is None else sorted(st.sites),
        None if st is None else {k: sorted(s.components) for k, s in st.sites.items()},
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def assert_unchanged(model, before) -> None:
    after = snapshot(model)
    assert after[:4] == before[:4]
    assert after[4].keys() == before[4].keys()
    assert all(torch.equal(after[4][k], v) for k, v in before[4].items())


# -- invariants ------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 1])
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_one_hot_gate_equals_that_expert_alone(pair, top_k):
    model = with_pair(pair)
    ids = ids_for()
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"], top_k=top_k, init="random"))
    for i, expert in enumerate(["a", "b"]):
        pa.set_active(model, expert)
        alone = outputs(model, ids)
        force(model, "mx", i)
        pa.set_active(model, "mx")
        assert torch.equal(outputs(model, ids), alone), (pair, expert)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_hot_gate_on_every_family(family):
    model = with_pair("parallel+series", family)
    ids = ids_for()
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"], top_k=1, init="random"))
    force(model, "mx", 1)
    pa.set_active(model, "b")
    alone = outputs(model, ids)
    pa.set_active(model, "mx")
    assert torch.equal(outputs(model, ids), alone)


def _identical_experts(model, kind_cfg, k: int, tmp_path) -> None:
    pa.add_adapter(model, "e0", rnd(kind_cfg))
    pa.save_adapter(model, "e0", tmp_path / "e0")
    for i in range(1, k):
        pa.load_adapter(model, tmp_path / "e0", name=f"e{i}")


@pytest.mark.parametrize("kind", ["parallel", "lora", "ia3"])
def test_identical_experts_equal_one_expert(kind, tmp_path):
    cfg = {"parallel": PAIRS["parallel"][1], "lora": PAIRS["lora"][1], "ia3": pa.IA3Config()}[kind]
    model = tiny_model("llama")
    ids = ids_for()
    _identical_experts(model, cfg, 3, tmp_path)
    pa.set_active(model, "e0")
    alone = outputs(model, ids)
    # uniform over two copies: 0.5 d + 0.5 d == d exactly
    pa.add_mixture(model, "two", pa.Mixture(experts=["e0", "e1"]))
    pa.set_active(model, "two")
    assert torch.equal(outputs(model, ids), alone)
    # any gate over three copies: sum_i g_i d == d up to rounding
    pa.add_mixture(model, "three", pa.Mixture(experts=["e0", "e1", "e2"], top_k=2, init="random"))
    pa.set_active(model, "three")
    torch.testing.assert_close(outputs(model, ids), alone, atol=1e-6, rtol=1e-6)


def test_all_experts_with_uniform_gate_equal_average():
    model = tiny_model("llama")
    ids = ids_for()
    pa.add_adapter(model, "a", rnd(pa.ParallelConfig(r=4)))
    pa.add_adapter(model, "b", rnd(pa.SeriesConfig(r=16)))
    pa.add_adapter(model, "c", rnd(pa.ParallelConfig(r=8, act="gelu")))
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b", "c"], top_k=3))
    pa.set_active(model, pa.Average("a", "b", "c"))
    average = outputs(model, ids)
    pa.set_active(model, "mx")
    assert torch.equal(outputs(model, ids), average)
    # what a new mixture computes with top_k < K: the first top_k experts, averaged (ties keep the first)
    pa.add_mixture(model, "mx2", pa.Mixture(experts=["c", "a", "b"], top_k=2))
    pa.set_active(model, "mx2")
    got = outputs(model, ids)
    pa.set_active(model, pa.Average("c", "a"))
    assert torch.equal(got, outputs(model, ids))


def test_zero_init_router_gives_uniform_weights():
    model = with_pair("lora")
    pa.add_adapter(model, "c", rnd(pa.LoRAConfig(r=3)))
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b", "c"]))
    x = torch.randn(2, 5, 32)
    for g in gates(model, "mx"):
        w, chosen = g.weights(g.logits(x))
        assert chosen is None
        assert torch.equal(w, torch.full((2, 5, 3), 1 / 3))
    g = MixtureGate(32, ("a", "b", "c"), 2, "sequence")
    torch.nn.init.zeros_(g.router.weight)
    torch.nn.init.zeros_(g.router.bias)
    w, chosen = g.weights(g.logits(x))
    assert w.shape == (2, 1, 3)
    assert torch.equal(w, torch.tensor([0.5, 0.5, 0.0]).expand(2, 1, 3))


def test_top_k_weights_are_renormalised_and_sparse():
    g = MixtureGate(8, ("a", "b", "c", "d"), 2, "token")
    torch.nn.init.normal_(g.router.weight)
    logits = g.logits(torch.randn(3, 4, 8))
    w, chosen = g.weights(logits)
    assert torch.equal((w > 0), chosen)
    assert torch.equal(chosen.sum(-1), torch.full((3, 4), 2))
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 4))
    top = logits.topk(2, dim=-1)
    torch.testing.assert_close(w.gather(-1, top.indices), top.values.softmax(-1))


def test_top_1_keeps_the_chosen_experts_own_probability():
    """Switch's router: renormalised, the one kept weight would always be 1 (no task gradient)."""
    g = MixtureGate(8, ("a", "b", "c"), 1, "token")
    torch.nn.init.normal_(g.router.weight)
    logits = g.logits(torch.randn(2, 5, 8))
    w, chosen = g.weights(logits)
    assert torch.equal(chosen.sum(-1), torch.ones(2, 5, dtype=torch.long))
    probs = logits.softmax(-1)
    torch.testing.assert_close(w, probs * chosen)
    assert bool((w.sum(-1) < 1).all())


def test_top_1_router_learns_from_the_task_loss_alone():
    model = with_pair("parallel+series")
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"], top_k=1, init="random"))
    model.train()
    pa.set_active(model, "mx")
    outputs(model, ids_for()).square().mean().backward()  # no balance loss
    routers = [p.grad for n, p in model.named_parameters() if n.startswith("paradapt.mx.") and "router" in n]
    assert routers and all(gr is not None and gr.abs().sum() > 0 for gr in routers)


class _Counting(torch.nn.Module):
    """An expert component that records how many tokens it was run on, delta = src @ w."""

    reads, writes = "input", "output"

    def __init__(self, dim: int, seed: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed)))
        self.rows: list[int] = []

    def delta(self, src):
        self.rows.append(src.reshape(-1, src.shape[-1]).shape[0])
        return src @ self.w


@pytest.mark.parametrize("top_k,granularity", [(1, "token"), (2, "token"), (1, "sequence")])
def test_top_k_runs_each_expert_only_on_the_tokens_that_kept_it(top_k, granularity):
    """The MoE dispatch: the sparse sum equals the dense sum with the gate's zeros, and the
    experts together see top_k rows per token, not K (gradients reach router and experts)."""
    from paradapt.gate import MixtureOp

    torch.manual_seed(0)
    experts = {n: _Counting(8, i) for i, n in enumerate("abc")}
    gate = MixtureGate(8, tuple(experts), top_k, granularity)
    torch.nn.init.normal_(gate.router.weight, std=2.0)
    h = torch.randn(2, 5, 8, requires_grad=True)
    op = MixtureOp(gate, list(experts.values()), [0, 1, 2], "output", None, None)
    got = op.delta(h, h)
    assert sum(sum(e.rows) for e in experts.values()) == top_k * 10
    g, _ = gate.weights(gate.logits(h.detach()))
    want = sum(g[..., i : i + 1] * (h.detach() @ e.w.detach()) for i, e in enumerate(experts.values()))
    torch.testing.assert_close(got.detach(), want)
    got.square().sum().backward()
    assert gate.router.weight.grad.abs().sum() > 0
    used = [e for e in experts.values() if e.rows]  # an expert no token kept is not run at all
    assert used and all(e.w.grad is not None and e.w.grad.abs().sum() > 0 for e in used)


def _grads(model):
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}


@pytest.mark.parametrize("train_experts", [False, True])
def test_gradients_reach_router_or_router_and_experts(train_experts):
    model = with_pair("parallel+series")
    pa.add_adapter(model, "other", rnd(pa.LoRAConfig(r=2)))
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"], train_experts=train_experts))
    model.train()
    pa.set_active(model, "mx")
    (outputs(model, ids_for()).square().mean() + pa.mixture_aux_loss(model)).backward()
    grads = _grads(model)
    owners = {"mx": True, "a": train_experts, "b": train_experts}
    for n, got in grads.items():
        owner = n.split(".")[1] if n.startswith("paradapt.") else None
        assert got == owners.get(owner, False), n
    assert all(p.requires_grad == train_experts for n in "ab" for p in model.paradapt[n].parameters())


def test_train_experts_none_leaves_flags_and_load_never_changes_them(tmp_path):
    model = with_pair("lora")
    pa.set_trainable(model, "b", False)
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"]))  # train_experts=None
    assert all(p.requires_grad for p in model.paradapt["a"].parameters())
    assert not any(p.requires_grad for p in model.paradapt["b"].parameters())
    assert all(p.requires_grad for p in model.paradapt["mx"].parameters())
    pa.add_mixture(model, "frozen", pa.Mixture(experts=["a", "b"], train_experts=False), trainable=False)
    assert not any(p.requires_grad for n in ("a", "b", "frozen") for p in model.paradapt[n].parameters())
    pa.set_trainable(model, "a", True)
    pa.save_adapter(model, "frozen", tmp_path / "frozen")
    pa.remove_adapter(model, "frozen")
    pa.load_adapter(model, tmp_path / "frozen", trainable=True)
    assert all(p.requires_grad for p in model.paradapt["a"].parameters())  # loading left the expert
    assert all(p.requires_grad for p in model.paradapt["frozen"].parameters())


def test_trainable_parameters_count_the_routers_only():
    model = with_pair("lora")
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"]))
    count = pa.trainable_parameters(model)
    # q and v of 2 layers: a 32 -> 2 router each
    assert count.per_adapter["mx"] == 4 * (32 * 2 + 2)
    assert count.per_adapter["a"] == sum(p.numel() for p in model.paradapt["a"].parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_bit_exact(family, tmp_path):
    model = with_pair("parallel+series", family)
    pa.add_mixture(
        model, "mx", pa.Mixture(experts=["a", "b"], top_k=1, granularity="sequence", init="random")
    )
    ids = ids_for()
    pa.set_active(model, "mx")
    want = outputs(model, ids)
    for n in ("a", "b", "mx"):
        pa.save_adapter(model, n, tmp_path / n)
    fresh = tiny_model(family)
    for n in ("a", "b", "mx"):
        pa.load_adapter(fresh, tmp_path / n)
    assert fresh._paradapt_state.adapters["mx"].config == model._paradapt_state.adapters["mx"].config
    pa.set_active(fresh, "mx")
    assert torch.equal(outputs(fresh, ids), want)
    assert sorted(p.name for p in (tmp_path / "mx").iterdir()) == [
        "adapter.safetensors",
        "adapter_config.json",
    ]


def test_a_mixture_head_saves_and_loads_with_it(tmp_path):
    model = with_pair("parallel", "bert")
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"], head={"labels": ["no", "yes"]}))
    assert pa.heads.head_of(model, "mx").labels == ["no", "yes"]
    pa.save_adapter(model, "mx", tmp_path / "mx")
    pa.remove_adapter(model, "mx")
    pa.load_adapter(model, tmp_path / "mx")
    assert pa.heads.head_of(model, "mx").labels == ["no", "yes"]


def test_layers_limit_the_mixture_and_per_layer_expert_sets():
    """MoLA-style: experts on different layers; each site gates the experts it holds."""
    model = tiny_model("llama")
    ids = ids_for()
    pa.add_adapter(model, "low", rnd(pa.ParallelConfig(r=4, layers=[0])))
    pa.add_adapter(model, "both1", rnd(pa.ParallelConfig(r=4)))
    pa.add_adapter(model, "both2", rnd(pa.ParallelConfig(r=2)))
    pa.add_mixture(model, "mx", pa.Mixture(experts=["low", "both1", "both2"], top_k=2))
    experts = {k: g.experts for k, g in model.paradapt["mx"].components.items()}
    assert experts == {
        "model/layers/0/ffn": ("low", "both1", "both2"),
        "model/layers/1/ffn": ("both1", "both2"),
    }
    pa.add_mixture(model, "top", pa.Mixture(experts=["both1", "both2"], layers=[-1], top_k=1))
    assert list(model.paradapt["top"].components) == ["model/layers/1/ffn"]
    force(model, "top", 0)
    pa.set_active(model, "top")
    got = outputs(model, ids)
    pa.add_adapter(model, "both1_top", rnd(pa.ParallelConfig(r=4, layers=[1])))
    model.paradapt["both1_top"].load_state_dict(
        {k: v for k, v in model.paradapt["both1"].state_dict().items() if "layers/1" in k}
    )
    pa.set_active(model, "both1_top")
    assert torch.equal(got, outputs(model, ids))


MIX_ROWS = [
    ["mx", "a", None, "seq", pa.Stack("a", "b"), "mx"],
    ["seq", "top1", "b", pa.Stack("top1", "a"), None, pa.Average("mx", "b")],
]


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("rows", MIX_ROWS, ids=["one", "two"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_with_mixtures_equals_each_row_alone(family, rows, grad):
    model = with_pair("parallel+series", family)
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"], init="random"))
    pa.add_mixture(model, "top1", pa.Mixture(experts=["b", "a"], top_k=1, init="random"))
    pa.add_mixture(model, "seq", pa.Mixture(experts=["a", "b"], granularity="sequence", init="random"))
    ids = ids_for(batch=len(rows))
    with torch.set_grad_enabled(grad), pa.route(model, rows):
        batched = outputs(model, ids)
    for i, entry in enumerate(rows):
        with torch.no_grad(), pa.route(model, [entry]):
            alone = outputs(model, ids[i : i + 1])
        torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-5, msg=f"row {i} ({entry})")


@pytest.mark.parametrize("family", FAMILIES)
def test_token_mixture_with_padding_mask_equals_each_row_alone(family):
    model = with_pair("lora", family)
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"], top_k=1, init="random"))
    ids = ids_for(batch=3)
    mask = torch.ones_like(ids)
    if family == "bert":
        mask[1, -2:] = 0
    else:
        mask[1, :2] = 0
    rows = ["mx", "mx", "a"]
    with pa.route(model, rows):
        batched = outputs(model, ids, attention_mask=mask)
    for i, entry in enumerate(rows):
        with pa.route(model, [entry]):
            alone = outputs(model, ids[i : i + 1], attention_mask=mask[i : i + 1])
        keep = mask[i].bool()
        torch.testing.assert_close(batched[i][keep], alone[0][keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_gate_pools_real_tokens_only(family):
    """A right-padded row gets the gate it gets alone, unpadded: padding does not enter the pool."""
    model = with_pair("parallel+series", family)
    pa.add_mixture(model, "seq", pa.Mixture(experts=["a", "b"], granularity="sequence", init="random"))
    ids = ids_for(batch=3)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    mask[2, -1:] = 0
    rows = ["seq", "seq", pa.Stack("seq", "a")]
    with pa.route(model, rows):
        batched = outputs(model, ids, attention_mask=mask)
    for i, entry in enumerate(rows):
        n = int(mask[i].sum())
        with pa.route(model, [entry]):
            alone = outputs(model, ids[i : i + 1, :n])
        torch.testing.assert_close(batched[i, :n], alone[0], atol=1e-5, rtol=1e-5, msg=f"row {i}")


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_packed_route_with_token_mixtures_equals_each_request_alone(family, per_token):
    """Continuous batching's packed [1, T] row: each token is gated on its own, as alone."""
    model = with_pair("ia3", family)
    pa.add_adapter(model, "p", rnd(pa.ParallelConfig(r=4)))
    pa.add_adapter(model, "s", rnd(pa.SeriesConfig(r=8)))
    pa.add_mixture(model, "m_ia3", pa.Mixture(experts=["a", "b"], init="random"))
    pa.add_mixture(model, "m_ffn", pa.Mixture(experts=["p", "s"], top_k=1, init="random"))
    routes = ["m_ffn", "a", None, "m_ia3", pa.Stack("m_ffn", "m_ia3"), "m_ffn"]
    seqs = seqs_for([3, 2, 4, 1, 5, 2])
    with torch.no_grad():
        got = packed_forward(model, seqs, routes, per_token=per_token)
        want = alone(model, seqs, routes)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mixture_in_generate_matches_each_row_alone():
    model = with_pair("lora")
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"], top_k=1, init="random"))
    ids = ids_for(batch=3, seq=4)
    rows = ["mx", "a", "mx"]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.inference_mode(), pa.route(model, rows):
        batched = model.generate(ids, **kw)
    for i, entry in enumerate(rows):
        with torch.inference_mode(), pa.route(model, [entry]):
            assert torch.equal(model.generate(ids[i : i + 1], **kw)[0], batched[i])


def test_aux_loss_is_switch_balance_over_the_latest_forward():
    model = with_pair("parallel")
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"]))
    pa.add_adapter(model, "c", rnd(pa.ParallelConfig(r=2)))
    pa.set_active(model, "mx")
    outputs(model, ids_for())
    loss = pa.mixture_aux_loss(model)
    assert torch.equal(loss, torch.tensor(1.0))  # a uniform gate is perfectly balanced
    assert loss.requires_grad
    assert len(model._paradapt_state.gate_losses()) == 2  # one per site (2 FFNs), this forward only
    outputs(model, ids_for())
    assert len(model._paradapt_state.gate_losses()) == 2
    force(model, "mx", 1)  # collapsed onto one expert: K * 1 * 1 = 2
    outputs(model, ids_for())
    assert torch.equal(pa.mixture_aux_loss(model, "mx"), torch.tensor(2.0))
    with torch.no_grad():
        outputs(model, ids_for())
    assert torch.equal(pa.mixture_aux_loss(model), torch.tensor(0.0))  # inference records nothing
    with pytest.raises(pa.ConfigError, match="not a mixture") as e:
        pa.mixture_aux_loss(model, "c")
    assert e.value.field == "name"
    copy.deepcopy(model)  # the recorded terms (autograd tensors) do not travel with a copy


def test_remove_mixture_then_experts_and_unwrap():
    model = with_pair("ia3")
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("paradapt.")}
    ids = ids_for()
    pa.set_active(model, "a")
    alone = outputs(model, ids)
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"]))
    pa.set_active(model, "mx")
    pa.remove_adapter(model, "mx")
    assert pa.active(model) is None
    pa.set_active(model, "a")
    assert torch.equal(outputs(model, ids), alone)
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"]))
    pa.unwrap(model)  # removes the mixture before its experts
    assert model.state_dict().keys() == before.keys()


def test_merge_and_fuse_refuse_a_mixture():
    model = with_pair("lora")
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"]))
    with pytest.raises(pa.MergeError, match="gate"):
        pa.merge(model, "mx")


# -- bad input -------------------------------------------------------------------------------


def _refused(model, call, error, field: str, match: str):
    before = snapshot(model)
    with pytest.raises(error, match=match) as e:
        call()
    assert e.value.field == field
    assert_unchanged(model, before)


def test_unknown_expert():
    model = with_pair("lora")
    _refused(
        model,
        lambda: pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "nope"])),
        pa.ConfigError,
        "experts[1]",
        "no adapter named 'nope'.*loaded: a, b",
    )


def test_experts_at_different_sites():
    model = tiny_model("llama")
    pa.add_adapter(model, "ffn", rnd(pa.ParallelConfig(r=4)))
    pa.add_adapter(model, "qv", rnd(pa.LoRAConfig(r=4)))
    _refused(
        model,
        lambda: pa.add_mixture(model, "mx", pa.Mixture(experts=["ffn", "qv"])),
        pa.ConfigError,
        "experts[0]",
        "shares no site",
    )
    _refused(
        model,
        lambda: pa.add_mixture(model, "mx", pa.Mixture(experts=["ffn", "qv"], layers=[5])),
        pa.ConfigError,
        "layers",
        "out of range",
    )


def test_prefix_experts_are_refused():
    model = with_pair("parallel")
    pa.add_adapter(model, "p", pa.PrefixConfig(num_virtual_tokens=2, reparam=False))
    pa.add_adapter(model, "mam", pa.MAMConfig(num_virtual_tokens=2, r=4, reparam=False))
    for i, name in ((2, "p"), (0, "mam")):
        experts = ["a", "b", name] if i == 2 else [name, "a"]
        _refused(
            model,
            lambda experts=experts: pa.add_mixture(model, "mx", pa.Mixture(experts=experts)),
            pa.ConfigError,
            f"experts[{i}]",
            "prefix experts are not supported",
        )


def test_mixture_of_mixtures_is_refused():
    model = with_pair("parallel")
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"]))
    _refused(
        model,
        lambda: pa.add_mixture(model, "mx2", pa.Mixture(experts=["a", "mx"])),
        pa.ConfigError,
        "experts[1]",
        "mixture of mixtures",
    )


def test_merged_expert_is_refused():
    model = with_pair("lora")
    pa.merge(model, "a")
    _refused(
        model,
        lambda: pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"])),
        pa.ConfigError,
        "experts[0]",
        "merged",
    )


@pytest.mark.parametrize(
    ("kwargs", "field", "match"),
    [
        ({"experts": ["a", "b"], "top_k": 3}, "top_k", "from 1 to 2"),
        ({"experts": ["a", "b"], "top_k": 0}, "top_k", "from 1 to 2"),
        ({"experts": ["a", "b"], "top_k": 1.5}, "top_k", "integer"),
        ({"experts": ["a"]}, "experts", "at least two"),
        ({"experts": ["a", "a"]}, "experts", "more than once"),
        ({"experts": "ab"}, "experts", "list of adapter names"),
        ({"experts": ["a", "b"], "granularity": "row"}, "granularity", "token"),
        ({"experts": ["a", "b"], "train_experts": "yes"}, "train_experts", "true, false"),
    ],
)
def test_bad_mixture_fields(kwargs, field, match):
    with pytest.raises(pa.ConfigError, match=match) as e:
        pa.Mixture(**kwargs)
    assert e.value.field == field


def test_wrong_entry_points():
    model = with_pair("lora")
    _refused(
        model,
        lambda: pa.add_adapter(model, "mx", pa.Mixture(experts=["a", "b"])),
        pa.ConfigError,
        "config",
        "pa.add_mixture",
    )
    _refused(model, lambda: pa.add_mixture(model, "mx", pa.LoRAConfig()), pa.ConfigError, "config", "Mixture")
    with pytest.raises(pa.AdapterNotFoundError):
        pa.add_mixture(tiny_model("llama"), "mx", pa.Mixture(experts=["a", "b"]))
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"]))
    with pytest.raises(pa.AdapterExistsError):
        pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"]))


def test_removing_an_expert_in_use_is_refused():
    model = with_pair("parallel")
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"]))
    _refused(
        model, lambda: pa.remove_adapter(model, "b"), pa.ConfigError, "experts", "expert of mixture 'mx'"
    )
    pa.remove_adapter(model, "mx")
    pa.remove_adapter(model, "b")
    assert pa.list_adapters(model) == ["a"]


def test_sequence_mixture_refused_in_packed_route():
    model = with_pair("parallel")
    pa.add_mixture(model, "seq", pa.Mixture(experts=["a", "b"], granularity="sequence"))
    with (
        pytest.raises(pa.RoutingError, match="granularity='sequence'"),
        pa.route(model, ["seq", "a"], packed=True, lengths=[3, 2]),
    ):
        pass


def test_load_mixture_before_its_experts_names_the_file(tmp_path):
    model = with_pair("parallel")
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"]))
    pa.save_adapter(model, "mx", tmp_path / "mx")
    fresh = tiny_model("llama")
    pa.add_adapter(fresh, "a", pa.ParallelConfig(r=4))
    _refused(
        fresh,
        lambda: pa.load_adapter(fresh, tmp_path / "mx"),
        pa.ConfigError,
        "experts[1]",
        r"no adapter named 'b'.*\(in .*adapter_config.json\)",
    )


def test_load_mixture_onto_another_base_model_or_other_experts(tmp_path):
    model = with_pair("parallel")
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"]))
    pa.save_adapter(model, "mx", tmp_path / "mx")
    wider = with_pair("parallel", hidden_size=48)
    _refused(
        wider,
        lambda: pa.load_adapter(wider, tmp_path / "mx"),
        pa.IncompatibleAdapterError,
        "base_model.hidden_size",
        "hidden_size=32",
    )
    # same names, other kinds at other sites: the routers' sites do not match the file
    other = with_pair("lora")
    _refused(
        other,
        lambda: pa.load_adapter(other, tmp_path / "mx"),
        pa.IncompatibleAdapterError,
        "weights",
        "missing",
    )
    # same sites, three experts there instead of two: the routers' shapes do not match
    three = with_pair("parallel")
    pa.add_adapter(three, "c", pa.ParallelConfig(r=2))
    cfg = tmp_path / "mx" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"b"\n', '"b",\n      "c"\n'))
    _refused(
        three,
        lambda: pa.load_adapter(three, tmp_path / "mx"),
        pa.IncompatibleAdapterError,
        "weights.components.model/layers/0/ffn.router.bias",
        r"shape \(2,\).*needs \(3,\)",
    )
