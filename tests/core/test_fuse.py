"""Fused parallel adapters: exact equality with the unfused adapter, exact undo, clear refusals."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from conftest import FAMILIES, outputs, tiny_model
from torch import nn

import paradapt as pa
from paradapt.fusing import SplitActivation, fuse, fused_owner, unfuse
from paradapt.state import get_state

VARIANTS = {
    "relu": dict(act="relu", scale=4.0),
    "silu_nobias_learned": dict(act="silu", bias=False, scale="learned"),
    "gelu_layer1": dict(act="gelu", scale=0.5, layers=[1]),
}


def _ids(batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(1, 96, (batch, seq), generator=torch.Generator().manual_seed(1))


def _model(family: str) -> nn.Module:
    """A tiny model; "llama_bias" is Llama with biases on its FFN projections."""
    if family == "llama_bias":
        return tiny_model("llama", mlp_bias=True)
    return tiny_model(family)


def _add(model: nn.Module, name: str = "a", **kw) -> None:
    kw = {"r": 4, "init": "random", **kw}
    pa.add_adapter(model, name, pa.ParallelConfig(**kw))
    with torch.no_grad():  # a learned scale away from its init, so folding it in is tested
        for comp in model.paradapt[name].components.values():
            if isinstance(comp.scale, nn.Parameter):
                comp.scale.fill_(1.7)


def _unfused(model: nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    pa.set_active(model, name)
    out = outputs(model, ids)
    pa.set_active(model, None)
    return out


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert list(now) == list(saved)
    for k, v in saved.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


# -- 1. fused == unfused -----------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", [*FAMILIES, "llama_bias"])
def test_fused_equals_unfused(family, variant):
    model = _model(family)
    ids = _ids()
    _add(model, **VARIANTS[variant])
    ref = _unfused(model, "a", ids)
    fuse(model, "a")
    torch.testing.assert_close(outputs(model, ids), ref, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(outputs(model, ids), ref, atol=1e-5, rtol=1e-5)


def test_fuse_marks_adapter_and_freezes_weights(family):
    model = tiny_model(family)
    _add(model)
    pa.set_active(model, "a")
    fuse(model, "a")
    st = get_state(model)
    rec = st.record("a")
    assert rec.merged and rec.fused is not None and "a" in st.merged
    assert pa.active(model) is None  # like merge: the plain forward applies it to every row
    acts = [m for m in model.modules() if isinstance(m, SplitActivation)]
    assert len(acts) == 2
    for f in rec.fused.ffns:
        for lin in f.linears:
            assert not any(p.requires_grad for p in lin.parameters(recurse=False))
    with pytest.raises(pa.RoutingError, match="merged"):
        pa.set_active(model, "a")


def test_fuse_with_custom_ffn_targets():
    model = tiny_model("llama")
    ids = _ids()
    _add(model, targets={"entry": r"model\.layers\.\d+\.mlp"})
    ref = _unfused(model, "a", ids)
    fuse(model, "a")
    torch.testing.assert_close(outputs(model, ids), ref, atol=1e-5, rtol=1e-5)


def test_two_adapters_fused_in_different_layers_equal_their_stack():
    model = tiny_model("gpt2")
    ids = _ids()
    _add(model, "a", layers=[0])
    _add(model, "b", layers=[1], act="tanh", bias=False)
    pa.set_active(model, ["a", "b"])
    ref = outputs(model, ids)
    fuse(model, "a")
    fuse(model, "b")
    torch.testing.assert_close(outputs(model, ids), ref, atol=1e-5, rtol=1e-5)


# -- 2. unfuse restores exactly -------------------------------------------------------------


def test_unfuse_restores_weights_tree_and_adapter(family):
    model = tiny_model(family)
    ids = _ids()
    _add(model)
    ref = _unfused(model, "a", ids)
    saved = _snapshot(model)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    fuse(model, "a")
    assert any(p is not params[k] for k, p in model.named_parameters())  # the FFN weights were swapped
    unfuse(model, "a")
    _assert_same_state(model, saved)
    now_params = dict(model.named_parameters())
    assert list(now_params) == list(params)
    assert all(now_params[k] is p for k, p in params.items())
    now_modules = dict(model.named_modules())
    assert list(now_modules) == list(modules)
    assert all(now_modules[k] is m for k, m in modules.items())
    st = get_state(model)
    assert not st.record("a").merged and st.record("a").fused is None and not st.merged
    assert torch.equal(_unfused(model, "a", ids), ref)
    fuse(model, "a")  # fusable again
    torch.testing.assert_close(outputs(model, ids), ref, atol=1e-5, rtol=1e-5)


def test_unfuse_after_moving_the_model_keeps_originals():
    model = tiny_model("llama")
    _add(model)
    saved = _snapshot(model)
    weight = model.model.layers[0].mlp.down_proj.weight
    fuse(model, "a")
    model.to(torch.float64)
    unfuse(model, "a")
    assert model.model.layers[0].mlp.down_proj.weight is weight
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float64 and torch.equal(v, saved[k].double()), k


# -- 3. fused then removed == base ------------------------------------------------------------


def test_remove_fused_adapter_gives_base_back(family):
    model = tiny_model(family)
    ids = _ids()
    base = outputs(model, ids)
    saved = _snapshot(model)
    _add(model)
    fuse(model, "a")
    pa.remove_adapter(model, "a")
    assert torch.equal(outputs(model, ids), base)
    pa.unwrap(model)
    _assert_same_state(model, saved)
    assert not any(isinstance(m, SplitActivation) for m in model.modules())


# -- 4. refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        pa.LoRAConfig(r=2),
        pa.SeriesConfig(r=4),
        pa.PrefixConfig(num_virtual_tokens=2, reparam=False),
        pa.MAMConfig(num_virtual_tokens=2, r=4, reparam=False),
        pa.IA3Config(),
        pa.ParallelConfig(r=4, location="attn"),
        pa.ParallelConfig(r=4, location="both"),
    ],
    ids=["lora", "series", "prefix", "mam", "ia3", "parallel_attn", "parallel_both"],
)
def test_unfusable_adapters_raise_and_change_nothing(config):
    model = tiny_model("llama")
    pa.add_adapter(model, "bad_one", config)
    saved = _snapshot(model)
    with pytest.raises(pa.MergeError, match="'bad_one' cannot be fused"):
        fuse(model, "bad_one")
    _assert_same_state(model, saved)
    assert not get_state(model).merged


def test_custom_target_off_the_ffn_is_refused():
    model = tiny_model("gpt2")
    _add(model, "att", targets={"entry": r"transformer\.h\.\d+\.attn"})
    with pytest.raises(pa.MergeError, match="'att' cannot be fused.*not a gpt2 FFN"):
        fuse(model, "att")


def test_second_adapter_on_the_same_ffn_is_refused():
    model = tiny_model("llama")
    _add(model, "a")
    _add(model, "b", layers=[1])
    fuse(model, "a")
    saved = _snapshot(model)
    with pytest.raises(pa.MergeError, match="'b' cannot be fused.*fused adapter 'a'"):
        fuse(model, "b")
    _assert_same_state(model, saved)


def test_already_fused_merged_and_not_fused_errors():
    model = tiny_model("llama")
    _add(model, "a")
    pa.add_adapter(model, "lo", pa.LoRAConfig(r=2, init="random"))
    fuse(model, "a")
    with pytest.raises(pa.MergeError, match="'a' is already fused"):
        fuse(model, "a")
    with pytest.raises(pa.MergeError, match="'a' is already merged"):
        pa.merge(model, "a")
    with pytest.raises(pa.MergeError, match="'a' is fused"):
        pa.unmerge(model, "a")
    pa.merge(model, "lo")  # q/v projections: independent of the fused FFN
    with pytest.raises(pa.MergeError, match="'lo' is merged"):
        fuse(model, "lo")
    unfuse(model, "a")
    with pytest.raises(pa.MergeError, match="'a' is not fused"):
        unfuse(model, "a")
    with pytest.raises(pa.MergeError, match="'lo' is not fused.*unmerge"):
        unfuse(model, "lo")


def test_merged_adapter_inside_the_ffn_is_refused():
    model = tiny_model("llama")
    _add(model, "a")
    pa.add_adapter(model, "lo", pa.LoRAConfig(r=2, targets=["mlp.down_proj"], init="random"))
    pa.merge(model, "lo")
    with pytest.raises(pa.MergeError, match="'a' cannot be fused.*'lo' is merged"):
        fuse(model, "a")


def test_fused_owner_names_the_adapter():
    model = tiny_model("bert")
    _add(model, "a", layers=[0])
    fuse(model, "a")
    layer0, layer1 = model.encoder.layer
    assert fused_owner(model, layer0.output.dense) == "a"
    assert fused_owner(model, layer0.intermediate.dense) == "a"
    assert fused_owner(model, layer1.output.dense) is None


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(hidden_size=8, num_attention_heads=1)
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_unknown_architecture_is_refused():
    model = _Toy()
    _add(model, "toy", targets={"entry": r"layers\.\d+"})
    with pytest.raises(pa.MergeError, match="'toy' cannot be fused.*no known architecture"):
        fuse(model, "toy")


# -- 5. bf16 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter_dtype", [None, "float32"])
def test_bf16_fused_close_to_unfused(family, adapter_dtype):
    """Only rounding order differs (and where s * Wu and b2 + bu are rounded to bf16)."""
    model = tiny_model(family).to(torch.bfloat16)
    ids = _ids()
    _add(model, act="gelu", dtype=adapter_dtype)
    ref = _unfused(model, "a", ids)
    saved = _snapshot(model)
    fuse(model, "a")
    st = get_state(model)
    for f in st.record("a").fused.ffns:
        assert all(p.dtype == torch.bfloat16 for lin in f.linears for p in lin.parameters())
    torch.testing.assert_close(outputs(model, ids).float(), ref.float(), atol=2e-2, rtol=2e-2)
    unfuse(model, "a")
    _assert_same_state(model, saved)


# -- 6. generation with a KV cache ---------------------------------------------------------------


def test_generate_with_kv_cache_same_tokens():
    model = tiny_model("llama")
    ids = _ids(2, 5)
    mask = torch.ones_like(ids)
    _add(model, act="silu", scale=2.0)

    def gen():
        with torch.no_grad():
            return model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0
            )

    base = gen()
    pa.set_active(model, "a")
    ref = gen()
    pa.set_active(model, None)
    fuse(model, "a")
    assert torch.equal(gen(), ref)
    assert not torch.equal(ref, base)  # the adapter does change the tokens
    unfuse(model, "a")
    assert torch.equal(gen(), base)


def test_merge_into_a_fused_ffn_is_refused():
    model = tiny_model("llama")
    _add(model, "a")
    pa.add_adapter(model, "lo", pa.LoRAConfig(r=2, targets=["mlp.down_proj"], init="random"))
    fuse(model, "a")
    with pytest.raises(pa.MergeError, match="'lo'"):
        pa.merge(model, "lo")


# -- 7. the split activation: no slice-and-concatenate at inference ------------------------------

_BASE_ACTS = {
    "silu": nn.SiLU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu_inplace": lambda: nn.ReLU(inplace=True),
    "identity": nn.Identity,
}


def _split_reference(base: nn.Module, act: str, h: torch.Tensor, width: int) -> torch.Tensor:
    from paradapt.bottleneck import _ACTS

    return torch.cat([base(h[..., :width].clone()), _ACTS[act](h[..., width:].clone())], dim=-1)


@pytest.mark.parametrize("act", ["relu", "tanh", "gelu", "identity"])
@pytest.mark.parametrize("base_name", list(_BASE_ACTS))
def test_split_activation_is_exact_without_concatenating(base_name, act, monkeypatch):
    """Inference writes the adapter's features into the base activation's output: exact, no cat.

    Equal to rounding only: a vectorised kernel may round its remainder lanes differently
    from a narrower call."""
    split = SplitActivation(_BASE_ACTS[base_name](), act, width=6)
    h = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(0))
    ref = _split_reference(_BASE_ACTS[base_name](), act, h, 6)
    if not split.base_inplace:

        def no_cat(*a, **k):
            raise AssertionError("torch.cat on the inference path")

        monkeypatch.setattr(torch, "cat", no_cat)
    with torch.no_grad():
        out = split(h.clone())
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_activations_written_into_a_tensor_are_the_adapter_activations():
    """Every adapter activation has an ``out=`` form, bit-equal to it (NaN, inf and -0 included)."""
    from paradapt.bottleneck import _ACTS
    from paradapt.fusing import _ACTS_INTO

    assert set(_ACTS_INTO) == set(_ACTS)
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    x[0, :4] = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf")])
    for name, fn in _ACTS.items():
        out = torch.full_like(x, 7.0)
        _ACTS_INTO[name](x, out)
        ref = fn(x)
        assert torch.equal(out.nan_to_num(), ref.nan_to_num()) and torch.equal(out.isnan(), ref.isnan()), name
        assert torch.equal(out.signbit(), ref.signbit()), name


@pytest.mark.parametrize("base_name", ["silu", "identity"])
def test_split_activation_under_autograd_keeps_its_gradient(base_name):
    """With autograd tracking the input, writing in place would break backward: the cat path runs."""
    split = SplitActivation(_BASE_ACTS[base_name](), "tanh", width=6)
    h = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = split(h)
    ref = _split_reference(_BASE_ACTS[base_name](), "tanh", h.detach(), 6)
    torch.testing.assert_close(out.detach(), ref, atol=1e-6, rtol=1e-6)
    out.sum().backward()
    tail = 1 - torch.tanh(h.detach()[..., 6:]) ** 2
    torch.testing.assert_close(h.grad[..., 6:], tail)


def test_fused_prefill_and_decode_match_unfused_under_inference_mode():
    """Decode (one token) and prefill (strided tail views) both take the in-place path."""
    model = tiny_model("llama")
    _add(model, act="relu", scale=3.0)
    ids = _ids(1, 9)
    pa.set_active(model, "a")
    with torch.inference_mode():
        ref_prefill, ref_step = outputs(model, ids[:, :8]), outputs(model, ids)[:, -1]
    pa.set_active(model, None)
    fuse(model, "a")
    with torch.inference_mode():
        torch.testing.assert_close(outputs(model, ids[:, :8]), ref_prefill, atol=1e-5, rtol=1e-5)
        out = model(ids[:, :8], use_cache=True)
        step = model(ids[:, 8:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, ref_step, atol=1e-5, rtol=1e-5)


# -- 8. adapters on a fused projection: clear refusals, PiSSA included ---------------------------


@pytest.mark.parametrize("init", ["pissa", "default"])
@pytest.mark.parametrize("proj", ["gate_proj", "up_proj", "down_proj"])
def test_adding_an_adapter_on_a_fused_projection_is_refused(proj, init):
    model = tiny_model("llama")
    _add(model, "a")
    fuse(model, "a")
    saved = _snapshot(model)
    pattern = rf"'p' cannot be added on model\.layers\.0\.mlp\.{proj}: adapter 'a' is fused into it"
    with pytest.raises(pa.MergeError, match=pattern):
        pa.add_adapter(model, "p", pa.LoRAConfig(r=2, init=init, targets=[f"mlp.{proj}"]))
    _assert_same_state(model, saved)
    assert "p" not in get_state(model).adapters
    unfuse(model, "a")
    pa.add_adapter(model, "p", pa.LoRAConfig(r=2, init=init, targets=[f"mlp.{proj}"]))  # fine once unfused


def test_adapter_elsewhere_can_be_added_while_fused():
    model = tiny_model("llama")
    _add(model, "a")
    fuse(model, "a")
    pa.add_adapter(model, "p", pa.LoRAConfig(r=2, init="pissa"))  # q/v projections: not widened
    assert "p" in get_state(model).adapters


def test_removing_a_pissa_lora_from_a_fused_projection_is_refused():
    model = tiny_model("llama")
    ids = _ids()
    base = outputs(model, ids)
    _add(model, "a")
    pa.add_adapter(model, "p", pa.LoRAConfig(r=2, init="pissa", targets=["mlp.down_proj"]))
    fuse(model, "a")
    saved = _snapshot(model)
    pattern = r"'p' cannot be removed from model\.layers\.0\.mlp\.down_proj while adapter 'a' is fused"
    with pytest.raises(pa.MergeError, match=pattern):
        pa.remove_adapter(model, "p")
    _assert_same_state(model, saved)
    assert "p" in get_state(model).adapters
    unfuse(model, "a")
    pa.remove_adapter(model, "p")  # the principal part goes back into the original weight
    pa.remove_adapter(model, "a")
    torch.testing.assert_close(outputs(model, ids), base, atol=1e-5, rtol=1e-5)


def test_unwrap_with_a_fused_adapter_and_pissa_gives_base_back():
    model = tiny_model("llama")
    ids = _ids()
    base = outputs(model, ids)
    pa.add_adapter(model, "p", pa.LoRAConfig(r=2, init="pissa", targets=["mlp.gate_proj"]))
    _add(model, "a")
    fuse(model, "a")
    pa.unwrap(model)  # unfuses first, so removing PiSSA reaches the original weight
    assert not any(isinstance(m, SplitActivation) for m in model.modules())
    torch.testing.assert_close(outputs(model, ids), base, atol=1e-5, rtol=1e-5)


def test_deepcopy_of_a_fused_model_runs_on_its_own_activation_modules():
    model = tiny_model("gpt2")
    _add(model, act="relu")
    fuse(model, "a")
    ids = _ids()
    twin = copy.deepcopy(model)
    torch.testing.assert_close(outputs(twin, ids), outputs(model, ids), atol=0, rtol=0)
    for act in (m for m in twin.modules() if isinstance(m, SplitActivation)):
        assert act._base is act.base_act  # the copy's child, not the original's


# -- 9. no hook machinery on a fused FFN that holds nothing else --------------------------------


def _ffn_hooks(model: nn.Module) -> int:
    """How many forward (pre-)hooks sit on layer 0's FFN entry and exit modules."""
    st = get_state(model)
    site = next(s for k, s in st.sites.items() if s.kind == "block" and ".0." in f"{k}.")
    return len(site.entry._forward_pre_hooks) + len(site.exit._forward_hooks)


