"""PEFT interop with the real ``peft`` package: its LoRA folders load, ours load in PEFT.

PEFT wraps the model it is given in place, so every comparison uses two copies of
the same tiny model (same seed): one for PEFT, one for paradapt.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

import paradapt as pa

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

ATOL = 1e-5


def ids_for(batch=3, seq=6, seed=1):
    return torch.randint(1, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


def all_outputs(model, ids) -> list[torch.Tensor]:
    """Every output tensor that depends on the layers (BERT's pooler too, which ``dense`` targets)."""
    out = model(ids)
    if hasattr(out, "logits"):
        return [out.logits]
    return [out.last_hidden_state, out.pooler_output]


def assert_outputs_close(got, want, atol=ATOL):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=atol, rtol=0)


def peft_lora(family, tmp_path, seed=0, **lora):
    """A PEFT LoRA with non-zero B on a tiny model, saved; returns (outputs, folder)."""
    model = get_peft_model(tiny_model(family, seed=seed), LoraConfig(init_lora_weights=False, **lora))
    model.eval()
    ids = ids_for()
    with torch.no_grad():
        want = all_outputs(model, ids)
        base = model.get_base_model()
        with model.disable_adapter():
            assert not torch.allclose(all_outputs(base, ids)[0], want[0], atol=1e-3)  # LoRA has an effect
    folder = tmp_path / "peft_lora"
    model.save_pretrained(folder)
    return want, folder


PEFT_CASES = {
    "llama-default": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-rslora-mlp": (
        "llama",
        dict(
            r=4,
            lora_alpha=16,
            use_rslora=True,
            target_modules=["k_proj", "o_proj", "gate_proj", "down_proj"],
        ),
    ),
    "llama-regex": ("llama", dict(r=2, lora_alpha=5, target_modules=r".*\.mlp\.(up|down)_proj")),
    "llama-one-layer": (
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    ),
    "llama-dropout": ("llama", dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["v_proj"])),
    "gpt2-conv1d": (
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    ),
    "gpt2-rslora": (
        "gpt2",
        dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["c_attn"], fan_in_fan_out=True),
    ),
    "bert-default": ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"])),
    "bert-dense": ("bert", dict(r=3, lora_alpha=6, target_modules=["key", "dense"])),
}


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_lora_folder_loads_with_equal_outputs(case, tmp_path):
    family, lora = PEFT_CASES[case]
    want, folder = peft_lora(family, tmp_path, **lora)
    model = tiny_model(family)
    adapter = pa.load_adapter(model, folder, name="p")
    assert pa.list_adapters(model) == ["p"]
    assert not any(p.requires_grad for p in adapter.parameters())  # loaded adapters are frozen
    pa.set_active(model, "p")
    with torch.no_grad():
        assert_outputs_close(all_outputs(model, ids_for()), want)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_peft_folder_name_defaults_to_folder_and_round_trips_through_paradapt(tmp_path):
    want, folder = peft_lora("llama", tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"])
    model = tiny_model("llama")
    pa.load_adapter(model, folder)
    assert pa.list_adapters(model) == ["peft_lora"]
    pa.save_adapter(model, "peft_lora", tmp_path / "ours")
    fresh = tiny_model("llama")
    pa.load_adapter(fresh, tmp_path / "ours")
    pa.set_active(fresh, "peft_lora")
    with torch.no_grad():
        assert_outputs_close(all_outputs(fresh, ids_for()), want)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_two_peft_adapters_in_one_mixed_batch_equal_peft_each(tmp_path):
    want_a, folder_a = peft_lora(
        "llama", tmp_path / "a", seed=0, r=4, lora_alpha=8, target_modules=["q_proj"]
    )
    torch.manual_seed(5)  # different LoRA weights, same base
    want_b, folder_b = peft_lora(
        "llama",
        tmp_path / "b",
        seed=0,
        r=2,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["v_proj", "up_proj"],
    )
    model = tiny_model("llama")
    pa.load_adapter(model, folder_a, name="a")
    pa.load_adapter(model, folder_b, name="b")
    with torch.no_grad(), pa.route(model, ["b", "a", "b"]):
        got = all_outputs(model, ids_for())[0]
    for row, want in zip(range(3), [want_b, want_a, want_b], strict=True):
        torch.testing.assert_close(got[row], want[0][row], atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_pissa_folder_loads_on_original_base(family, tmp_path):
    """PEFT saves PiSSA adapters relative to the residual base; loading redoes the SVD as PEFT does."""
    targets = ["q_proj", "v_proj"] if family == "llama" else ["c_attn"]
    model = get_peft_model(
        tiny_model(family), LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=targets)
    )
    model.eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:  # stands in for training
                p.add_(torch.randn_like(p) * 0.1)
        want = all_outputs(model, ids_for())
    model.save_pretrained(tmp_path / "pissa")
    ours = tiny_model(family)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    pa.load_adapter(ours, tmp_path / "pissa", name="p")
    pa.set_active(ours, "p")
    with torch.no_grad():
        assert_outputs_close(all_outputs(ours, ids_for()), want)
    pa.unwrap(ours)  # the residual goes back into the base
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=1e-6, msg=k)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_peft_pissa_niter_folder_is_rejected(tmp_path):
    _, folder = peft_lora("llama", tmp_path, r=4, target_modules=["q_proj"])
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa_niter_4"  # randomised SVD: not reproducible
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    model = tiny_model("llama")
    with pytest.raises(pa.IncompatibleAdapterError, match="init_lora_weights") as e:
        pa.load_adapter(model, folder)
    assert e.value.field == "init_lora_weights"
    assert not hasattr(model, "paradapt")


