"""Adapter folders: layout, atomic replacement, failure safety, names, flags, forward compatibility."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from conftest import outputs, tiny_model
from safetensors.torch import load_file

import paradapt as pa
import paradapt.io as pio
from paradapt.io import CONFIG_FILE as CFG
from paradapt.io import WEIGHTS_FILE as WEIGHTS


def ids_for(batch=2, seq=5):
    return torch.randint(1, 96, (batch, seq), generator=torch.Generator().manual_seed(4))


def with_lora(seed: int, name: str = "a", family: str = "llama", **cfg):
    """A tiny model with a random LoRA ``name`` (weights drawn from ``seed``) and its output."""
    model = tiny_model(family)
    torch.manual_seed(seed)
    pa.add_adapter(model, name, pa.LoRAConfig(r=4, init="random", **cfg))
    with torch.no_grad(), pa.route(model, name):
        return model, outputs(model, ids_for())


def loaded_output(folder, family: str = "llama", name: str = "x") -> torch.Tensor:
    model = tiny_model(family)
    pa.load_adapter(model, folder, name=name)
    with torch.no_grad(), pa.route(model, name):
        return outputs(model, ids_for())


def folder_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(parent, keep: str) -> list[str]:
    """Anything in ``parent`` besides ``keep``: temp or old folders a save failed to clean up."""
    return sorted(p.name for p in parent.iterdir() if p.name != keep)


# -- layout ------------------------------------------------------------------------------------


def test_saved_folder_layout(tmp_path):
    model, _ = with_lora(1, layers=[1])
    folder = pa.save_adapter(model, "a", tmp_path / "a")
    assert folder == tmp_path / "a"
    assert sorted(p.name for p in folder.iterdir()) == sorted([CFG, WEIGHTS])
    meta = json.loads((folder / CFG).read_text())
    assert meta["format_version"] == pio.FORMAT_VERSION
    assert meta["name"] == "a"
    assert meta["config"]["kind"] == "lora" and meta["config"]["r"] == 4 and meta["config"]["layers"] == [1]
    assert meta["sites"] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert meta["base_model"]["hidden_size"] == 32 and meta["base_model"]["num_layers"] == 2
    assert meta["base_model"]["family"] == "llama"
    assert meta["dtype"] == "float32"
    tensors = load_file(str(folder / WEIGHTS))
    assert sorted(tensors) == sorted(model.paradapt["a"].state_dict())


def test_save_leaves_model_unchanged(tmp_path):
    model, want = with_lora(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pa.save_adapter(model, "a", tmp_path / "a")
    pa.save_peft_adapter(model, "a", tmp_path / "p")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad(), pa.route(model, "a"):
        assert torch.equal(outputs(model, ids_for()), want)


def test_save_creates_missing_parents(tmp_path):
    model, want = with_lora(1)
    pa.save_adapter(model, "a", tmp_path / "deep" / "er" / "a")
    assert torch.equal(loaded_output(tmp_path / "deep" / "er" / "a"), want)


@pytest.mark.parametrize("peft", [False, True])
def test_saved_files_honour_the_umask(tmp_path, peft):
    """Adapter files are ordinary files: 0o666 less the umask (safetensors alone writes 0o600)."""
    model, _ = with_lora(1)
    old = os.umask(0o022)
    try:
        folder = (pa.save_peft_adapter if peft else pa.save_adapter)(model, "a", tmp_path / "a")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert set(modes.values()) == {0o644}, modes
    assert folder.stat().st_mode & 0o777 == 0o755


def test_bf16_adapter_round_trips_bit_exact(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    pa.add_adapter(model, "a", pa.ParallelConfig(r=4, init="random"))
    folder = pa.save_adapter(model, "a", tmp_path / "a")
    assert json.loads((folder / CFG).read_text())["dtype"] == "bfloat16"
    fresh = tiny_model("llama").to(torch.bfloat16)
    pa.load_adapter(fresh, folder)
    for k, v in model.paradapt["a"].state_dict().items():
        got = fresh.paradapt["a"].state_dict()[k]
        assert got.dtype == torch.bfloat16 and torch.equal(got, v), k


# -- names and flags -------------------------------------------------------------------------------


def test_load_name_is_argument_then_file_then_folder(tmp_path):
    model, _ = with_lora(1, name="from_file")
    folder = pa.save_adapter(model, "from_file", tmp_path / "folder_name")
    fresh = tiny_model("llama")
    pa.load_adapter(fresh, folder)
    pa.load_adapter(fresh, folder, name="given")
    meta = json.loads((folder / CFG).read_text())
    del meta["name"]
    (folder / CFG).write_text(json.dumps(meta))
    pa.load_adapter(fresh, folder)
    assert pa.list_adapters(fresh) == ["from_file", "given", "folder_name"]


def test_same_folder_loads_twice_under_two_names(tmp_path):
    model, want = with_lora(1)
    folder = pa.save_adapter(model, "a", tmp_path / "a")
    fresh = tiny_model("llama")
    pa.load_adapter(fresh, folder, name="x")
    pa.load_adapter(fresh, folder, name="y")
    with torch.no_grad(), pa.route(fresh, ["x", "y"]):
        got = outputs(fresh, ids_for())
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_loaded_adapter_is_frozen_unless_asked_and_base_is_frozen(tmp_path):
    model, _ = with_lora(1)
    folder = pa.save_adapter(model, "a", tmp_path / "a")
    fresh = tiny_model("llama")
    frozen = pa.load_adapter(fresh, folder, name="f")
    trainable = pa.load_adapter(fresh, folder, name="t", trainable=True)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in trainable.parameters())
    adapter_ids = {id(p) for p in fresh.paradapt.parameters()}
    assert not any(p.requires_grad for p in fresh.parameters() if id(p) not in adapter_ids)


def test_loaded_adapter_follows_model_train_eval_mode(tmp_path):
    """An adapter with dropout loaded onto a model in eval mode must not drop anything."""
    model, _ = with_lora(1, dropout=0.5)
    folder = pa.save_adapter(model, "a", tmp_path / "a")
    fresh = tiny_model("llama")  # eval mode
    adapter = pa.load_adapter(fresh, folder)
    assert not adapter.training
    with torch.no_grad(), pa.route(fresh, "a"):
        assert torch.equal(outputs(fresh, ids_for()), outputs(fresh, ids_for()))
    train_model = tiny_model("llama").train()
    assert pa.load_adapter(train_model, folder).training


def test_added_adapter_follows_model_eval_mode():
    model = tiny_model("llama")  # eval mode
    adapter = pa.add_adapter(model, "a", pa.LoRAConfig(r=4, dropout=0.5, init="random"))
    assert not adapter.training


# -- atomic replacement ----------------------------------------------------------------------------


def test_saving_over_an_adapter_folder_replaces_it(tmp_path):
    first, want_first = with_lora(1, name="first")
    second, want_second = with_lora(2, name="second", targets=["k_proj"])
    folder = tmp_path / "a"
    pa.save_adapter(first, "first", folder)
    assert torch.equal(loaded_output(folder), want_first)
    pa.save_adapter(second, "second", folder)
    assert json.loads((folder / CFG).read_text())["name"] == "second"
    assert torch.equal(loaded_output(folder), want_second)
    assert leftovers(tmp_path, "a") == []


def test_saving_over_a_peft_folder_leaves_no_stale_files(tmp_path):
    model, want = with_lora(1)
    folder = tmp_path / "a"
    pa.save_peft_adapter(model, "a", folder)
    (folder / "README.md").write_text("written by PEFT")
    pa.save_adapter(model, "a", folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([CFG, WEIGHTS])
    assert torch.equal(loaded_output(folder), want)
    pa.save_peft_adapter(model, "a", folder)  # and back
    assert sorted(p.name for p in folder.iterdir()) == [CFG, "adapter_model.safetensors"]
    assert leftovers(tmp_path, "a") == []


def test_saving_into_an_empty_folder_works(tmp_path):
    model, want = with_lora(1)
    (tmp_path / "a").mkdir()
    pa.save_adapter(model, "a", tmp_path / "a")
    assert torch.equal(loaded_output(tmp_path / "a"), want)


def test_refuses_to_replace_a_folder_holding_other_files(tmp_path):
    model, _ = with_lora(1)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    (folder / CFG).write_text("{}")
    with pytest.raises(pa.AdapterFileError, match="tokenizer.json") as e:
        pa.save_adapter(model, "a", folder)
    assert e.value.path == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == [CFG, "tokenizer.json"]
    assert leftovers(tmp_path, "checkpoint") == []


def test_refuses_to_replace_a_file(tmp_path):
    model, _ = with_lora(1)
    (tmp_path / "a").write_text("precious")
    with pytest.raises(pa.AdapterFileError, match="not a folder"):
        pa.save_peft_adapter(model, "a", tmp_path / "a")
    assert (tmp_path / "a").read_text() == "precious"


def _failing_save_file(exc):
    def save_file(*args, **kwargs):
        raise exc

    return save_file


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_keeps_previous_folder(tmp_path, monkeypatch, exc):
    model, want = with_lora(1)
    folder = pa.save_adapter(model, "a", tmp_path / "a")
    before = folder_bytes(folder)
    other, _ = with_lora(2)
    monkeypatch.setattr(pio, "save_file", _failing_save_file(exc))
    with pytest.raises(type(exc)):
        pa.save_adapter(other, "a", folder)
    with pytest.raises(type(exc)):
        pa.save_peft_adapter(other, "a", folder)
    monkeypatch.undo()
    assert folder_bytes(folder) == before
    assert torch.equal(loaded_output(folder), want)
    assert leftovers(tmp_path, "a") == []


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    model, _ = with_lora(1)
    monkeypatch.setattr(pio, "save_file", _failing_save_file(OSError(5, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        pa.save_adapter(model, "a", tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_into_place_restores_previous_folder(tmp_path, monkeypatch):
    """The old folder is moved aside before the new one moves in; if that fails it comes back."""
    model, want = with_lora(1)
    folder = pa.save_adapter(model, "a", tmp_path / "a")
    before = folder_bytes(folder)
    other, _ = with_lora(2)
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((str(src), str(dst)))
        if ".tmp-" in str(src):
            raise OSError(18, "Invalid cross-device link")
        real_rename(src, dst)

    monkeypatch.setattr(pio.os, "rename", rename)
    with pytest.raises(OSError, match="cross-device"):
        pa.save_adapter(other, "a", folder)
    monkeypatch.undo()
    assert len(calls) == 3  # aside, (failed) into place, back
    assert folder_bytes(folder) == before
    assert torch.equal(loaded_output(folder), want)
    assert leftovers(tmp_path, "a") == []


def test_failed_save_does_not_touch_unrelated_siblings(tmp_path, monkeypatch):
    model, _ = with_lora(1)
    pa.save_adapter(model, "a", tmp_path / "a")
    pa.save_adapter(model, "a", tmp_path / "b")
    b_before = folder_bytes(tmp_path / "b")
    monkeypatch.setattr(pio, "save_file", _failing_save_file(OSError(28, "full")))
    with pytest.raises(OSError):
        pa.save_adapter(model, "a", tmp_path / "a")
    monkeypatch.undo()
    assert folder_bytes(tmp_path / "b") == b_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


# -- forward compatibility --------------------------------------------------------------------------


def _edit(folder, fn):
    meta = json.loads((folder / CFG).read_text())
    fn(meta)
    (folder / CFG).write_text(json.dumps(meta))


def test_unknown_config_keys_warn_and_load(tmp_path):
    model, want = with_lora(1)
    folder = pa.save_adapter(model, "a", tmp_path / "a")
    _edit(folder, lambda m: m["config"].update(future_knob=3, other_knob="x"))
    with pytest.warns(UserWarning, match=r"future_knob.*other_knob|other_knob.*future_knob") as rec:
        got = loaded_output(folder)
    assert any(CFG in str(w.message) for w in rec)
    assert torch.equal(got, want)


def test_unknown_top_level_keys_warn_and_load(tmp_path):
    model, want = with_lora(1)
    folder = pa.save_adapter(model, "a", tmp_path / "a")
    _edit(folder, lambda m: m.update(created_by="paradapt 9", training={"steps": 10}))
    with pytest.warns(UserWarning, match="created_by"):
        got = loaded_output(folder)
    assert torch.equal(got, want)


def test_known_keys_load_without_warnings(tmp_path):
    model, want = with_lora(1)
    folder = pa.save_adapter(model, "a", tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = loaded_output(folder)
    assert torch.equal(got, want)


def test_older_format_version_loads(tmp_path):
    model, want = with_lora(1)
    folder = pa.save_adapter(model, "a", tmp_path / "a")
    _edit(folder, lambda m: m.update(format_version=0))
    assert torch.equal(loaded_output(folder), want)


def test_unknown_base_model_fields_are_ignored(tmp_path):
    model, want = with_lora(1)
    folder = pa.save_adapter(model, "a", tmp_path / "a")
    _edit(folder, lambda m: m["base_model"].update(vocab_size=96, name_or_path="someone/tiny"))
    assert torch.equal(loaded_output(folder), want)


# -- PEFT layout without peft installed ---------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_peft_layout_round_trips_without_peft(family, tmp_path):
    targets = {"llama": ["q_proj", "o_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "dense"]}[family]
    model, want = with_lora(1, family=family, targets=targets, use_rslora=True)
    folder = pa.save_peft_adapter(model, "a", tmp_path / "p")
    meta = json.loads((folder / CFG).read_text())
    assert meta["peft_type"] == "LORA" and meta["use_rslora"] is True
    assert meta["fan_in_fan_out"] is (family == "gpt2")
    assert all(
        k.startswith("base_model.model.") for k in load_file(str(folder / "adapter_model.safetensors"))
    )
    torch.testing.assert_close(loaded_output(folder, family), want, atol=1e-6, rtol=0)


def test_adapter_from_another_model_of_the_same_family_loads(tmp_path):
    """Qwen2 is Llama-shaped: the same module names, so its adapters fit a Llama of the same size."""
    model, _ = with_lora(1, family="qwen2")
    folder = pa.save_adapter(model, "a", tmp_path / "a")
    assert json.loads((folder / CFG).read_text())["base_model"]["model_type"] == "qwen2"
    llama = tiny_model("llama")
    pa.load_adapter(llama, folder)
    for k, v in model.paradapt["a"].state_dict().items():
        assert torch.equal(llama.paradapt["a"].state_dict()[k], v), k


# -- read without attaching (what a server keeps in host memory) -----------------------------


@pytest.mark.parametrize("layout", ["paradapt", "peft"])
def test_read_adapter_validates_and_returns_the_weights_without_touching_the_model(layout, tmp_path):
    src, _ = with_lora(3, targets=["q_proj", "v_proj"])
    save = pa.save_adapter if layout == "paradapt" else pa.save_peft_adapter
    folder = save(src, "a", tmp_path / "f")
    model = tiny_model("llama")
    pa.add_adapter(model, "other", pa.ParallelConfig(r=4, init="random"))
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    params = {k: v.clone() for k, v in model.state_dict().items()}
    config, weights = pio.read_adapter(model, folder, "x")
    assert pa.list_adapters(model) == ["other"]
    assert hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    pa.load_adapter(model, folder, name="x")  # what load_adapter builds is what read_adapter returned
    assert isinstance(config, pa.LoRAConfig) and config.r == 4
    loaded = model.paradapt["x"].state_dict()
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_read_adapter_refuses_what_load_adapter_refuses_and_leaves_a_fresh_model_bare(tmp_path):
    src, _ = with_lora(3)
    folder = pa.save_adapter(src, "a", tmp_path / "f")
    other = tiny_model("llama", hidden_size=48)  # another width: the weights cannot fit
    with pytest.raises(pa.ParadaptError, match="hidden_size"):
        pio.read_adapter(other, folder)
    assert pa.list_adapters(other) == [] and getattr(other, "paradapt", None) is None
    config, _ = pio.read_adapter(tiny_model("llama"), folder)  # a model without paradapt state
    assert config.r == 4


@pytest.mark.parametrize("kind", ["parallel", "lora", "ia3", "prefix", "series-head"])
def test_reading_a_folder_skips_the_random_init_the_file_overwrites(tmp_path, monkeypatch, kind):
    """A load builds the modules without initialising them (every weight comes from the file,
    checked), and still reproduces the saved adapter bit for bit; a new adapter is initialised."""
    import paradapt.inject as inject

    configs = {
        "parallel": pa.ParallelConfig(r=4, init="random"),
        "lora": pa.LoRAConfig(r=4, init="random"),
        "ia3": pa.IA3Config(init="random"),
        "prefix": pa.PrefixConfig(num_virtual_tokens=3, init="random"),
        "series-head": pa.SeriesConfig(r=4, scale="learned", init="random", head={"num_labels": 3}),
    }
    model = tiny_model("llama")
    pa.add_adapter(model, "a", configs[kind])
    pa.save_adapter(model, "a", tmp_path / "a")
    saved = load_file(tmp_path / "a" / WEIGHTS)  # prefix: the folded form, as loaded

    def refuse(*args, **kwargs):
        raise AssertionError("initialised weights the file overwrites")

    for fn in ("init_bottleneck", "init_scale_shift", "init_prefix", "init_prefix_encoder"):
        monkeypatch.setattr(inject, fn, refuse)
    other = tiny_model("llama")
    pa.load_adapter(other, tmp_path / "a", name="a")
    adapter, _ = pio.build_folder(other, pio.parse_folder(tmp_path / "a", "b"))
    for got in (other.paradapt["a"].state_dict(), adapter.state_dict()):
        assert got.keys() == saved.keys()
        assert all(torch.equal(got[k], saved[k]) for k in saved)
    with pytest.raises(AssertionError, match="initialised"):
        pa.add_adapter(other, "new", configs[kind])


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    model, _ = with_lora(0)
    with torch.no_grad():
        next(iter(pa.state.require_state(model).container["a"].parameters())).view(-1)[0] = float("inf")
    pa.save_adapter(model, "a", tmp_path / "a")
    with pytest.raises(pa.AdapterFileError, match=r"tensor '.*' has non-finite values"):
        pa.load_adapter(tiny_model("llama"), tmp_path / "a")


def test_the_weights_hash_is_recorded_and_a_corrupted_file_refused(tmp_path):
    import hashlib

    model, expected = with_lora(1)
    folder = pa.save_adapter(model, "a", tmp_path / "a")
    meta = json.loads((folder / CFG).read_text())
    weights = (folder / WEIGHTS).read_bytes()
    assert meta["sha256"] == {WEIGHTS: hashlib.sha256(weights).hexdigest()}
    assert torch.equal(loaded_output(folder), expected)
    flipped = bytearray(weights)
    flipped[-1] ^= 1  # one bit of the last tensor's data: still valid safetensors
    (folder / WEIGHTS).write_bytes(bytes(flipped))
    with pytest.raises(pa.AdapterFileError, match="does not match the sha256"):
        pa.load_adapter(tiny_model("llama"), folder)
    del meta["sha256"]  # a folder saved before hashes: loads unchecked
    (folder / CFG).write_text(json.dumps(meta))
    pa.load_adapter(tiny_model("llama"), folder)
