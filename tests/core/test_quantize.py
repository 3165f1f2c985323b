"""A quantised base (``paradapt.quantized``): int4/int8/bf16 linears on torch's CPU kernels.

The invariants hold on a quantised base as on an fp32 one (zero init == base, bit for bit; a
mixed batch == each row alone); the layers equal their dequantised reference within bf16
error; gradients reach the adapters, and through the quantised layers the earlier ones, close
to the fp32 base's; bad input leaves the model unchanged.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import outputs, tiny_model
from test_invariants import KINDS, ids_for, random_config
from torch import nn

import paradapt as pa
from paradapt import quantized
from paradapt.quantized import QuantLinear

PRECISIONS = ["int4", "int8", "bf16"]


def linear_types(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


# -- one layer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_layer_equals_its_dequantised_reference(precision):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48)
    model = nn.Sequential(lin)
    pa.quantize(model, precision)
    q = model[0]
    assert isinstance(q, QuantLinear) and q.layer_name == "0"
    x = torch.randn(2, 5, 128)
    w = q.dequantized_weight()
    ref = x @ w.t() + q.bias
    got = q(x)
    assert got.dtype == torch.float32 and got.shape == (2, 5, 48)
    # the kernel rounds its input and result to bf16: within a few bf16 ulps of the output scale
    torch.testing.assert_close(got, ref, atol=2e-2 * ref.abs().max().item(), rtol=0)
    # and the dequantised weight is the original within the quantisation step
    step = {"int4": 1 / 7.5, "int8": 1 / 127, "bf16": 1 / 128}[precision]
    err = (w - lin.weight).abs().amax(1) / lin.weight.abs().amax(1)
    assert err.max() <= step


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_many_rows_go_through_a_dequantised_bf16_gemm_within_bf16_error(precision, monkeypatch):
    """A prefill's ``M >= DEQUANT_ROWS`` rows multiply by the weight dequantised for the call (the
    kernels are slow there) where bf16 is native; the result is the dequantised reference within
    bf16 error, and the rows' values match the same rows computed by the kernel within one bf16
    rounding."""
    monkeypatch.setattr(quantized, "native_bf16", lambda: True)  # the path of an AMX / AVX512-BF16 CPU
    torch.manual_seed(0)
    q = pa.quantize(nn.Sequential(nn.Linear(128, 192)), precision)[0]
    rows = quantized.DEQUANT_ROWS
    x = torch.randn(rows + 5, 128)
    with torch.no_grad():
        ref = x @ q.dequantized_weight().t() + q.bias
        many = q(x)
        few = torch.cat([q(x[i : i + 8]) for i in range(0, rows + 5, 8)])  # the kernel
    scale = ref.abs().max().item()
    torch.testing.assert_close(many, ref, atol=2e-2 * scale, rtol=0)
    torch.testing.assert_close(many, few, atol=2e-2 * scale, rtol=0)
    if precision == "int4":
        assert q.call_weight() is not None  # 192 rows: the packing's layout was read, not the kernel used


@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_without_native_bf16_many_rows_and_backward_multiply_in_float32(monkeypatch, kernel):
    """Where bf16 products are widened to float32 (AVX2) a bf16 GEMM is the slow path: many rows
    multiply by the float32 dequantised weight, and so does the input gradient; with paradapt's
    own int4 kernel (``auto``) the input stays float32, with torch's it is rounded to bf16."""
    monkeypatch.setattr(quantized, "native_bf16", lambda: False)
    monkeypatch.setattr(quantized, "INT4_KERNEL", kernel)
    q = pa.quantize(nn.Sequential(nn.Linear(128, 192)), "int4")[0]
    assert q.input_dtype() == (torch.float32 if kernel == "auto" else torch.bfloat16)
    asked = []
    real = quantized.QuantLinear.dequantized_weight

    def spy(self, dtype=torch.float32):
        asked.append(dtype)
        return real(self, dtype)

    monkeypatch.setattr(quantized.QuantLinear, "dequantized_weight", spy)
    x = torch.randn(quantized.DEQUANT_ROWS + 3, 128, requires_grad=True)
    y = q(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    assert asked == [torch.float32, torch.float32]  # forward, then backward
    w = real(q)
    rounded = q.input_dtype()
    want_y = x.detach().to(rounded).float() @ w.t() + q.bias
    torch.testing.assert_close(y, want_y, atol=1e-5 * want_y.abs().max().item(), rtol=0)
    want = (g.to(rounded).float() @ w).to(rounded).float()  # the gradient, rounded once (bf16) or not
    tol = 1e-2 if rounded == torch.bfloat16 else 1e-5
    torch.testing.assert_close(x.grad, want, atol=tol * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_a_decode_steps_one_call_path_gives_the_kernels_bits(monkeypatch, kernel):
    """Few float32 rows without a gradient skip the general path's reshapes and casts (each a
    dispatched op, 210 layers a step): the result must be the same bits as the kernel's."""
    monkeypatch.setattr(quantized, "INT4_KERNEL", kernel)
    q = pa.quantize(nn.Sequential(nn.Linear(128, 192)), "int4")[0]
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        got = q(x)
        want = q.matmul(x.reshape(6, 128).to(q.input_dtype())).float().view(2, 3, 192) + q.bias
    assert got.dtype == torch.float32 and torch.equal(got, want)
    y = q(x.requires_grad_())  # a gradient: the general path, same values
    assert y.requires_grad and torch.equal(y.detach(), got)


def test_the_fast_read_of_the_packing_equals_the_kernels_own_read():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (192, 96), generator=g, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    fast = quantized._unpack_int4_fast(packed, 96, 192)
    assert fast is not None and torch.equal(fast, codes.to(torch.uint8))
    assert torch.equal(quantized._unpack_int4(packed, 96, 192, 32), codes.float())
    assert (
        quantized._unpack_int4_fast(packed[:48], 96, 48) is None
    )  # not whole blocks (of 64 rows, or 32 on AVX2)


def test_int4_codes_unpack_exactly():
    """The identity trick reads back the codes the packing stored, for every group size."""
    g = torch.Generator().manual_seed(0)
    for group in quantized.INT4_GROUP_SIZES:
        codes = torch.randint(0, 16, (32, 256), generator=g, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        assert torch.equal(quantized._unpack_int4(packed, 256, 32, group), codes.float())


def test_input_gradient_of_a_layer_is_from_the_dequantised_weight():
    torch.manual_seed(0)
    model = pa.quantize(nn.Sequential(nn.Linear(64, 32)), "int4")
    x = torch.randn(3, 64, requires_grad=True)
    g = torch.randn(3, 32)
    (model(x) * g).sum().backward()
    want = g @ model[0].dequantized_weight()
    torch.testing.assert_close(x.grad, want, atol=2e-2 * want.abs().max().item(), rtol=0)
    assert model[0].bias.grad is None  # the base stays frozen


# -- the model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantize_keeps_names_and_skips_the_lm_head(precision):
    model = tiny_model("llama")
    names = set(linear_types(model))
    pa.quantize(model, precision)
    types = linear_types(model)
    assert set(types) == names  # same module paths: archmap and sites find them
    assert types.pop("lm_head") is nn.Linear
    assert set(types.values()) == {QuantLinear}
    assert quantized.quantization(model)["precision"] == precision
    pa.dequantize(model)
    assert set(linear_types(model).values()) == {nn.Linear}
    assert quantized.quantization(model) == {"precision": "none"}


def test_lm_head_only_when_asked():
    model = pa.quantize(tiny_model("llama"), "int8", include_lm_head=True)
    assert isinstance(model.lm_head, QuantLinear)
    assert quantized.quantization(model) == {"precision": "int8", "lm_head": True}


def test_dequantize_gives_the_same_function_in_float32():
    model = pa.quantize(tiny_model("llama"), "int4")
    ids = ids_for()
    with torch.no_grad():
        q = outputs(model, ids)
        d = outputs(pa.dequantize(model), ids)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    torch.testing.assert_close(d, q, atol=2e-2, rtol=0)  # the same weights, now in fp32 compute


@pytest.mark.parametrize("order", ["quantize-first", "adapters-first"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_zero_init_is_bit_identical_on_a_quantised_base(kind, order):
    model = tiny_model("llama")
    ids = ids_for()
    if order == "quantize-first":
        pa.quantize(model, "int4")
    pa.add_adapter(model, "a", KINDS[kind]())
    if order == "adapters-first":
        pa.quantize(model, "int4")
    with torch.no_grad():
        pa.set_active(model, None)
        base = outputs(model, ids)
        pa.set_active(model, "a")
        assert torch.equal(outputs(model, ids), base)
        with pa.route(model, ["a", None, "a"]):
            assert torch.equal(outputs(model, ids), base)
    assert all(p.dtype == torch.float32 for p in model.paradapt.parameters())  # adapters stay fp32


@pytest.mark.parametrize("order", ["quantize-first", "adapters-first"])
def test_random_adapters_act_beside_quantised_layers(order):
    """Quantising with adapters attached moves their hooks: the adapter still changes the output,
    by what it did on the fp32 base (within the quantisation error)."""
    ref = tiny_model("llama")
    pa.add_adapter(ref, "a", random_config("lora_all"))
    model = copy.deepcopy(ref) if order == "adapters-first" else pa.quantize(tiny_model("llama"), "int4")
    if order == "adapters-first":
        pa.quantize(model, "int4")
    else:
        pa.add_adapter(model, "a", random_config("lora_all"))
        model.paradapt["a"].load_state_dict(ref.paradapt["a"].state_dict())
    ids = ids_for()
    with torch.no_grad():
        base = outputs(model, ids)
        with pa.route(model, ["a"] * 3):
            got = outputs(model, ids) - base
        base_ref = outputs(ref, ids)
        with pa.route(ref, ["a"] * 3):
            want = outputs(ref, ids) - base_ref
    assert want.abs().max() > 0.05
    torch.testing.assert_close(got, want, atol=0.1 * want.abs().max().item(), rtol=0)


MIX = ["lora", "parallel", None, "ia3", "prefix", "series"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_mixed_batch_equals_each_row_alone_on_a_quantised_base(precision):
    """Equal up to one bf16 rounding: the batched and the alone path differ in the fp32 parts by
    ~1e-7, which the next layer's cast to bf16 can (rarely) turn into one bf16 step (~1e-3 here,
    seen 2.7e-4); a row with the wrong adapter is off by the adapter's effect (checked > 10x that)."""
    model = pa.quantize(tiny_model("llama"), precision)
    ids = ids_for(batch=len(MIX))
    for k in sorted({m for m in MIX if m}):
        pa.add_adapter(model, k, random_config(k))
    with torch.no_grad():
        with pa.route(model, MIX):
            batched = outputs(model, ids)
        base = outputs(model, ids)
        for i, name in enumerate(MIX):
            with pa.route(model, [name]):
                alone = outputs(model, ids[i : i + 1])
            torch.testing.assert_close(batched[i], alone[0], atol=2e-3, rtol=0, msg=f"row {i} ({name})")
            if name is not None:
                assert (alone[0] - base[i]).abs().max() > 0.02, name


# -- gradients (QLoRA-style) --------------------------------------------------------------------------


def _lora_grads(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    pa.set_active(model, "a")
    out = model(ids, labels=ids)
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.paradapt["a"].named_parameters()}


def _add_lora(model: nn.Module) -> None:
    torch.manual_seed(3)
    pa.add_adapter(model, "a", pa.LoRAConfig(r=4, targets="all-linear", init="random"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _no_input_gradient(ctx, grad):
    return grad.new_zeros(grad.shape[0], ctx.layer.in_features), None


def test_lora_gradients_through_an_int4_base_match_the_fp32_base(monkeypatch):
    """Against an fp32 base holding the same (dequantised) weights the gradients agree to bf16
    error; against the original fp32 base, to the quantisation error (large on tiny random weights)."""
    ids = ids_for(batch=2, seq=12)
    ref = tiny_model("llama")
    _add_lora(ref)
    want = _lora_grads(ref, ids)
    model = tiny_model("llama")
    _add_lora(model)
    pa.quantize(model, "int4")
    same = pa.dequantize(copy.deepcopy(model))
    same_grads = _lora_grads(same, ids)
    got = _lora_grads(model, ids)
    assert set(got) == set(want) == set(same_grads)
    layer0 = [n for n in want if "layers/0/" in n and "down" in n]
    assert layer0  # layer 0's gradients cross layer 1's quantised linears on their way back
    for n in want:
        assert got[n].abs().sum() > 0, n
        assert _rel(got[n], same_grads[n]) < 0.03, n
        assert _rel(got[n], want[n]) < 0.35, n
    # the checks above fail if the quantised layers' input gradient is missing (residuals alone
    # still carry a gradient to layer 0, but not the right one)
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(quantized._QuantMatmul, "backward", staticmethod(_no_input_gradient))
    broken = _lora_grads(model, ids)
    assert max(_rel(broken[n], same_grads[n]) for n in layer0) > 0.3


# -- adapter files record the base's precision --------------------------------------------------------


def test_saved_adapter_records_the_base_precision_and_loads_elsewhere_with_a_warning(tmp_path):
    model = pa.quantize(tiny_model("llama"), "int4")
    pa.add_adapter(model, "a", random_config("lora"))
    pa.save_adapter(model, "a", tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["base_model"]["quantization"] == {"precision": "int4", "lm_head": False, "group_size": 32}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same precision: no warning
        pa.load_adapter(pa.quantize(tiny_model("llama"), "int4"), tmp_path / "a")
    fp32 = tiny_model("llama")
    with pytest.warns(UserWarning, match=r"made on base weights int4-g32, loading onto base weights none"):
        pa.load_adapter(fp32, tmp_path / "a")
    ids = ids_for()
    with torch.no_grad():
        with pa.route(model, ["a"] * 3):
            q = outputs(model, ids)
        with pa.route(fp32, ["a"] * 3):
            f = outputs(fp32, ids)
    torch.testing.assert_close(q, f, atol=0.05, rtol=0)  # the same adapter, within the quantisation error
    with pytest.warns(UserWarning, match=r"made on base weights int4-g32, loading onto base weights int8"):
        pa.load_adapter(pa.quantize(tiny_model("llama"), "int8"), tmp_path / "a")


# -- what refuses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"precision": "int3"}, "precision"),
        ({"precision": "int4", "group_size": 16}, "group_size"),
        ({"precision": "int8", "group_size": 32}, "group_size"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    model = tiny_model("llama")
    before = linear_types(model)
    with pytest.raises(pa.ConfigError) as e:
        pa.quantize(model, **kwargs)
    assert e.value.field == field
    assert linear_types(model) == before


@pytest.mark.parametrize(
    ("config", "layer", "what"),
    [
        ({"intermediate_size": 48}, "model.layers.0.mlp.down_proj", "in_features=48"),
        ({"num_key_value_heads": 1}, "model.layers.0.self_attn.k_proj", "out_features=8"),
    ],
)
def test_a_layer_that_does_not_fit_the_packing_leaves_the_model_unchanged(config, layer, what):
    model = tiny_model("llama", **config)
    ids = ids_for()
    with torch.no_grad():
        want = outputs(model, ids)
    before = linear_types(model)
    with pytest.raises(pa.QuantizationError, match=rf"layer {layer}: {what}"):
        pa.quantize(model, "int4")
    assert linear_types(model) == before  # validated every layer before replacing any
    assert quantized.quantization(model) == {"precision": "none"}
    with torch.no_grad():
        assert torch.equal(outputs(model, ids), want)
    pa.quantize(model, "int8")  # int8 has no such constraint


def test_merge_fuse_pissa_and_requantising_refuse_naming_the_layer():
    model = pa.quantize(tiny_model("llama"), "int4")
    pa.add_adapter(model, "lo", random_config("lora"))
    pa.add_adapter(model, "par", pa.ParallelConfig(r=8, init="random"))
    with pytest.raises(pa.MergeError, match=r"model\.layers\.0\.self_attn\.q_proj is quantised \(int4\)"):
        pa.merge(model, "lo")
    with pytest.raises(pa.MergeError, match=r"model\.layers\.0\.mlp\.gate_proj is quantised"):
        pa.fuse(model, "par")
    with pytest.raises(pa.ConfigError, match=r"pissa needs the float weight of model\.layers\.0"):
        pa.add_adapter(model, "pi", pa.LoRAConfig(r=4, init="pissa"))
    assert sorted(pa.list_adapters(model)) == ["lo", "par"]
    with pytest.raises(pa.QuantizationError, match="already quantised"):
        pa.quantize(model, "int8")
    with pytest.raises(pa.QuantizationError, match="model.layers.1.mlp.up_proj is quantised"):
        model.model.layers[1].mlp.up_proj.weight  # noqa: B018
    pa.dequantize(model)  # then all of them work
    pa.merge(model, "lo")
    pa.fuse(model, "par")


def test_quantising_refuses_while_an_adapter_lives_in_the_base_weights():
    model = tiny_model("llama")
    pa.add_adapter(model, "lo", random_config("lora"))
    pa.merge(model, "lo")
    with pytest.raises(pa.QuantizationError, match="'lo' is merged"):
        pa.quantize(model, "int4")
    pa.unmerge(model, "lo")
    pa.add_adapter(model, "pi", pa.LoRAConfig(r=4, init="pissa"))
    with pytest.raises(pa.QuantizationError, match="'pi' is a PiSSA adapter"):
        pa.quantize(model, "int4")
    assert set(linear_types(model).values()) == {nn.Linear}


# -- the real SmolLM2 ---------------------------------------------------------------------------------


def test_smollm2_int4_agrees_with_fp32_on_the_next_token(smollm2, smollm2_reference):
    """Teacher-forced on the chat prompt and its greedy answer: top-1 agreement >= 90 %."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2, local_files_only=True).eval()
    ids = torch.cat([smollm2_reference["ids"], torch.tensor([smollm2_reference["new"]])], 1)[:, -40:]
    with torch.no_grad():
        want = model(ids).logits[0, -32:].argmax(-1)
        pa.quantize(model, "int4")
        got = model(ids).logits[0, -32:].argmax(-1)
    assert (got == want).float().mean().item() >= 0.9


def test_int4_codes_are_read_back_once_and_kept_for_every_backward(monkeypatch):
    import paradapt.quantized as qz

    torch.manual_seed(0)
    model = pa.quantize(torch.nn.Sequential(torch.nn.Linear(64, 48)), "int4", group_size=32)
    assert 48 % quantized._layout() != 0  # not whole blocks: the codes come from the read-back
    layer = model[0]
    calls = []
    real = qz._unpack_int4
    monkeypatch.setattr(qz, "_unpack_int4", lambda *a: calls.append(1) or real(*a))
    first = layer.dequantized_weight()
    for _ in range(3):
        x = torch.randn(4, 64, requires_grad=True)
        model(x).sum().backward()
    assert len(calls) == 1  # the K x K read-back ran once, not once per backward
    assert layer.int4_codes().dtype == torch.uint8 and int(layer.int4_codes().max()) <= 15
    assert torch.equal(layer.dequantized_weight(), first)
    assert "_codes" not in str(list(model.state_dict()))  # a cache, not part of the saved model


def test_backward_reads_whole_blocks_from_the_packing_without_keeping_codes():
    torch.manual_seed(0)
    model = pa.quantize(torch.nn.Sequential(torch.nn.Linear(64, 128)), "int4")
    x = torch.randn(4, 64, requires_grad=True)
    model(x).sum().backward()
    assert model[0]._codes is None  # 128 output rows: whole blocks, read per call
    w = model[0].dequantized_weight()
    torch.testing.assert_close(x.grad, (torch.ones(4, 128) @ w).float(), atol=5e-2, rtol=1e-2)


# -- LoftQ: adapters initialised against the int4 error ------------------------------------------------


def test_loftq_adapters_start_by_undoing_the_int4_error():
    """A LoftQ LoRA added to the float base, then the base quantised: each site's ``s * B A`` is
    the rank-r SVD of ``W - Q(W)``, so the quantised model with its LoftQ adapter is closer to
    the float model than the quantised base alone (a default LoRA starts at zero)."""
    torch.manual_seed(0)
    fp = tiny_model("llama")
    model = copy.deepcopy(fp)
    pa.add_adapter(model, "q", pa.LoRAConfig(r=8, targets="all-linear", init="loftq"))
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear}
    pa.quantize(model, "int4")
    bare = pa.quantize(copy.deepcopy(fp), "int4")
    site = "model.layers.0.mlp.down_proj"
    w = weights[site]
    q = model.get_submodule(site).dequantized_weight()
    comp = model.paradapt["q"].components[site.replace(".", "/")]
    correction = comp.up.weight @ comp.down.weight * comp.scale
    err = w - q
    assert (err - correction).norm() < 0.9 * err.norm()  # rank 8 of a 32-wide error: a real part
    u, s, vh = torch.linalg.svd(err)
    assert torch.allclose(correction, (u[:, :8] * s[:8]) @ vh[:8], atol=1e-5)
    pa.set_active(model, "q")
    ids = ids_for()
    with torch.no_grad():
        want = outputs(fp, ids)
        # measured: 0.57 of the int4 base's output error at r=8 (0.22 at r=16)
        assert (outputs(model, ids) - want).norm() < 0.75 * (outputs(bare, ids) - want).norm()
    # the base the adapter sits on is the same int4 base every other adapter shares
    assert torch.equal(bare.get_submodule(site).dequantized_weight(), q)


def test_loftq_on_an_already_quantised_base_is_refused_by_name():
    model = pa.quantize(tiny_model("llama"), "int4")
    with pytest.raises(pa.ConfigError, match="loftq needs the float weight of .*add it before pa.quantize"):
        pa.add_adapter(model, "q", pa.LoRAConfig(r=4, init="loftq"))
    assert not pa.list_adapters(model)


def test_quantising_copies_the_float_weights_off_the_loaded_file(tmp_path):
    """The embedding and norms of a model loaded from safetensors read a memory map of the file;
    after quantising they own their memory, so the map (and every page quantising read) goes."""
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    before = {n: p.data_ptr() for n, p in model.named_parameters() if "proj" not in n}
    ids = torch.randint(1, 96, (1, 5))
    with torch.no_grad():
        pa.quantize(model, "int8")
        want = outputs(model, ids)
    after = {n: p.data_ptr() for n, p in model.named_parameters()}
    assert before and all(after[n] != ptr for n, ptr in before.items())
    with torch.no_grad():
        assert torch.equal(outputs(model, ids), want)


# -- the LM head apart ----------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["int8", "int4", "bf16"])
def test_lm_head_quantised_apart_unties_it_and_is_recorded(tmp_path, head):
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "m")
    config = AutoConfig.from_pretrained(tmp_path / "m", tie_word_embeddings=True, vocab_size=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    emb = model.model.embed_tokens.weight.detach().clone()
    pa.quantize(model, "int4")
    with pytest.raises(pa.QuantizationError, match="quantise the model first"):
        quantized.quantize_lm_head(tiny_model("llama"), head)
    quantized.quantize_lm_head(model, head)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.precision == head
    assert torch.equal(model.model.embed_tokens.weight, emb)  # the lookup stays float
    assert not model.config.tie_word_embeddings
    info = pa.quantization(model)
    assert info["lm_head"] == head and quantized.describe(info) == f"int4-g32+head-{head}"
    ids = torch.randint(1, 128, (2, 6))
    with torch.no_grad():
        got = model(ids).logits
        want = model.model(ids).last_hidden_state @ model.lm_head.dequantized_weight().t()
    torch.testing.assert_close(got, want, atol=3e-2 * want.abs().max().item(), rtol=0)
    with pytest.raises(pa.QuantizationError, match="already quantised"):
        quantized.quantize_lm_head(model, head)
    out = tmp_path / "q"
    out.mkdir()
    pa.save_quantized(model, out)
    back = pa.load_quantized(out)
    assert back.lm_head.precision == head and pa.quantization(back)["lm_head"] == head
    with torch.no_grad():
        assert torch.equal(back(ids).logits, got)
