"""Many adapters on one model, checked deterministically (no wall-clock thresholds).

- After the first ``pa.add_adapter``, adding (and removing) adapters never walks the
  model: the model's ``named_modules`` / ``modules`` (and the other tree walks) are
  patched to raise, and 50 more adapters of several kinds still go on and come off.
  Each site keeps one set of hooks however many adapters share it.
- 300 adapters on a tiny model all route correctly in one mixed batch.

benchmarks/add_scaling.py measures the wall time per add.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from conftest import outputs, tiny_model

import paradapt as pa

# a name that is a module-tree walk on nn.Module
WALKS = (
    "named_modules",
    "modules",
    "named_children",
    "children",
    "named_parameters",
    "parameters",
    "named_buffers",
    "buffers",
    "state_dict",
    "apply",
)

KINDS = [
    lambda: pa.LoRAConfig(r=2),
    lambda: pa.ParallelConfig(r=4),
    lambda: pa.SeriesConfig(r=2),
    lambda: pa.IA3Config(),
    lambda: pa.SSFConfig(),
    lambda: pa.LoRAConfig(r=2, targets="all-linear"),
    lambda: pa.PrefixConfig(num_virtual_tokens=2, gated=True, reparam_hidden=8),
    lambda: pa.PrefixConfig(num_virtual_tokens=2, reparam=False),
    lambda: pa.MAMConfig(num_virtual_tokens=2, r=4, reparam_hidden=8),
    lambda: pa.ParallelConfig(r=4, location="both", layers=[1]),
]


def rnd(i: int):
    return dataclasses.replace(KINDS[i % len(KINDS)](), init="random")


def ids_for(batch, seq=5, seed=1):
    return torch.randint(1, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _forbid_walks(monkeypatch, module, label):
    def make(meth):
        def raiser(*args, **kwargs):
            raise AssertionError(f"{label}.{meth}() was called while adding/removing an adapter")

        return raiser

    for meth in WALKS:
        monkeypatch.setattr(module, meth, make(meth))


def hook_counts(model):
    return {
        n: (len(m._forward_pre_hooks), len(m._forward_hooks))
        for n, m in model.named_modules()
        if not n.startswith("paradapt")
    }


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_adding_adapters_does_not_walk_the_model(monkeypatch, family):
    model = tiny_model(family)
    ids = ids_for(3)
    pa.add_adapter(model, "first", rnd(0))
    # one adapter of every kind, so every site exists before the walks are forbidden
    for i in range(len(KINDS)):
        pa.add_adapter(model, f"warm{i}", rnd(i))
    hooks_before = hook_counts(model)
    backbone = getattr(model, model.base_model_prefix, model)
    with monkeypatch.context() as mp:
        # the model itself, its backbone and the adapter container may not be walked
        _forbid_walks(mp, model, "model")
        if backbone is not model:
            _forbid_walks(mp, backbone, "backbone")
        _forbid_walks(mp, model.paradapt, "model.paradapt")
        with pytest.raises(AssertionError, match="was called"):
            model.named_modules()
        for i in range(50):
            pa.add_adapter(model, f"a{i}", rnd(i))
        for i in range(0, 50, 3):
            pa.remove_adapter(model, f"a{i}")
        for i in range(0, 50, 6):  # names freed by removal can be used again
            pa.add_adapter(model, f"a{i}", rnd(i + 1))
        names = pa.list_adapters(model)
        rows = ["a1", "a7", None]
        with pa.route(model, rows):
            batched = outputs(model, ids)
    assert len(names) == 1 + len(KINDS) + 50 - 17 + 9
    # sites are shared: no new hooks per adapter
    assert hook_counts(model) == hooks_before
    for i, name in enumerate(rows):
        pa.set_active(model, name)
        torch.testing.assert_close(batched[i], outputs(model, ids[i : i + 1])[0], atol=1e-5, rtol=1e-5)


def test_first_add_on_a_new_site_after_walks_are_forbidden(monkeypatch):
    """A later adapter may need sites no earlier adapter used; creating them is no walk either."""
    model = tiny_model("llama")
    pa.add_adapter(model, "first", rnd(0))  # LoRA on q/v only
    with monkeypatch.context() as mp:
        _forbid_walks(mp, model, "model")
        _forbid_walks(mp, model.model, "model.model")
        _forbid_walks(mp, model.paradapt, "model.paradapt")
        for i in range(1, len(KINDS)):
            pa.add_adapter(model, f"k{i}", rnd(i))
        for i in range(1, len(KINDS)):
            pa.remove_adapter(model, f"k{i}")
    assert pa.list_adapters(model) == ["first"]


def test_removing_all_but_one_adapter_unhooks_their_sites():
    model = tiny_model("llama")
    pa.add_adapter(model, "keep", rnd(0))
    only_first = hook_counts(model)
    for i in range(1, 40):
        pa.add_adapter(model, f"x{i}", rnd(i))
    for i in range(1, 40):
        pa.remove_adapter(model, f"x{i}")
    assert hook_counts(model) == only_first


def test_300_adapters_route_correctly_in_one_mixed_batch():
    model = tiny_model("llama")
    n = 300
    torch.manual_seed(0)
    names = [f"ad{i:03d}" for i in range(n)]
    for i, name in enumerate(names):
        pa.add_adapter(model, name, rnd(i))
    assert len(pa.list_adapters(model)) == n
    # every adapter once plus a few base rows and repeats, in a shuffled order
    rows = names + [None] * 4 + names[::37]
    random.Random(0).shuffle(rows)
    ids = ids_for(len(rows), seq=5, seed=2)
    base = outputs(model, ids)
    with pa.route(model, rows):
        batched = outputs(model, ids)
    for i, name in enumerate(rows):
        pa.set_active(model, name)
        alone = outputs(model, ids[i : i + 1])[0]
        torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-5, msg=f"row {i} ({name})")
        if name is None:
            assert torch.equal(batched[i], base[i])
        else:
            assert not torch.allclose(batched[i], base[i], atol=1e-4), f"row {i} ({name})"
    # a row routed to the wrong adapter would show: different adapters give different outputs
    same_ids = ids[:1].expand(n, -1)
    with pa.route(model, names):
        per_adapter = outputs(model, same_ids)
    flat = per_adapter.reshape(n, -1)
    dists = torch.cdist(flat, flat) + torch.eye(n) * 1e9
    assert dists.min() > 1e-3
