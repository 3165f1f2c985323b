"""The banks' C++ ``kernel`` strategy (csrc/bgmv.cpp): each row's product through its own slot,
equal to the reference, bit-identical whatever else is in the batch and however many threads run."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import paradapt as pa
from paradapt import kernels, native


@pytest.fixture(scope="module")
def ext():
    """The built extension: a machine with a C++ compiler and ninja (CI's) must build it."""
    why = kernels.enable_native()
    assert why is None, f"the adapter kernel did not build: {why}"
    return native.BGMV.load()


def bank(dtype, slots=5, d_in=24, r=4, d_out=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    wd = torch.randn(slots, d_in, r, generator=g).to(dtype)
    wu = torch.randn(slots, r, d_out, generator=g).to(dtype)
    return wd, wu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3])
def test_each_row_equals_its_slots_product_alone_and_in_any_batch(ext, dtype, tokens):
    wd, wu = bank(dtype)
    x = torch.randn(7, tokens, 24, generator=torch.Generator().manual_seed(1)).to(dtype)
    slot = torch.tensor([3, 0, 0, 4, 1, 3, 2])
    a = ext.shrink(x, wd, slot)
    y = ext.expand(a, wu, slot)
    assert a.dtype == y.dtype == dtype and y.shape == (7, tokens, 40)
    ref = torch.bmm(torch.bmm(x.double(), wd.double()[slot]), wu.double()[slot])
    tol = {torch.float64: 1e-12, torch.float32: 1e-4}.get(dtype, 5e-2)
    torch.testing.assert_close(y.double(), ref, atol=tol * ref.abs().max().item(), rtol=0)
    for i in range(7):  # alone, and in a batch of different rows, the same bits
        alone = ext.expand(ext.shrink(x[i : i + 1], wd, slot[i : i + 1]), wu, slot[i : i + 1])
        assert torch.equal(alone[0], y[i])
    perm = torch.tensor([6, 2, 4, 0, 1, 5, 3])
    assert torch.equal(ext.expand(ext.shrink(x[perm], wd, slot[perm]), wu, slot[perm]), y[perm])


def test_threads_do_not_change_the_bits(ext):
    wd, wu = bank(torch.float32, d_in=512, r=16, d_out=512)
    x = torch.randn(64, 1, 512)
    slot = torch.randint(0, 5, (64,))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.expand(ext.shrink(x, wd, slot), wu, slot)
        torch.set_num_threads(2)
        two = ext.expand(ext.shrink(x, wd, slot), wu, slot)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_bad_arguments_are_refused_not_read_out_of_bounds(ext):
    wd, wu = bank(torch.float32)
    x = torch.randn(2, 1, 24)
    with pytest.raises(RuntimeError, match="slot 5 outside a bank of 5"):
        ext.shrink(x, wd, torch.tensor([0, 5]))
    with pytest.raises(RuntimeError, match="slot -1 outside"):
        ext.expand(torch.randn(2, 1, 4), wu, torch.tensor([-1, 0]))
    with pytest.raises(RuntimeError, match="2 slots for 3 rows"):
        ext.shrink(torch.randn(3, 1, 24), wd, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="input width 23 != weight rows 24"):
        ext.shrink(torch.randn(2, 1, 23), wd, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="share a dtype"):
        ext.shrink(x.double(), wd, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="int64"):
        ext.shrink(x, wd, torch.tensor([0, 1], dtype=torch.int32))


def _two_calls(ext, h, x, wd, wu, slot, scale, bd, bu, relu):
    """lora_add's result the unfused way: shrink, bias, activation, scale, expand, bias as
    separate calls and tensor ops on the rows with a slot, then h + delta."""
    rows = slot >= 0
    s = slot[rows]
    a = ext.shrink(x[rows], wd, s)
    if bd is not None:
        a = a + bd.index_select(0, s)[:, None, :]
    if relu:
        a = torch.relu(a)
    d = ext.expand(a * scale.index_select(0, s)[:, None, None], wu, s)
    if bu is not None:
        d = d + bu.index_select(0, s)[:, None, :]
    out = h.clone()
    out[rows] = h[rows] + d
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("relu,biases", [(False, False), (True, True), (True, False)])
def test_the_fused_add_equals_the_two_calls_to_the_bit_and_leaves_rows_of_no_slot_as_they_were(
    ext, dtype, relu, biases
):
    wd, wu = bank(dtype)
    g = torch.Generator().manual_seed(2)
    scale = torch.rand(5, generator=g).to(dtype)
    bd = torch.randn(5, 4, generator=g).to(dtype) if biases else None
    bu = torch.randn(5, 40, generator=g).to(dtype) if biases else None
    x = torch.randn(7, 3, 24, generator=g).to(dtype)
    h = torch.randn(7, 3, 40, generator=g).to(dtype)
    slot = torch.tensor([3, -1, 0, 4, 3, -1, 1])
    out = ext.lora_add(h, x, wd, wu, slot, scale, bd, bu, relu)
    assert torch.equal(out, _two_calls(ext, h, x, wd, wu, slot, scale, bd, bu, relu))
    assert torch.equal(out[slot < 0], h[slot < 0]) and out.data_ptr() != h.data_ptr()  # h is not written
    for i in range(7):  # a row alone: the same bits
        alone = ext.lora_add(h[i : i + 1], x[i : i + 1], wd, wu, slot[i : i + 1], scale, bd, bu, relu)
        assert torch.equal(alone[0], out[i])


