"""The linear layers' few-rows product in serving steps (``paradapt.serve.layer_gemm``): the C++
kernel gives F.linear's results, a row's bits do not depend on its batch or the threads, it runs
only inside a step and only where it may, and the engine's invariants hold with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from test_serve_engine import BUSY, adapter_root, alone, workload

import paradapt as pa
from paradapt.errors import ConfigError
from paradapt.serve import layer_gemm
from paradapt.serve.engine import Engine, EngineConfig
from paradapt.serve.layer_gemm import LayerProduct
from paradapt.serve.sampling import SamplingParams

pytestmark = pytest.mark.skipif(
    layer_gemm.unsupported() is not None, reason=f"the kernel needs AVX2: {layer_gemm.unsupported()}"
)


@pytest.fixture(scope="module")
def ext():
    """The built extension: a machine with AVX2, a C++ compiler and ninja (CI's) must build it."""
    return layer_gemm.load()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 13, 33])
@pytest.mark.parametrize(("out", "inp"), [(64, 64), (11, 37), (96, 8), (5, 200), (1, 3)])
def test_kernel_equals_f_linear(ext, rows, out, inp):
    g = torch.Generator().manual_seed(rows * 1000 + out + inp)
    x, w, b = (
        torch.randn(rows, inp, generator=g),
        torch.randn(out, inp, generator=g),
        torch.randn(out, generator=g),
    )
    torch.testing.assert_close(ext.few_rows_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ext.few_rows_linear(x, w, None), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_leading_dims_non_contiguous_inputs_and_empty_shapes(ext):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g)
    x = torch.randn(2, 3, 40, generator=g)
    assert ext.few_rows_linear(x, w, None).shape == (2, 3, 24)
    torch.testing.assert_close(ext.few_rows_linear(x, w, None), F.linear(x, w), rtol=1e-5, atol=1e-5)
    xt = torch.randn(40, 6, generator=g).t()  # not contiguous
    torch.testing.assert_close(ext.few_rows_linear(xt, w, None), F.linear(xt, w), rtol=1e-5, atol=1e-5)
    assert ext.few_rows_linear(torch.randn(0, 40), w, None).shape == (0, 24)
    b = torch.randn(24, generator=g)
    assert torch.equal(ext.few_rows_linear(torch.randn(3, 0), torch.randn(24, 0), b), b.expand(3, 24))


def test_a_row_gives_the_same_bits_alone_in_any_batch_and_at_any_thread_count(ext):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(50, 77, generator=g), torch.randn(50, generator=g)
    x = torch.randn(19, 77, generator=g)
    full = ext.few_rows_linear(x, w, b)
    for start, n in ((0, 1), (3, 2), (5, 3), (9, 4), (2, 7), (10, 9)):
        assert torch.equal(ext.few_rows_linear(x[start : start + n], w, b), full[start : start + n])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(ext.few_rows_linear(x, w, b), full)
    finally:
        torch.set_num_threads(threads)


def test_bad_arguments_are_refused_by_name(ext):
    w = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="float32"):
        ext.few_rows_linear(torch.randn(2, 8, dtype=torch.float64), w, None)
    with pytest.raises(RuntimeError, match="last dimension is 7"):
        ext.few_rows_linear(torch.randn(2, 7), w, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.few_rows_linear(torch.randn(2, 4), torch.randn(4, 8).t(), None)
    with pytest.raises(RuntimeError, match="bias"):
        ext.few_rows_linear(torch.randn(2, 8), w, torch.randn(5))


def test_installed_only_inside_a_step_and_only_for_few_rows_without_a_gradient(ext, monkeypatch):
    model = tiny_model("llama")
    lp = LayerProduct("kernel")
    lp.prepare(model)
    mods = layer_gemm.layers(model)
    head = model.get_output_embeddings()
    assert mods and head not in mods and lp.used == f"kernel up to {layer_gemm.KERNEL_ROWS} rows"
    calls = []
    real = lp._ext.few_rows_linear
    monkeypatch.setattr(
        lp,
        "_ext",
        type("E", (), {"few_rows_linear": staticmethod(lambda *a: calls.append(a[0].shape) or real(*a))}),
    )
    layer = mods[0]
    few = torch.randn(1, 3, layer.in_features)
    many = torch.randn(layer_gemm.KERNEL_ROWS + 1, layer.in_features)
    with torch.no_grad():
        want = F.linear(few, layer.weight, layer.bias)
        with lp.active():
            assert all("forward" in m.__dict__ for m in mods) and "forward" not in head.__dict__
            got = layer(few)
            layer(many)  # too many rows: F.linear
        assert not any("forward" in m.__dict__ for m in mods)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="boom"), lp.active():
            raise RuntimeError("boom")
        assert not any("forward" in m.__dict__ for m in mods)  # restored on an error too
    with lp.active():  # a gradient: F.linear (the kernel has no backward)
        y = layer(torch.randn(2, layer.in_features, requires_grad=True))
    assert y.requires_grad
    assert calls == [few.shape]


