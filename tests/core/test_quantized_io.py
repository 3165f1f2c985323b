"""A quantised base on disk (``paradapt.quantized_io``): saved and loaded bit-exactly in every
precision, int4 codes stored portably (not in the kernel's blocked layout), and a folder that is
incomplete, misshapen or corrupt refused with the file and tensor named; a named model's cached
int4 folder that no longer loads is rebuilt once."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from _train_fixtures import make_llama

import paradapt as pa
from paradapt import models
from paradapt.errors import QuantizationError
from paradapt.loading import load_model
from paradapt.quantized import QuantLinear
from paradapt.quantized_io import INFO_FILE, WEIGHTS_FILE, pack_nibbles, unpack_nibbles


def test_nibbles_round_trip_with_the_even_column_low():
    codes = torch.randint(0, 16, (16, 64), dtype=torch.int32)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 32)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)
    assert torch.equal(unpack_nibbles(packed), codes)


def _llama(tmp_path, name="m"):
    """A tiny Llama folder (with a tokenizer) and its model with the LM head tied to the
    embedding (as SmolLM2's is)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = make_llama(tmp_path / name)
    config = AutoConfig.from_pretrained(folder, tie_word_embeddings=True)
    torch.manual_seed(0)
    return folder, AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("precision", ["int4", "int8", "bf16"])
def test_save_and_load_are_bit_exact(tmp_path, precision):
    _, model = _llama(tmp_path)
    pa.quantize(model, precision)
    out = tmp_path / "q"
    out.mkdir()
    pa.save_quantized(model, out)
    info = json.loads((out / INFO_FILE).read_text())
    assert info["precision"] == precision and len(info["layers"]) == 2 * 7
    loaded = pa.load_quantized(out)
    assert pa.quantization(loaded) == pa.quantization(model)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again, saved once
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # adapters attach beside the loaded layers as beside freshly quantised ones
    pa.add_adapter(loaded, "a", pa.LoRAConfig(r=4))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)  # zero-initialised B


def test_int4_is_stored_as_codes_not_the_kernels_layout(tmp_path):
    from safetensors.torch import load_file

    _, model = _llama(tmp_path)
    pa.quantize(model, "int4")
    out = tmp_path / "q"
    out.mkdir()
    pa.save_quantized(model, out)
    tensors = load_file(out / WEIGHTS_FILE)
    layer = model.model.layers[0].mlp.down_proj
    codes = tensors["model.layers.0.mlp.down_proj.qcodes"]
    assert torch.equal(unpack_nibbles(codes), layer.int4_codes().to(torch.int32))
    assert "model.layers.0.mlp.down_proj.qweight" not in tensors and "lm_head.weight" not in tensors


def test_a_float_model_is_not_saved_as_quantised(tmp_path):
    _, model = _llama(tmp_path)
    with pytest.raises(QuantizationError, match="not quantised"):
        pa.save_quantized(model, tmp_path)


@pytest.fixture
def saved(tmp_path):
    _, model = _llama(tmp_path)
    pa.quantize(model, "int4")
    out = tmp_path / "q"
    out.mkdir()
    pa.save_quantized(model, out)
    return out


def _rewrite(folder, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, folder / WEIGHTS_FILE)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: t.pop("model.layers.1.self_attn.k_proj.qcodes"), "tensor model.layers.1.self_attn.k_proj.qcodes is missing"),
        (lambda t: t.pop("model.norm.weight"), "tensor model.norm.weight is missing"),
        (lambda t: t.update({"model.extra.weight": torch.zeros(2)}), "tensor model.extra.weight is not in this model"),
        (
            lambda t: t.update({"model.layers.0.mlp.up_proj.qscales": torch.zeros(2, 64, 2, dtype=torch.bfloat16)}),
            r"up_proj.qscales has shape \(2, 64, 2\)",
        ),
        (lambda t: t.update({"model.norm.weight": torch.zeros(3)}), r"model.norm.weight has shape \(3,\)"),
    ],
)
def test_a_damaged_folder_names_the_tensor(saved, change, match):
    _rewrite(saved, change)
    with pytest.raises(QuantizationError, match=match):
        pa.load_quantized(saved)


def test_a_truncated_weights_file_or_record_is_refused(saved):
    info = saved / INFO_FILE
    info.write_text(info.read_text()[:20])
    with pytest.raises(QuantizationError, match=f"q/{INFO_FILE} is unreadable"):
        pa.load_quantized(saved)
    info.unlink()
    with pytest.raises(QuantizationError, match=f"no {INFO_FILE}"):
        pa.load_quantized(saved)


def test_a_truncated_weights_file_is_refused(saved):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(QuantizationError, match=f"q/{WEIGHTS_FILE} is unreadable"):
        pa.load_quantized(saved)


def test_a_named_models_int4_folder_that_does_not_load_is_rebuilt_once(tmp_path, monkeypatch):
    """``load_model(name, quantize="int4")`` loads the named model's int4 folder; one that passes
    its manifest but fails to load (damaged in place) is rebuilt once, with a warning."""
    from paradapt.loading import _load_tokenizer

    source, model = _llama(tmp_path, "src")
    pa.quantize(model, "int4")
    folder = tmp_path / "cache" / "tiny-int4-g32"
    calls = []

    def locate(rebuild: bool = False):
        calls.append(rebuild)
        if rebuild or not folder.exists():
            folder.mkdir(parents=True, exist_ok=True)
            pa.save_quantized(model, folder)
            _load_tokenizer(source).save_pretrained(folder)
        return folder

    entry = models.NamedModel("tiny-q", "a tiny test model", lambda rebuild=False: source, True, locate)
    monkeypatch.setitem(models.NAMED_MODELS, "tiny-q", entry)
    tok, loaded = load_model("tiny-q", quantize="int4")
    assert calls == [False] and isinstance(loaded.model.layers[0].mlp.up_proj, QuantLinear)
    assert loaded.config._name_or_path == "tiny-q" and tok.padding_side == "right"
    _rewrite(folder, lambda t: t.pop("model.norm.weight"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, again = load_model("tiny-q", quantize="int4")
    assert calls == [False, False, True]
    assert any("does not load" in str(w.message) and "converting it again" in str(w.message) for w in caught)
    ids = torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, loaded(ids).logits)
    # other precisions (and other int4 groups) load the float folder and quantise it
    _, int8 = load_model("tiny-q", quantize="int8")
    assert pa.quantization(int8)["precision"] == "int8" and calls == [False, False, True]
