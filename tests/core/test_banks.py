"""Mixed batches through banks: every strategy equals running each row alone with its own adapter."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, outputs, tiny_model

import paradapt as pa
from paradapt import kernels
from paradapt.sites import Site
from paradapt.state import get_state

STRATEGIES = [*kernels.STRATEGIES, None]  # None: the measured choice


def add_zoo(model) -> None:
    """Adapters of every bankable kind, two LoRA ranks, plus kinds that go the general way."""
    pa.add_adapter(model, "lora4", pa.LoRAConfig(r=4, init="random"))
    pa.add_adapter(model, "lora8", pa.LoRAConfig(r=8, init="random", targets="all-linear"))
    pa.add_adapter(model, "par", pa.ParallelConfig(r=8, init="random", location="both", act="gelu"))
    pa.add_adapter(model, "par_ls", pa.ParallelConfig(r=4, init="random", scale="learned", bias=False))
    pa.add_adapter(model, "ser", pa.SeriesConfig(r=4, init="random", variant="houlsby", act="silu"))
    pa.add_adapter(model, "ia3", pa.IA3Config(init="random"))
    pa.add_adapter(model, "pre", pa.PrefixConfig(num_virtual_tokens=3, init="random"))
    pa.add_adapter(model, "unused", pa.LoRAConfig(r=4, init="random"))  # an empty segment


def add_lora_and_parallel(model, r_parallel: int = 4) -> None:
    """A LoRA "a" (r=4) and a parallel adapter "b": one bank at linears, one at FFN blocks."""
    pa.add_adapter(model, "a", pa.LoRAConfig(r=4, init="random"))
    pa.add_adapter(model, "b", pa.ParallelConfig(r=r_parallel, init="random"))


ROWS = ["lora4", "par", None, "lora8", "ser", "lora4", "par_ls", "ia3", pa.Stack("lora4", "par"), "pre"]


def per_row_reference(model, ids, rows) -> torch.Tensor:
    outs = []
    for i, r in enumerate(rows):
        pa.set_active(model, r)
        with torch.no_grad():
            outs.append(outputs(model, ids[i : i + 1]))
    pa.set_active(model, None)
    return torch.cat(outs)


def mixed(model, ids, rows, strategy=None) -> torch.Tensor:
    with torch.no_grad(), kernels.force(strategy), pa.route(model, rows):
        return outputs(model, ids)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mixed_batch_equals_each_row_alone(family, strategy):
    model = tiny_model(family)
    add_zoo(model)
    ids = torch.randint(0, 96, (len(ROWS), 7), generator=torch.Generator().manual_seed(1))
    ref = per_row_reference(model, ids, ROWS)
    torch.testing.assert_close(mixed(model, ids, ROWS, strategy), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_row_segments_sorted_and_unsorted(strategy):
    model = tiny_model("llama")
    for i in range(6):
        pa.add_adapter(model, f"a{i}", pa.LoRAConfig(r=4 + 4 * (i % 2), init="random"))
    ids = torch.randint(0, 96, (6, 5), generator=torch.Generator().manual_seed(2))
    for rows in (["a0", "a1", "a2", "a3", "a4", "a5"], ["a5", "a3", "a1", "a0", "a2", "a4"]):
        torch.testing.assert_close(
            mixed(model, ids, rows, strategy), per_row_reference(model, ids, rows), atol=1e-5, rtol=1e-5
        )


def test_rows_without_any_adapter_are_the_base():
    model = tiny_model("gpt2")
    ids = torch.randint(0, 96, (3, 5))
    with torch.no_grad():
        base = outputs(model, ids)
    pa.add_adapter(model, "a", pa.LoRAConfig(r=4, init="random"))
    got = mixed(model, ids, [None, "a", None])
    assert torch.equal(got[0], base[0]) and torch.equal(got[2], base[2])
    assert not torch.allclose(got[1], base[1])


def test_segments_are_built_once_per_forward_and_shared_by_all_sites():
    model = tiny_model("llama")
    for i in range(3):
        pa.add_adapter(model, f"a{i}", pa.LoRAConfig(r=4, init="random"))  # same slot order at q and v
    ids = torch.randint(0, 96, (4, 5))
    with torch.no_grad(), pa.route(model, ["a2", "a0", "a1", "a0"]) as route_map:
        outputs(model, ids)
        outputs(model, ids)  # a second forward (e.g. a decode step) reuses them too
    assert route_map.segment_builds == 1  # 2 layers x 2 linears share one sort of the rows
    sites = get_state(model).sites
    layouts = {id(b.layout) for s in sites.values() for b in s.banks.values()}
    assert len(layouts) == 1


def test_generate_with_mixed_adapters_matches_each_row_alone():
    model = tiny_model("llama")
    add_lora_and_parallel(model, r_parallel=8)
    ids = torch.randint(1, 96, (3, 4), generator=torch.Generator().manual_seed(3))
    rows = ["b", None, "a"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), pa.route(model, rows):
        together = model.generate(ids, **kw)
    for i, r in enumerate(rows):
        pa.set_active(model, r)
        with torch.no_grad():
            alone = model.generate(ids[i : i + 1], **kw)
        assert torch.equal(together[i], alone[0]), r
    pa.set_active(model, None)


def test_bank_follows_in_place_weight_changes_and_reloads():
    model = tiny_model("llama")
    add_lora_and_parallel(model)
    ids = torch.randint(0, 96, (2, 5))
    rows = ["a", "b"]
    mixed(model, ids, rows)  # fill the banks
    with torch.no_grad():
        for p in model.paradapt["a"].parameters():
            p.mul_(1.5)  # what an optimizer step does: in place
        sd = {k: v * 0.5 for k, v in model.paradapt["b"].state_dict().items()}
    model.paradapt["b"].load_state_dict(sd)
    torch.testing.assert_close(
        mixed(model, ids, rows), per_row_reference(model, ids, rows), atol=1e-5, rtol=0
    )


def reload_with_other_weights(model, name: str, tmp_path) -> None:
    """Remove a LoRA (r 4) and load one of the same name with other weights from a folder."""
    other = tiny_model("llama")
    torch.manual_seed(7)
    pa.add_adapter(other, name, pa.LoRAConfig(r=4, init="random"))
    pa.save_adapter(other, name, tmp_path / name)
    pa.remove_adapter(model, name)
    pa.load_adapter(model, tmp_path / name, name=name)


def test_fixed_weights_skips_the_check_but_sees_a_reloaded_adapter(monkeypatch, tmp_path):
    """``pa.route(..., fixed_weights=True)`` (what the serving engine uses) reuses bank slots
    without checking their source tensors, yet an adapter removed and loaded again under the
    same name with other weights gets a fresh slot."""
    model = tiny_model("llama")
    add_lora_and_parallel(model)
    ids = torch.randint(0, 96, (2, 5))
    rows = ["a", "b"]
    with torch.no_grad(), pa.route(model, rows, fixed_weights=True):
        first = outputs(model, ids)  # fills the banks
    reload_with_other_weights(model, "a", tmp_path)
    ref = per_row_reference(model, ids, rows)
    checks = []
    original = Site.bank_for

    def bank_for(self, name, comp, device, check=True):
        checks.append(check)
        return original(self, name, comp, device, check)

    monkeypatch.setattr(Site, "bank_for", bank_for)
    with torch.no_grad(), pa.route(model, rows, fixed_weights=True):
        got = outputs(model, ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(got[0], first[0])  # row "a" really changed
    assert checks and not any(checks)  # every slot lookup skipped the check


def test_fixed_weights_remembers_trusted_slots_but_sees_train_mode_and_reloads(monkeypatch, tmp_path):
    """Under ``fixed_weights`` each site remembers the (component, bank) of a trusted adapter, so
    a decode step's rows skip the bank lookup; a component put in train mode, or removed and
    loaded again with other weights, is not served from the memory."""
    model = tiny_model("llama")
    add_lora_and_parallel(model)
    pa.set_trainable(model, ["a", "b"], False)
    ids = torch.randint(0, 96, (2, 5))
    rows = ["a", "b"]

    def fixed():
        with torch.no_grad(), pa.route(model, rows, fixed_weights=True):
            return outputs(model, ids)

    first = fixed()  # fills the banks and the memory
    lookups = []
    original = Site.bank_for
    monkeypatch.setattr(Site, "bank_for", lambda self, *a, **k: lookups.append(a[0]) or original(self, *a, **k))
    torch.testing.assert_close(fixed(), first, atol=0, rtol=0)
    assert lookups == []  # every row found its bank in the memory
    model.paradapt["a"].train()  # dropout 0: the same math, but the general way, not banked
    torch.testing.assert_close(fixed(), per_row_reference(model, ids, rows), atol=1e-5, rtol=0)
    sites = get_state(model).sites.values()
    assert not any("a" in site._trusted for site in sites) and any("b" in site._trusted for site in sites)
    model.paradapt["a"].eval()
    reload_with_other_weights(model, "a", tmp_path)
    got = fixed()
    torch.testing.assert_close(got, per_row_reference(model, ids, rows), atol=1e-5, rtol=0)
    assert not torch.allclose(got[0], first[0])  # row "a" really changed
    assert "a" in lookups  # the reloaded adapter was looked up, not remembered


def test_fixed_weights_still_checks_an_adapter_being_trained(monkeypatch):
    """Under ``fixed_weights`` a slot copied from tensors that require a gradient (an adapter
    being trained, as in online RL between generations) is still checked, so an optimizer's
    in-place step is seen; once ``pa.set_trainable(..., False)`` freezes it, its slots are
    refilled and then reused without the check."""
    model = tiny_model("llama")
    add_lora_and_parallel(model)  # added adapters are trainable
    ids = torch.randint(0, 96, (2, 5))
    rows = ["a", "b"]

    def fixed():
        with torch.no_grad(), pa.route(model, rows, fixed_weights=True):
            return outputs(model, ids)

    fixed()  # fill the banks
    with torch.no_grad():
        for p in model.paradapt["a"].parameters():
            p.mul_(1.5)  # what an optimizer step does: in place
    torch.testing.assert_close(fixed(), per_row_reference(model, ids, rows), atol=1e-5, rtol=0)
    pa.set_trainable(model, ["a", "b"], False)
    first = fixed()  # refilled from the frozen tensors
    torch.testing.assert_close(first, per_row_reference(model, ids, rows), atol=1e-5, rtol=0)
    from paradapt.banks import Bank

    checked = []
    original = Bank.fresh
    monkeypatch.setattr(Bank, "fresh", lambda self, n, c: checked.append(n) or original(self, n, c))
    fixed()
    assert checked == []  # frozen slots are trusted


def test_removed_slots_are_reused_and_capacity_doubles():
    model = tiny_model("llama")
    names = [f"a{i}" for i in range(9)]
    for n in names:
        pa.add_adapter(model, n, pa.LoRAConfig(r=4, init="random"))
    ids = torch.randint(0, 96, (9, 4))
    mixed(model, ids, names)
    site = next(s for s in get_state(model).sites.values() if s.banks)
    (bank,) = site.banks.values()
    assert bank.capacity == 16 and len(bank.layout.index) == 9
    pa.remove_adapter(model, "a3")
    assert "a3" not in bank
    pa.add_adapter(model, "new", pa.LoRAConfig(r=4, init="random"))
    rows = [*names[:3], "new", *names[4:]]
    torch.testing.assert_close(
        mixed(model, ids, rows), per_row_reference(model, ids, rows), atol=1e-5, rtol=0
    )
    assert bank.capacity == 16 and bank.layout.index["new"] == 3  # the freed slot


def test_training_forward_uses_the_autograd_path():
    model = tiny_model("llama")
    pa.add_adapter(model, "a", pa.LoRAConfig(r=4, init="random"))
    pa.add_adapter(model, "b", pa.LoRAConfig(r=4, init="random"))
    ids = torch.randint(0, 96, (2, 5))
    with pa.route(model, ["a", "b"]):
        outputs(model, ids).sum().backward()
    grads = [p.grad for n in "ab" for p in model.paradapt[n].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_measured_choice_is_recorded():
    kernels.reset()
    model = tiny_model("bert")
    pa.add_adapter(model, "a", pa.LoRAConfig(r=4, init="random"))
    pa.add_adapter(model, "b", pa.LoRAConfig(r=4, init="random"))
    mixed(model, torch.randint(0, 96, (3, 5)), ["a", "b", "a"])
    picked = kernels.choices()
    assert picked and set(picked.values()) <= set(kernels.STRATEGIES)
    for times in kernels.timings().values():
        assert len(times) >= 2 and all(t > 0 for t in times.values())


def test_bf16_mixed_batch_close_to_each_row_alone():
    model = tiny_model("llama").to(torch.bfloat16)
    add_lora_and_parallel(model, r_parallel=8)
    ids = torch.randint(0, 96, (4, 5))
    rows = ["a", "b", None, "b"]
    ref = per_row_reference(model, ids, rows)
    for strategy in STRATEGIES:
        got = mixed(model, ids, rows, strategy)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref.float(), atol=3e-2, rtol=3e-2)


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="strategy"), kernels.force("fast"):
        pass


def test_deepcopy_and_pickle_after_banks_were_filled():
    import copy
    import io

    model = tiny_model("llama")
    add_lora_and_parallel(model)
    ids = torch.randint(0, 96, (2, 5))
    want = mixed(model, ids, ["a", "b"])
    twin = copy.deepcopy(model)
    assert torch.equal(mixed(twin, ids, ["a", "b"]), want)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert torch.equal(mixed(again, ids, ["a", "b"]), want)


def test_bank_follows_replaced_parameters_and_dtype_changes():
    model = tiny_model("gpt2")
    add_lora_and_parallel(model)
    ids = torch.randint(0, 96, (2, 5))
    rows = ["a", "b"]
    mixed(model, ids, rows)
    comp = next(iter(model.paradapt["b"].components.values()))
    comp.up.weight = torch.nn.Parameter(torch.randn_like(comp.up.weight))  # replaced, not changed in place
    torch.testing.assert_close(
        mixed(model, ids, rows), per_row_reference(model, ids, rows), atol=1e-5, rtol=0
    )
    model.double()
    got = mixed(model, ids, rows)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, per_row_reference(model, ids, rows), atol=1e-10, rtol=0)


def test_adapter_switched_to_train_mode_leaves_its_bank_slot():
    """Rows of an adapter in train mode go the general way and must not also get its banked delta."""
    model = tiny_model("llama")
    add_lora_and_parallel(model)
    pa.add_adapter(model, "c", pa.LoRAConfig(r=4, init="random"))
    ids = torch.randint(0, 96, (3, 5))
    rows = ["a", "b", "c"]
    mixed(model, ids, rows)  # "a" and "c" share a bank at every LoRA site
    model.paradapt["a"].train()  # dropout 0: the same math, but not banked
    torch.testing.assert_close(
        mixed(model, ids, rows), per_row_reference(model, ids, rows), atol=1e-5, rtol=0
    )


def test_entry_hook_follows_input_writers_added_and_removed_after_a_forward():
    """The entry hook skips sites where nothing writes the input (cached per site); an (IA)^3
    added later at the same site (its FFN scale writes the down projection's input) must be
    applied, and after it is removed the site is skipped again with the right output."""
    model = tiny_model("llama")
    pa.add_adapter(model, "a", pa.LoRAConfig(r=4, init="random", targets="all-linear"))
    ids = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(2))
    rows = ["a", None, "a"]
    before = mixed(model, ids, rows)  # every site cached as writing no input
    sites = get_state(model).sites
    assert not any(s.writes_input() for s in sites.values() if hasattr(s, "writes_input"))
    pa.add_adapter(model, "ia3", pa.IA3Config(init="random"))
    rows = ["a", "ia3", None]
    assert any(s.writes_input() for s in sites.values() if hasattr(s, "writes_input"))
    torch.testing.assert_close(mixed(model, ids, rows), per_row_reference(model, ids, rows), atol=1e-5, rtol=1e-5)
    pa.remove_adapter(model, "ia3")
    assert not any(s.writes_input() for s in sites.values() if hasattr(s, "writes_input"))
    torch.testing.assert_close(mixed(model, ids, ["a", None, "a"]), before)