def test_runs_from_the_winners_at_each_candidate_row_count():
    u = layer_gemm.UNBOUNDED
    assert layer_gemm.runs([(1, "linear"), (4, "linear")]) == ()
    assert layer_gemm.runs([(1, "kernel"), (4, "kernel"), (8, "linear")]) == ((1, 4, "kernel"),)
    # a candidate's winner takes the counts above the previous candidate; the last, every larger one
    assert layer_gemm.runs([(1, "linear"), (2, "kernel"), (8, "packed"), (16, "packed")]) == (
        (2, 2, "kernel"),
        (3, u, "packed"),
    )
    assert layer_gemm.runs([(1, "packed"), (4, "linear"), (8, "packed")]) == (
        (1, 1, "packed"),
        (5, u, "packed"),
    )


def test_modes_and_auto_decisions(monkeypatch):
    with pytest.raises(ConfigError, match="layer_gemm"):
        LayerProduct("fast")
    with pytest.raises(ConfigError, match="layer_gemm"):
        EngineConfig(layer_gemm="fast")
    model = tiny_model("llama")
    off = LayerProduct("linear")
    off.prepare(model)
    assert off.used == "linear" and off.reason == "layer_gemm=linear"
    small = LayerProduct("auto")  # a tiny model is not measured
    small.prepare(model)
    assert small.used == "linear" and "under 8 MB" in small.reason and not small._packed
    monkeypatch.setattr(layer_gemm, "LEAST_BYTES", 0)
    monkeypatch.setattr(layer_gemm, "_MEASURED", {})  # nothing measured in this process yet
    shapes = {tuple(m.weight.shape) for m in layer_gemm.layers(model)}
    smallest, largest = min(shapes), max(shapes)
    swept = []

    def fake_sweep(chosen, xs, product):
        """F.linear takes 1 s per shape; the kernel 0.5 s, except on the smallest shape from 8
        rows and on the largest at 1 row; packed 0.6 s, 0.4 s from 12 rows on the largest shape."""
        rows = next(iter(xs.values())).shape[0]
        swept.append(rows)
        if product is F.linear:
            return dict.fromkeys((tuple(m.weight.shape) for m in chosen), 1.0)
        calls = []  # packed or the kernel: the one that calls packed_linear is packed
        real = layer_gemm.packed_linear
        monkeypatch.setattr(layer_gemm, "packed_linear", lambda *a: calls.append(1) or real(*a))
        try:
            product(torch.zeros(rows, chosen[0].in_features), chosen[0].weight)
        finally:
            monkeypatch.setattr(layer_gemm, "packed_linear", real)
        packed = bool(calls)

        def spent(s):
            if packed:
                return 0.4 if s == largest and rows >= 12 else 0.6
            loses = (s == smallest and rows >= 8) or (s == largest and rows == 1)
            return 1.0 if loses else 0.5

        return {tuple(m.weight.shape): spent(tuple(m.weight.shape)) for m in chosen}

    monkeypatch.setattr(layer_gemm, "sweep", fake_sweep)
    monkeypatch.setattr(layer_gemm, "CANDIDATE_ROWS", (1, 2, 4, 8, 12))
    u = layer_gemm.UNBOUNDED
    one = LayerProduct("auto")
    one.prepare(model)
    assert one.plan[smallest] == ((1, 4, "kernel"), (5, u, "packed"))  # the kernel lost at 8 rows
    assert one.plan[largest] == ((1, 1, "packed"), (2, 8, "kernel"), (9, u, "packed"))
    assert all(one.plan[s] == ((1, 12, "kernel"),) for s in shapes - {smallest, largest})
    assert one.row_range[smallest] == (1, 4) and one.row_range[largest] == (2, 8)
    assert one.used.startswith("kernel up to 12 rows, packed from 1 rows (a ") and one.rows == 12
    assert one.used.endswith(f"{one.packed_bytes / 1e6:.3g} MB copy)")
    assert sorted(set(swept)) == [1, 2, 4, 8, 12]
    # packed copies only of the layers whose shape uses them
    assert {tuple(m.weight.shape) for m in one._packed} == {smallest, largest}
    assert one.packed_bytes == sum(m.weight.numel() * 4 for m in one._packed)
    layer = next(m for m in layer_gemm.layers(model) if tuple(m.weight.shape) == largest)
    calls = []
    monkeypatch.setattr(
        one, "_ext", type("Ext", (), {"few_rows_linear": lambda *a: calls.append("kernel") or F.linear(*a)})
    )
    real = layer_gemm.packed_linear
    monkeypatch.setattr(layer_gemm, "packed_linear", lambda *a: calls.append("packed") or real(*a))
    one._forwards = [(layer, one._forward_of(layer, one.plan[largest]))]
    with one.active(), torch.no_grad():
        for rows in (1, 2, 8, 9, 100):
            want = F.linear(torch.ones(rows, layer.in_features), layer.weight, layer.bias)
            torch.testing.assert_close(layer(torch.ones(rows, layer.in_features)), want, rtol=1e-5, atol=1e-5)
    assert calls == ["packed", "kernel", "kernel", "packed", "packed"]
    again = LayerProduct("auto")  # a second engine of the process: the same choice, not measured again
    monkeypatch.setattr(layer_gemm, "sweep", lambda *a: pytest.fail("measured twice"))
    again.prepare(model)
    assert again.plan == one.plan and again.rows == 12
    never = LayerProduct("auto")
    monkeypatch.setattr(layer_gemm, "_MEASURED", {})
    monkeypatch.setattr(layer_gemm, "sweep", lambda chosen, xs, product: dict.fromkeys(shapes, 1.0))
    never.prepare(model)
    assert never.used == "linear" and not never._packed
    assert never.reason == "neither kernel nor packed was faster than F.linear on this machine"
    monkeypatch.setattr(layer_gemm, "unpackable", lambda: "this torch has no oneDNN")
    monkeypatch.setattr(layer_gemm, "_MEASURED", {})
    kernel_only = LayerProduct("auto")  # one product left, and it loses: said so in one clause
    kernel_only.prepare(model)
    assert kernel_only.reason == "kernel was not faster than F.linear on this machine"
    monkeypatch.setattr(layer_gemm, "unsupported", lambda: "the CPU offers DEFAULT, the kernel needs AVX2")
    with pytest.raises(ConfigError, match="cannot use the kernel: the CPU offers DEFAULT"):
        LayerProduct("kernel").prepare(model)
    monkeypatch.setattr(layer_gemm, "unpackable", lambda: "this torch has no oneDNN")
    with pytest.raises(ConfigError, match="cannot pack the layers: this torch has no oneDNN"):
        LayerProduct("packed").prepare(model)
    fallback = LayerProduct("auto")
    fallback.prepare(model)
    assert fallback.used == "linear" and "AVX2" in fallback.reason and "oneDNN" in fallback.reason


