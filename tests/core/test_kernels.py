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
