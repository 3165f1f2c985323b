"""The numerics rules, for every adapter kind on every family.

(a) zero-initialised adapters leave outputs bit-identical to the base;
(b) merged == unmerged where a merge exists, and unmerge restores the base;
(c) save/load round-trips bit-exactly;
(d) a mixed batch equals each row run alone with its own adapter.
Plus: gradients reach only adapter parameters, Parallel equals each adapter
alone, and unwrap gives back the original state dict.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import FAMILIES, outputs, tiny_model

import paradapt as pa

KINDS = {
    "parallel": lambda: pa.ParallelConfig(r=8),
    "parallel_attn": lambda: pa.ParallelConfig(r=8, location="both", scale="learned"),
    "series": lambda: pa.SeriesConfig(r=8),
    "houlsby": lambda: pa.SeriesConfig(r=8, variant="houlsby", act="silu"),
    "lora": lambda: pa.LoRAConfig(r=4, alpha=8),
    "lora_all": lambda: pa.LoRAConfig(r=4, targets="all-linear", use_rslora=True),
    "ia3": lambda: pa.IA3Config(),
    "ssf": lambda: pa.SSFConfig(),
    "prefix_gated": lambda: pa.PrefixConfig(num_virtual_tokens=4, gated=True, reparam_hidden=16),
    "mam_gated": lambda: pa.MAMConfig(num_virtual_tokens=4, r=8, gated=True, reparam_hidden=16),
}
RANDOM_KINDS = {
    **KINDS,
    "prefix": lambda: pa.PrefixConfig(num_virtual_tokens=3, reparam=False),
    "prefix_reparam": lambda: pa.PrefixConfig(num_virtual_tokens=5, reparam_hidden=16),
    "mam": lambda: pa.MAMConfig(num_virtual_tokens=3, r=8, reparam=False),
}
MERGEABLE = ["lora", "lora_all", "ia3", "ssf"]


def random_config(kind: str):
    return dataclasses.replace(RANDOM_KINDS[kind](), init="random")


def ids_for(batch=3, seq=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 96, (batch, seq), generator=g)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_zero_init_is_bit_identical(family, kind, attn):
    model = tiny_model(family, attn)
    ids = ids_for()
    base = outputs(model, ids)
    pa.add_adapter(model, "a", KINDS[kind]())
    pa.set_active(model, "a")
    assert torch.equal(outputs(model, ids), base)
    with pa.route(model, ["a", None, "a"]):
        assert torch.equal(outputs(model, ids), base)


@pytest.mark.parametrize("kind", sorted(RANDOM_KINDS))
def test_random_adapter_changes_output(family, kind):
    model = tiny_model(family)
    ids = ids_for()
    base = outputs(model, ids)
    pa.add_adapter(model, "a", random_config(kind))
    pa.set_active(model, "a")
    assert not torch.allclose(outputs(model, ids), base, atol=1e-5)
    pa.set_active(model, None)
    assert torch.equal(outputs(model, ids), base)


@pytest.mark.parametrize("kind", MERGEABLE)
def test_merge_equals_unmerged_and_unmerge_restores(family, kind):
    model = tiny_model(family)
    ids = ids_for()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pa.add_adapter(model, "a", random_config(kind))
    pa.set_active(model, "a")
    unmerged = outputs(model, ids)
    pa.merge(model, "a")
    torch.testing.assert_close(outputs(model, ids), unmerged, atol=1e-5, rtol=1e-5)
    pa.unmerge(model, "a")
    pa.set_active(model, None)
    after = model.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, atol=1e-6, rtol=1e-6, msg=k)


@pytest.mark.parametrize("kind", ["parallel", "series", "prefix", "mam"])
def test_unmergeable_kinds_raise_clear_error(kind):
    model = tiny_model("llama")
    pa.add_adapter(model, "a", random_config(kind))
    with pytest.raises(pa.MergeError, match="cannot be merged"):
        pa.merge(model, "a")


@pytest.mark.parametrize("kind", sorted(RANDOM_KINDS))
def test_save_load_round_trip_bit_exact(family, kind, tmp_path):
    model = tiny_model(family)
    ids = ids_for()
    pa.add_adapter(model, "a", random_config(kind))
    pa.fold(model, "a")  # reparameterised prefixes are saved folded; a no-op for other kinds
    pa.save_adapter(model, "a", tmp_path / "a")
    pa.set_active(model, "a")
    want = outputs(model, ids)
    fresh = tiny_model(family)
    pa.load_adapter(fresh, tmp_path / "a", name="b")
    saved, loaded = model.paradapt["a"].state_dict(), fresh.paradapt["b"].state_dict()
    assert sorted(saved) == sorted(loaded)
    for k, v in saved.items():
        assert v.dtype == loaded[k].dtype and torch.equal(v, loaded[k]), k
    pa.set_active(fresh, "b")
    assert torch.equal(outputs(fresh, ids), want)


def test_save_folds_reparam_prefix_to_same_output(tmp_path):
    model = tiny_model("llama")
    ids = ids_for()
    pa.add_adapter(model, "a", random_config("prefix_reparam"))
    pa.set_active(model, "a")
    want = outputs(model, ids)
    pa.save_adapter(model, "a", tmp_path / "a")
    fresh = tiny_model("llama")
    pa.load_adapter(fresh, tmp_path / "a")
    pa.set_active(fresh, "a")
    torch.testing.assert_close(outputs(fresh, ids), want, atol=1e-6, rtol=1e-6)


MIXES = [
    ["parallel", "lora", None, "series"],
    ["ia3", "prefix", "ssf", "houlsby"],
    ["mam", None, "parallel_attn", "lora_all"],
    ["prefix", "prefix_gated", "mam_gated", "prefix"],
]


@pytest.mark.parametrize("mix", MIXES, ids=lambda m: "-".join(str(x) for x in m))
def test_mixed_batch_equals_each_row_alone(family, mix):
    model = tiny_model(family)
    ids = ids_for(batch=len(mix))
    for k in {m for m in mix if m}:
        pa.add_adapter(model, k, random_config(k))
    with pa.route(model, mix):
        batched = outputs(model, ids)
    for i, name in enumerate(mix):
        pa.set_active(model, name)
        alone = outputs(model, ids[i : i + 1])
        torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-5, msg=f"row {i} ({name})")


def test_mixed_batch_with_padding_mask(family):
    """Rows of different lengths: the model's own padding mask and the prefix columns combine."""
    model = tiny_model(family)
    ids = ids_for(batch=3, seq=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0 if family != "bert" else 1
    mask[1, -2:] = 0 if family == "bert" else 1
    for k in ("prefix", "parallel"):
        pa.add_adapter(model, k, random_config(k))
    rows = ["prefix", "parallel", "prefix"]
    with pa.route(model, rows):
        batched = outputs(model, ids, attention_mask=mask)
    for i, name in enumerate(rows):
        with pa.route(model, [name]):
            alone = outputs(model, ids[i : i + 1], attention_mask=mask[i : i + 1])
        keep = mask[i].bool()
        torch.testing.assert_close(batched[i][keep], alone[0][keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(RANDOM_KINDS))
def test_gradients_reach_only_adapter_parameters(kind):
    model = tiny_model("llama")
    model.train()
    pa.add_adapter(model, "a", random_config(kind))
    pa.add_adapter(model, "other", random_config("lora"))
    pa.set_active(model, "a")
    outputs(model, ids_for()).sum().backward()
    adapter_params = {id(p) for p in model.paradapt["a"].parameters()}
    for n, p in model.named_parameters():
        if id(p) in adapter_params:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n


def test_parallel_equals_each_adapter_alone(family):
    model = tiny_model(family)
    ids = ids_for(batch=2)
    for k in ("parallel", "lora", "prefix"):
        pa.add_adapter(model, k, random_config(k))
    comp = pa.Parallel("parallel", pa.Stack("lora", "prefix"), None)
    outs = pa.parallel(model, comp, ids)
    assert len(outs) == 3
    for out, channel in zip(outs, comp.channels, strict=True):
        pa.set_active(model, channel)
        alone = outputs(model, ids)
        got = out.logits if hasattr(out, "logits") else out.last_hidden_state
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    pa.set_active(model, comp)
    full = outputs(model, ids)
    assert full.shape[0] == 3 * ids.shape[0]
    torch.testing.assert_close(
        pa.split_parallel(full, 3)[0],
        outs[0].logits if hasattr(outs[0], "logits") else outs[0].last_hidden_state,
    )


def test_unwrap_restores_original_state_dict_and_tree(family):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names_before = [n for n, _ in model.named_modules()]
    for k in RANDOM_KINDS:
        pa.add_adapter(model, k, random_config(k))
    pa.merge(model, "lora")
    pa.unwrap(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, atol=1e-6, rtol=1e-6, msg=k)
    assert [n for n, _ in model.named_modules()] == names_before
    assert not hasattr(model, "_paradapt_state")


@pytest.mark.parametrize("fam", FAMILIES)
def test_bf16_mixed_batch(fam):
    model = tiny_model(fam).to(torch.bfloat16)
    ids = ids_for(batch=3)
    for k in ("parallel", "lora", "prefix"):
        pa.add_adapter(model, k, random_config(k))
        assert next(model.paradapt[k].parameters()).dtype == torch.bfloat16
    rows = ["parallel", "lora", "prefix"]
    with pa.route(model, rows):
        batched = outputs(model, ids)
    for i, name in enumerate(rows):
        pa.set_active(model, name)
        alone = outputs(model, ids[i : i + 1])
        torch.testing.assert_close(batched[i], alone[0], atol=2e-2, rtol=2e-2)