def test_auto_times_the_models_own_layers_in_order_up_to_the_sweep_bytes(monkeypatch):
    model = tiny_model("llama")
    found = layer_gemm.layers(model)
    shapes = {tuple(m.weight.shape) for m in found}
    assert layer_gemm.sweep_layers(found) == found  # a tiny model: all of it
    first = found[0].weight.numel() * 4
    monkeypatch.setattr(layer_gemm, "SWEEP_BYTES", first)  # room for one layer: then one of each shape
    chosen = layer_gemm.sweep_layers(found)
    assert chosen[0] is found[0] and len(chosen) == len(shapes) < len(found)
    assert {tuple(m.weight.shape) for m in chosen} == shapes
    xs = {k: torch.randn(3, k) for k in {m.in_features for m in found}}
    calls = []
    spent = layer_gemm.sweep(found, xs, lambda x, w: calls.append((x.shape[1], tuple(w.shape))))
    assert calls == [(m.in_features, tuple(m.weight.shape)) for m in found]
    assert set(spent) == shapes and all(t > 0 for t in spent.values())
    # the real measurement, end to end: every shape gets runs of the products this machine has
    monkeypatch.setattr(layer_gemm, "LEAST_BYTES", 0)
    monkeypatch.setattr(layer_gemm, "_MEASURED", {})
    monkeypatch.setattr(layer_gemm, "CANDIDATE_ROWS", (1, 4, 200))
    monkeypatch.setattr(layer_gemm, "ONE_LAYER_ROWS", 200)
    lp = LayerProduct("auto")
    lp.prepare(model)
    products = ("kernel", "packed")
    assert set(layer_gemm._MEASURED) == {(s, torch.get_num_threads(), products) for s in shapes}
    for plan in layer_gemm._MEASURED.values():
        for lo, hi, product in plan:
            assert product in products and 1 <= lo <= hi and (product != "kernel" or hi <= 4)