# -- paradapt -> PEFT ------------------------------------------------------------------------

EXPORT_CASES = {
    "llama-default": ("llama", pa.LoRAConfig(r=4, alpha=8, init="random")),
    "llama-rslora": (
        "llama",
        pa.LoRAConfig(r=4, alpha=8, init="random", use_rslora=True, targets=["k_proj", "down_proj"]),
    ),
    "llama-one-layer": ("llama", pa.LoRAConfig(r=2, alpha=3, init="random", layers=[1])),
    "gpt2-conv1d": ("gpt2", pa.LoRAConfig(r=4, init="random", targets=["c_attn", "c_fc", "c_proj"])),
    "bert-all-linear": ("bert", pa.LoRAConfig(r=2, init="random", targets="all-linear")),
}


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_exported_lora_loads_in_peft_with_equal_outputs(case, tmp_path):
    family, cfg = EXPORT_CASES[case]
    model = tiny_model(family)
    pa.add_adapter(model, "a", cfg)
    pa.set_active(model, "a")
    with torch.no_grad():
        want = all_outputs(model, ids_for())
    folder = pa.save_peft_adapter(model, "a", tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_cfg = LoraConfig.from_pretrained(folder)
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.use_rslora) == (cfg.r, cfg.alpha, cfg.use_rslora)
    theirs = PeftModel.from_pretrained(tiny_model(family), folder)
    theirs.eval()
    with torch.no_grad():
        assert_outputs_close(all_outputs(theirs, ids_for()), want)
    # and back: the exported folder loads in paradapt too
    again = tiny_model(family)
    pa.load_adapter(again, folder, name="b")
    pa.set_active(again, "b")
    with torch.no_grad():
        assert_outputs_close(all_outputs(again, ids_for()), want)


# -- PiSSA ---------------------------------------------------------------------------------


def perturbed_pissa(family, **cfg):
    model = tiny_model(family)
    pa.add_adapter(model, "a", pa.LoRAConfig(init="pissa", **cfg))
    with torch.no_grad():
        for p in model.paradapt["a"].parameters():  # stands in for training
            p.add_(torch.randn_like(p) * 0.05)
    pa.set_active(model, "a")
    with torch.no_grad():
        return model, all_outputs(model, ids_for())


PISSA_CASES = {
    "llama": ("llama", dict(r=4, alpha=8)),
    "llama-rslora-all": ("llama", dict(r=2, alpha=4, use_rslora=True, targets="all-linear")),
    "gpt2": ("gpt2", dict(r=4, alpha=8, targets=["c_attn", "c_fc"])),
    "bert": ("bert", dict(r=3, alpha=3, targets=["query", "value", "dense"])),
}


@pytest.mark.parametrize("case", sorted(PISSA_CASES))
def test_pissa_adapter_saved_and_loaded_on_fresh_base_reproduces_outputs(case, tmp_path):
    family, cfg = PISSA_CASES[case]
    torch.manual_seed(7)
    model, want = perturbed_pissa(family, **cfg)
    pa.save_adapter(model, "a", tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["config"]
    assert saved["init"] == "default" and saved["r"] == 2 * cfg["r"]  # a plain LoRA on the original base
    fresh = tiny_model(family)
    pa.load_adapter(fresh, tmp_path / "a")
    pa.set_active(fresh, "a")
    with torch.no_grad():
        assert_outputs_close(all_outputs(fresh, ids_for()), want)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pissa_adapter_exported_to_peft_reproduces_outputs(family, tmp_path):
    torch.manual_seed(8)
    model, want = perturbed_pissa(family, r=2, alpha=4, targets="all-linear")
    folder = pa.save_peft_adapter(model, "a", tmp_path / "peft")
    theirs = PeftModel.from_pretrained(tiny_model(family), folder)
    theirs.eval()
    with torch.no_grad():
        assert_outputs_close(all_outputs(theirs, ids_for()), want)