def test_the_fused_add_refuses_what_it_cannot_read(ext):
    wd, wu = bank(torch.float32)
    x, h, scale = torch.randn(2, 1, 24), torch.randn(2, 1, 40), torch.ones(5)
    with pytest.raises(RuntimeError, match="slot -2 outside a bank of 5"):
        ext.lora_add(h, x, wd, wu, torch.tensor([0, -2]), scale)
    with pytest.raises(RuntimeError, match="slot 5 outside"):
        ext.lora_add(h, x, wd, wu, torch.tensor([0, 5]), scale)
    with pytest.raises(RuntimeError, match="h must be"):
        ext.lora_add(torch.randn(2, 1, 39), x, wd, wu, torch.tensor([0, 1]), scale)
    with pytest.raises(RuntimeError, match="scale has 4 values for 5 slots"):
        ext.lora_add(h, x, wd, wu, torch.tensor([0, 1]), torch.ones(4))
    with pytest.raises(RuntimeError, match="bu has 40 values for 5 slots of 40"):
        ext.lora_add(h, x, wd, wu, torch.tensor([0, 1]), scale, None, torch.ones(40))
    with pytest.raises(RuntimeError, match="wu must be"):
        ext.lora_add(h, x, wd, wu[:, :3], torch.tensor([0, 1]), scale)


@pytest.mark.parametrize("kind", ["lora", "parallel"])
def test_a_mixed_batch_through_the_fused_add_equals_the_unfused_kernel_path(ext, kind, monkeypatch):
    # rows of three adapters and of the base model, unsorted: the fused call reads each row's slot
    # in place; the unfused path sorts the rows, runs shrink and expand, and scatters back
    from paradapt.banks import Bank

    torch.manual_seed(0)
    model = tiny_model("llama")
    config = pa.LoRAConfig(r=4, init="random") if kind == "lora" else pa.ParallelConfig(r=8, init="random")
    for name in ("a", "b", "c"):
        pa.add_adapter(model, name, config)
    x = torch.randint(0, 96, (6, 5))
    rows = ["b", None, "a", "c", "b", None]
    calls = []
    fused = Bank.add_fused

    def counted(self, *args):
        out = fused(self, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(Bank, "add_fused", counted)
    with kernels.force("kernel"), torch.no_grad(), pa.route(model, rows):
        got = model(x).logits
    assert calls and all(calls)  # every bank went through the fused call
    monkeypatch.setattr(Bank, "add_fused", lambda self, *args: None)
    with kernels.force("kernel"), torch.no_grad(), pa.route(model, rows):
        ref = model(x).logits
    assert torch.equal(got, ref)


def test_banks_measure_the_kernel_once_it_is_loaded(ext):
    kernels.reset()
    model = tiny_model("llama")
    pa.add_adapter(model, "a", pa.LoRAConfig(r=4, init="random"))
    pa.add_adapter(model, "b", pa.LoRAConfig(r=4, init="random"))
    with torch.no_grad(), pa.route(model, ["a", "b", "a"]):
        model(torch.randint(0, 96, (3, 5)))
    assert kernels.timings() and all("kernel" in t for t in kernels.timings().values())


def test_a_failed_build_is_reported_once_and_not_retried(monkeypatch):
    monkeypatch.setattr(kernels, "_native_error", [])
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(native.BGMV, "load", broken)
    assert kernels.enable_native() == "RuntimeError: no C++ compiler"
    assert kernels.enable_native() == "RuntimeError: no C++ compiler" and len(calls) == 1


def test_the_choice_takes_each_strategys_fastest_call_timed_in_rounds(monkeypatch):
    """Each strategy is warmed up once, then timed in rounds over all of them; its fastest call
    counts, so one noisy call does not decide (here ``segments``' first timed call is slow)."""
    kernels.reset()
    order, clock = [], [0.0]
    cost = {"segments": [5.0, 1.0, 1.0], "gather": [2.0, 2.0, 2.0]}
    assert kernels.TIMED_ROUNDS == 3

    def make(name):
        def fn():
            order.append(name)
            if len(order) > 2:  # the warm-ups take no time
                clock[0] += cost[name].pop(0)
            return torch.tensor(float(len(name)))

        return fn

    monkeypatch.setattr(kernels.time, "perf_counter", lambda: clock[0])
    try:
        out = kernels.run(("shape",), torch.device("cpu"), lambda: ("segments", "gather"), make)
        assert order == ["segments", "gather"] * (1 + kernels.TIMED_ROUNDS)
        assert kernels.choices()[("shape",)] == "segments"
        assert kernels.timings()[("shape",)] == {"segments": 1.0, "gather": 2.0}
        assert out.item() == len("segments")  # the chosen strategy's own result
        order.clear()
        kernels.run(("shape",), torch.device("cpu"), lambda: ("segments", "gather"), make)
        assert order == ["segments"]  # measured once: later calls run only the pick
    finally:
        kernels.reset()