def test_packed_product_equals_f_linear_and_follows_an_edited_weight():
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    packed = layer_gemm.pack(w)
    for x in (
        torch.randn(1, 40, generator=g),
        torch.randn(2, 3, 40, generator=g),
        torch.randn(40, 6, generator=g).t(),
    ):
        torch.testing.assert_close(
            layer_gemm.packed_linear(x, packed, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            layer_gemm.packed_linear(x, packed, None), F.linear(x, w), rtol=1e-5, atol=1e-5
        )
    model = tiny_model("llama")
    lp = LayerProduct("packed")
    lp.prepare(model)
    mods = layer_gemm.layers(model)
    assert lp.used.startswith("packed from 1 rows (a ") and set(lp._packed) == set(mods)
    assert lp.packed_bytes == sum(m.weight.numel() * 4 for m in mods)
    layer = mods[0]
    x = torch.randn(5, layer.in_features, generator=g)
    with torch.no_grad():
        with lp.active():
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
            layer.weight.mul_(2.0)  # edited in place between steps (a new _version): packed again
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
            assert layer(torch.randn(0, layer.in_features)).shape == (0, layer.out_features)
        assert not any("forward" in m.__dict__ for m in mods)
    with lp.active():  # a gradient: F.linear (the packed product has no backward)
        xg = torch.randn(2, layer.in_features, requires_grad=True)
        layer(xg).sum().backward()
    assert xg.grad is not None


@pytest.mark.parametrize("mode", ["kernel", "packed"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_busy_mixed_batch_with_the_kernel_or_packed_weights_equals_each_request_alone(tmp_path, family, mode):
    ref_model = adapter_root(tmp_path, family)
    reqs = workload(seed=5)
    ref = [alone(ref_model, p, n, a) for p, a, n in reqs]
    engine = Engine(tiny_model(family), tmp_path, EngineConfig(**{**BUSY.__dict__, "layer_gemm": mode}))
    want = f"kernel up to {layer_gemm.KERNEL_ROWS} rows" if mode == "kernel" else "packed from 1 rows (a "
    assert engine.layer_gemm.startswith(want)
    handles = [engine.add_request(p, a, SamplingParams(max_new_tokens=n)) for p, a, n in reqs]
    engine.run()
    assert [h.tokens for h in handles] == ref
    assert not any("forward" in m.__dict__ for m in layer_gemm.layers(engine.model))
    assert sorted(pa.list_adapters(engine.model)) == sorted(engine.cache.on_device)


@pytest.mark.parametrize(
    ("rows", "inp", "head", "passes"),
    [
        (3, 512, 512, 1),
        (3, 512, 512, 2),
        (3, 512, 512, 8),
        (3, 1344, 1344, 16),
        (2, 64, 64, 5),
        (1, 8, 8, 3),
        (8, 1344, 128, 1),
        (8, 576, 128, 3),
        (5, 512, 512, 2),
        (3, 100, 100, 4),
    ],
)
def test_the_passes_ask_for_every_line_of_the_next_block_once_within_their_steps(
    ext, rows, inp, head, passes
):
    """The prefetching covers the next block (each row's first ``head`` floats, 64-byte lines),
    every line once, in order, split over the passes, each pass done within its own 8-float
    steps (a -1 would mark one that was not): a slip here costs speed, never bits."""
    plan = ext.prefetch_plan(rows, inp, head, passes)
    assert plan == [r * inp + k for r in range(rows) for k in range(0, min(head, inp), 16)]
