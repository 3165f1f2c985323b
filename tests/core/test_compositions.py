"""Compositions (Stack, Average, Parallel) and the API's state policies."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from conftest import outputs, tiny_model

import paradapt as pa


def rnd(cfg):
    return dataclasses.replace(cfg, init="random")


def ids_for(batch=2, seq=5):
    return torch.randint(1, 96, (batch, seq), generator=torch.Generator().manual_seed(3))


def test_stack_of_loras_equals_both_merged(family):
    model = tiny_model(family)
    ids = ids_for()
    pa.add_adapter(model, "a", rnd(pa.LoRAConfig(r=4)))
    pa.add_adapter(model, "b", rnd(pa.LoRAConfig(r=2, targets="all-linear")))
    pa.set_active(model, pa.Stack("a", "b"))
    stacked = outputs(model, ids)
    pa.set_active(model, None)
    pa.merge(model, "a")
    pa.merge(model, "b")
    torch.testing.assert_close(outputs(model, ids), stacked, atol=1e-5, rtol=1e-5)


def test_list_activation_is_a_stack():
    model = tiny_model("llama")
    ids = ids_for()
    pa.add_adapter(model, "a", rnd(pa.SeriesConfig(r=4)))
    pa.add_adapter(model, "b", rnd(pa.ParallelConfig(r=4)))
    pa.set_active(model, ["a", "b"])
    as_list = outputs(model, ids)
    pa.set_active(model, pa.Stack("a", "b"))
    assert torch.equal(outputs(model, ids), as_list)


def test_stack_order_matters_for_series_not_for_parallel():
    model = tiny_model("llama")
    ids = ids_for()
    for n in ("s1", "s2"):
        pa.add_adapter(model, n, rnd(pa.SeriesConfig(r=4)))
    for n in ("p1", "p2"):
        pa.add_adapter(model, n, rnd(pa.ParallelConfig(r=4)))
    pa.set_active(model, pa.Stack("s1", "s2"))
    s12 = outputs(model, ids)
    pa.set_active(model, pa.Stack("s2", "s1"))
    assert not torch.allclose(s12, outputs(model, ids), atol=1e-6)
    pa.set_active(model, pa.Stack("p1", "p2"))
    p12 = outputs(model, ids)
    pa.set_active(model, pa.Stack("p2", "p1"))
    torch.testing.assert_close(outputs(model, ids), p12, atol=1e-6, rtol=1e-6)


def test_average_weights():
    model = tiny_model("gpt2")
    ids = ids_for()
    pa.add_adapter(model, "a", rnd(pa.ParallelConfig(r=4)))
    pa.add_adapter(model, "b", rnd(pa.ParallelConfig(r=4)))
    pa.set_active(model, "a")
    only_a = outputs(model, ids)
    pa.set_active(model, pa.Average("a", "b", weights=[1.0, 0.0]))
    torch.testing.assert_close(outputs(model, ids), only_a, atol=1e-6, rtol=1e-6)
    pa.set_active(model, pa.Average("a", "a"))  # normalised: the mean of one adapter is itself
    torch.testing.assert_close(outputs(model, ids), only_a, atol=1e-6, rtol=1e-6)
    pa.set_active(model, pa.Average("a", "b", weights=[3, 1]))
    assert pa.active(model).weights == (0.75, 0.25)


def test_average_of_loras_is_the_average_delta():
    """For linear adapters, averaging outputs equals one adapter with the averaged weight delta."""
    model = tiny_model("llama")
    ids = ids_for()
    pa.add_adapter(model, "a", rnd(pa.LoRAConfig(r=4)))
    pa.add_adapter(model, "b", rnd(pa.LoRAConfig(r=4)))
    pa.add_adapter(model, "half_a", pa.LoRAConfig(r=4))
    pa.add_adapter(model, "half_b", pa.LoRAConfig(r=4))
    with torch.no_grad():
        for src, dst in (("a", "half_a"), ("b", "half_b")):
            for (k, v), (_, w) in zip(
                model.paradapt[src].state_dict().items(),
                model.paradapt[dst].state_dict().items(),
                strict=True,
            ):
                w.copy_(v * (0.3 if src == "a" else 0.7) if k.endswith("up.weight") else v)
    pa.set_active(model, pa.Average("a", "b", weights=[0.3, 0.7]))
    avg = outputs(model, ids)
    pa.set_active(model, pa.Stack("half_a", "half_b"))
    torch.testing.assert_close(outputs(model, ids), avg, atol=1e-5, rtol=1e-5)


def test_average_over_prefixes_is_rejected():
    model = tiny_model("llama")
    for n in ("a", "b"):
        pa.add_adapter(model, n, pa.PrefixConfig(num_virtual_tokens=2, reparam=False))
    pa.set_active(model, pa.Average("a", "b"))
    with pytest.raises(pa.RoutingError, match="Stack"):
        outputs(model, ids_for())


def test_route_entries_may_be_compositions():
    model = tiny_model("bert")
    ids = ids_for(batch=3)
    pa.add_adapter(model, "a", rnd(pa.LoRAConfig(r=4)))
    pa.add_adapter(model, "b", rnd(pa.SeriesConfig(r=4)))
    rows = [pa.Stack("a", "b"), pa.Average("a", "b"), None]
    with pa.route(model, rows):
        mixed = outputs(model, ids)
    for i, comp in enumerate(rows):
        pa.set_active(model, comp)
        torch.testing.assert_close(mixed[i], outputs(model, ids[i : i + 1])[0], atol=1e-5, rtol=1e-5)


def test_route_overrides_active_and_restores_it():
    model = tiny_model("llama")
    ids = ids_for()
    pa.add_adapter(model, "a", rnd(pa.ParallelConfig(r=4)))
    base = outputs(model, ids)
    pa.set_active(model, "a")
    with_a = outputs(model, ids)
    with pa.route(model, [None, None]):
        torch.testing.assert_close(outputs(model, ids), base)
    assert torch.equal(outputs(model, ids), with_a)


def test_routes_are_isolated_per_thread():
    model = tiny_model("llama")
    ids = ids_for()
    pa.add_adapter(model, "a", rnd(pa.ParallelConfig(r=4)))
    base = outputs(model, ids)
    seen = {}
    ready, done = threading.Event(), threading.Event()

    def other():
        ready.wait()
        with torch.no_grad():
            seen["other"] = outputs(model, ids)
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with pa.route(model, ["a", "a"]):
        ready.set()
        done.wait()
    t.join()
    assert torch.equal(seen["other"], base)


def test_requires_grad_policy():
    model = tiny_model("llama")
    pa.add_adapter(model, "a", pa.LoRAConfig(r=4))
    base_params = [p for n, p in model.named_parameters() if not n.startswith("paradapt.")]
    assert not any(p.requires_grad for p in base_params)
    assert all(p.requires_grad for p in model.paradapt["a"].parameters())
    pa.add_adapter(model, "b", pa.ParallelConfig(r=4), trainable=False)
    assert not any(p.requires_grad for p in model.paradapt["b"].parameters())
    for comp in ("a", "b", pa.Stack("a", "b"), None):  # activation never changes trainability
        pa.set_active(model, comp)
        assert all(p.requires_grad for p in model.paradapt["a"].parameters())
        assert not any(p.requires_grad for p in model.paradapt["b"].parameters())
    pa.set_trainable(model, "b")
    assert all(p.requires_grad for p in model.paradapt["b"].parameters())
    pa.unwrap(model)
    assert all(p.requires_grad for p in model.parameters())  # unwrap gives the original flags back


def test_trainable_parameters_counts():
    model = tiny_model("llama")  # hidden 32, 2 layers
    pa.add_adapter(model, "par", pa.ParallelConfig(r=8))
    pa.add_adapter(model, "lora", pa.LoRAConfig(r=4))  # q: 32->32, v: 32->16
    count = pa.trainable_parameters(model)
    assert count.per_adapter["par"] == 2 * (32 * 8 + 8 + 8 * 32 + 32)
    assert count.per_adapter["lora"] == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    assert count.base == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("paradapt."))
    assert count.trainable == count.adapters
    assert "par" in str(count) and "% of base" in str(count)


def test_remove_adapter_keeps_others_and_clears_active():
    model = tiny_model("llama")
    ids = ids_for()
    pa.add_adapter(model, "a", rnd(pa.ParallelConfig(r=4)))
    pa.add_adapter(model, "b", rnd(pa.LoRAConfig(r=4)))
    pa.set_active(model, "b")
    want_b = outputs(model, ids)
    pa.set_active(model, "a")
    pa.remove_adapter(model, "a")
    assert pa.active(model) is None
    assert pa.list_adapters(model) == ["b"]
    assert not any(k.startswith("paradapt.a.") for k in model.state_dict())
    pa.set_active(model, "b")
    assert torch.equal(outputs(model, ids), want_b)


def test_merged_adapter_blocks_routing_until_unmerged():
    model = tiny_model("llama")
    pa.add_adapter(model, "a", rnd(pa.LoRAConfig(r=4)))
    pa.add_adapter(model, "b", rnd(pa.LoRAConfig(r=4)))
    pa.merge(model, "a")
    with pytest.raises(pa.RoutingError, match="merged"):
        with pa.route(model, ["b", None]):
            pass
    with pytest.raises(pa.MergeError, match="already merged"):
        pa.merge(model, "a")
    pa.unmerge(model, "a")
    with pa.route(model, ["b", None]):
        outputs(model, ids_for())


def test_parallel_is_forward_only():
    model = tiny_model("llama")
    pa.add_adapter(model, "a", rnd(pa.LoRAConfig(r=4)))
    pa.set_active(model, pa.Parallel("a", None))
    with pytest.raises(pa.RoutingError, match="route"):
        model.generate(ids_for(batch=1), max_new_tokens=3, do_sample=False)


def test_concurrent_forwards_in_threads_do_not_mix():
    """Each site stashes its entry input per thread; two threads routing at once stay correct."""
    model = tiny_model("llama")
    pa.add_adapter(model, "a", rnd(pa.ParallelConfig(r=8)))
    batches = [torch.randint(1, 96, (4, 16), generator=torch.Generator().manual_seed(k)) for k in (0, 1)]
    with torch.no_grad(), pa.route(model, "a"):
        want = [outputs(model, x) for x in batches]
    bad = []

    def work(k):
        for _ in range(40):
            try:
                with torch.no_grad(), pa.route(model, "a"):
                    if not torch.allclose(outputs(model, batches[k]), want[k], atol=1e-6):
                        bad.append(k)
            except Exception as e:  # a mixed-up stash shows as a RoutingError
                bad.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []


def test_fold_keeps_trainability():
    model = tiny_model("llama")
    pa.add_adapter(model, "p", pa.PrefixConfig(num_virtual_tokens=3, reparam_hidden=8))
    pa.fold(model, "p")
    assert pa.trainable_parameters(model).trainable == 2 * 2 * 3 * 16  # layers x (k, v) x tokens x kv width
    pa.add_adapter(model, "q", pa.PrefixConfig(num_virtual_tokens=3, reparam_hidden=8), trainable=False)
    pa.fold(model, "q")
    assert not any(p.requires_grad for p in model.paradapt["q"].parameters())


def test_out_of_range_layers_name_the_field():
    with pytest.raises(pa.ConfigError, match="layers: \\[5\\] out of range"):
        pa.add_adapter(tiny_model("llama"), "x", pa.LoRAConfig(layers=[5]))
    with pytest.raises(pa.ConfigError, match="layers: \\[-3\\] out of range"):
        pa.add_adapter(tiny_model("llama"), "x", pa.LoRAConfig(layers=[-3]))
    with pytest.raises(pa.ConfigError, match="layers: must be a list of layer indices"):
        pa.LoRAConfig(layers=[True])


def test_negative_layers_count_from_the_top(tmp_path):
    """``layers=[-1]`` is the top layer of a model of any depth, and stays so after save/load."""
    model = tiny_model("llama")
    pa.add_adapter(model, "top", pa.ParallelConfig(r=4, layers=[-1], init="random"))
    pa.add_adapter(model, "one", pa.ParallelConfig(r=4, layers=[1], init="random"))
    top, one = (sorted(k for k, _ in model.paradapt[n].named_parameters()) for n in ("top", "one"))
    assert top == one and all("/layers/1/" in k for k in top), top
    pa.save_adapter(model, "top", tmp_path / "top")
    assert pa.io.read_config(tmp_path / "top")["config"]["layers"] == [1]  # written resolved
    other = tiny_model("llama")
    pa.load_adapter(other, tmp_path / "top", name="top")
    assert sorted(k for k, _ in other.paradapt["top"].named_parameters()) == top