def test_fused_ffn_site_runs_without_hooks_and_gets_them_back(family):
    model = tiny_model(family)
    ids = _ids()
    _add(model, "a")
    assert _ffn_hooks(model) == 2
    ref = _unfused(model, "a", ids)
    fuse(model, "a")
    assert _ffn_hooks(model) == 0
    torch.testing.assert_close(outputs(model, ids), ref, atol=1e-5, rtol=1e-5)
    unfuse(model, "a")
    assert _ffn_hooks(model) == 2
    assert torch.equal(_unfused(model, "a", ids), ref)  # the hooks route again


def test_fused_ffn_site_shared_with_another_adapter_keeps_its_hooks():
    model = tiny_model("llama")
    _add(model, "a")
    _add(model, "b", act="tanh")  # same FFN sites
    fuse(model, "a")
    assert _ffn_hooks(model) == 2


def test_adapter_added_to_a_fused_ffn_site_puts_its_hooks_back():
    model = tiny_model("llama")
    ids = _ids()
    _add(model, "a")
    fuse(model, "a")
    _add(model, "b", act="tanh", layers=[0])
    assert _ffn_hooks(model) == 2
    unfuse(model, "a")
    pa.set_active(model, ["a", "b"])
    stacked = outputs(model, ids)
    pa.set_active(model, None)
    fuse(model, "a")  # b shares layer 0's site: its hooks stay
    assert _ffn_hooks(model) == 2
    pa.unfuse(model, "a")
    assert torch.equal(_unfused(model, ["a", "b"], ids), stacked)
