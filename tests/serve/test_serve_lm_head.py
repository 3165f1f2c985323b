"""The LM head's product in serving steps (``paradapt.serve.lm_head``): the packed weight gives
F.linear's logits, only inside a step, follows in-place edits, and the engine's invariants hold."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from test_serve_engine import BUSY, adapter_root, alone, workload

import paradapt as pa
from paradapt.errors import ConfigError
from paradapt.serve.engine import Engine, EngineConfig
from paradapt.serve.lm_head import HeadProduct
from paradapt.serve.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def test_packed_product_equals_f_linear_and_only_inside_a_step():
    model = tiny_model("llama")
    head = model.get_output_embeddings()
    hp = HeadProduct("packed", rows=8)
    hp.prepare(model)
    assert hp.used == "packed from 1 rows" and hp.reason is None
    x = torch.randn(2, 5, head.in_features)
    want = F.linear(x, head.weight)
    with torch.no_grad():
        with hp.active():
            assert "forward" in head.__dict__  # the packed forward, for this block only
            got = head(x)
        assert "forward" not in head.__dict__
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="boom"), hp.active():
            raise RuntimeError("boom")
        assert "forward" not in head.__dict__  # restored on an error too


def test_a_weight_edited_in_place_is_packed_again():
    model = tiny_model("llama")
    head = model.get_output_embeddings()
    hp = HeadProduct("packed", rows=4)
    hp.prepare(model)
    x = torch.randn(3, head.in_features)
    with torch.no_grad():
        with hp.active():
            before = head(x)
        head.weight.mul_(2.0)  # an in-place edit: the packed copy is stale
        with hp.active():
            after = head(x)
    torch.testing.assert_close(after, 2.0 * before, rtol=1e-5, atol=1e-5)


def test_grad_mode_and_few_rows_take_f_linear():
    model = tiny_model("llama")
    head = model.get_output_embeddings()
    hp = HeadProduct("packed", rows=4)
    hp.prepare(model)
    hp.min_rows = 2  # as auto decides when one row is not faster packed
    calls = []
    real = hp._product
    hp._product = lambda x: calls.append(x.shape) or real(x)
    with torch.no_grad(), hp.active():
        head(torch.randn(1, head.in_features))
        head(torch.randn(2, head.in_features))
    with hp.active():  # a gradient: never the packed product (it has no backward)
        y = head(torch.randn(2, head.in_features, requires_grad=True))
    assert y.requires_grad
    assert calls == [torch.Size([2, head.in_features])]


def test_modes_and_heads_that_cannot_be_packed():
    with pytest.raises(ConfigError, match="lm_head_gemm"):
        HeadProduct("fast")
    with pytest.raises(ConfigError, match="lm_head_gemm"):
        EngineConfig(lm_head_gemm="fast")
    model = tiny_model("llama")
    hp = HeadProduct("linear")
    hp.prepare(model)
    assert hp.used == "linear" and hp.head is None
    model.set_output_embeddings(torch.nn.Identity())  # not a Linear: auto falls back, packed refuses
    auto = HeadProduct("auto")
    auto.prepare(model)
    assert auto.used == "linear" and "not a plain nn.Linear" in auto.reason
    with pytest.raises(ConfigError, match="cannot pack the LM head: the LM head is not a plain nn.Linear"):
        HeadProduct("packed").prepare(model)


def test_auto_keeps_the_copy_only_where_it_measured_faster(monkeypatch):
    import paradapt.serve.lm_head as lm_head

    model = tiny_model("llama")
    times = iter([1.0] * 6 + [1.0, 0.5] * 3)  # 1 row (timed first): not faster; 32 rows: faster
    monkeypatch.setattr(lm_head, "timed", lambda fn, least=0.002: next(times))
    monkeypatch.setattr(lm_head, "LEAST_BYTES", 0)
    hp = HeadProduct("auto", rows=32)
    hp.prepare(model)
    assert hp.min_rows == 2 and hp._packed is not None
    times = iter([1.0] * 12)  # never faster: no copy kept
    hp = HeadProduct("auto", rows=32)
    hp.prepare(model)
    assert hp.min_rows is None and hp._packed is None and hp.used == "linear"
    assert hp.reason == "packed was not faster on this machine"
    monkeypatch.undo()
    small = HeadProduct("auto")  # a small head is not measured (its weight stays in cache anyway)
    small.prepare(model)
    assert small.used == "linear" and small.reason == "the LM head is under 16 MB"


def test_busy_mixed_batch_with_the_packed_head_equals_each_request_alone(tmp_path):
    ref_model = adapter_root(tmp_path, "llama")
    reqs = workload(seed=3)
    ref = [alone(ref_model, p, n, a) for p, a, n in reqs]
    engine = Engine(
        tiny_model("llama"), tmp_path, EngineConfig(**{**BUSY.__dict__, "lm_head_gemm": "packed"})
    )
    assert engine.lm_head_gemm == "packed from 1 rows"
    handles = [engine.add_request(p, a, SamplingParams(max_new_tokens=n)) for p, a, n in reqs]
    engine.run()
    assert [h.tokens for h in handles] == ref
    assert "forward" not in engine.model.get_output_embeddings().__dict__
    assert sorted(pa.list_adapters(engine.model)) == sorted(engine.cache.on_device)


# -- the int8 product of a head on a GGUF Q8_0 grid ------------------------------------------------
needs_avx2 = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="the int8 kernel needs AVX2"
)


def on_grid(model) -> torch.nn.Module:
    """``model`` with its head's weights moved onto a Q8_0 grid (one float16 scale per 32
    inputs, the largest of each block at +-127), as a GGUF Q8_0 head loads."""
    w = model.get_output_embeddings().weight
    with torch.no_grad():
        blocks = w.view(w.shape[0], -1, 32)
        d = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
        w.copy_(((blocks / d).round().clamp(-127, 127) * d).view_as(w))
    return model


@needs_avx2
def test_int8_product_of_a_head_on_the_grid_equals_f_linear():
    model = on_grid(tiny_model("llama"))
    head = model.get_output_embeddings()
    hp = HeadProduct("int8", rows=8)
    hp.prepare(model)
    assert hp.used == "int8 at every row count" and hp._packed is None
    calls = []
    real = hp._int8_product
    hp._int8_product = lambda x: calls.append(x.shape) or real(x)
    x = torch.randn(2, 5, head.in_features)
    with torch.no_grad(), hp.active():
        got = head(x)
    assert calls == [x.shape]
    torch.testing.assert_close(got, F.linear(x, head.weight), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        head.weight.mul_(1.0001)  # an in-place edit off the grid: F.linear from then on
        with hp.active():
            after = head(x)
    assert calls == [x.shape] and hp.int8_rows == 0
    torch.testing.assert_close(after, F.linear(x, head.weight))


@needs_avx2
def test_int8_mode_refuses_a_head_off_the_grid():
    with pytest.raises(
        ConfigError, match="cannot multiply the LM head in int8: its weights are not on an int8 grid"
    ):
        HeadProduct("int8").prepare(tiny_model("llama"))
    model = on_grid(tiny_model("llama"))
    model.get_output_embeddings().to(torch.bfloat16)
    with pytest.raises(ConfigError, match="the LM head is torch.bfloat16 on cpu, not float32"):
        HeadProduct("int8").prepare(model)
    model.set_output_embeddings(torch.nn.Identity())
    with pytest.raises(ConfigError, match="not a plain nn.Linear"):
        HeadProduct("int8").prepare(model)


@needs_avx2
def test_auto_takes_int8_up_to_the_rows_where_it_measured_faster(monkeypatch):
    import paradapt.serve.lm_head as lm_head

    monkeypatch.setattr(lm_head, "LEAST_BYTES", 0)
    model = on_grid(tiny_model("llama"))
    # packed: never faster (3 rounds x 2 products at 1 and 32 rows); then int8 against F.linear
    # at 1, 2, 4, 8 rows: faster at 1, 2 and 4, not at 8 (the measuring stops there)
    times = iter([1.0] * 12 + [1.0, 0.5] * 9 + [1.0] * 6)
    monkeypatch.setattr(lm_head, "timed", lambda fn, least=0.002: next(times))
    hp = HeadProduct("auto", rows=32)
    hp.prepare(model)
    assert hp.int8_rows == 4 and hp.min_rows is None and hp._packed is None
    assert hp.used == "int8 up to 4 rows" and hp.reason is None
    # faster at every sample up to the step's rows: int8 for every row a step sends, no packed copy
    times = iter([1.0, 0.5] * 6 + [1.0, 0.5] * 18)
    hp = HeadProduct("auto", rows=32)
    hp.prepare(model)
    assert hp.int8_rows == 32 and hp.min_rows is None and hp._packed is None
    assert hp.used == "int8 up to 32 rows"
    off = tiny_model("llama")  # off the grid: int8 is never measured
    times = iter([1.0, 0.5] * 6)
    hp = HeadProduct("auto", rows=32)
    hp.prepare(off)
    assert hp.int8_rows == 0 and hp._int8 is None and hp.used == "packed from 1 rows"


@needs_avx2
def test_busy_mixed_batch_with_the_int8_head_equals_each_request_alone(tmp_path):
    ref_model = on_grid(adapter_root(tmp_path, "llama"))
    reqs = workload(seed=4)
    ref = [alone(ref_model, p, n, a) for p, a, n in reqs]
    engine = Engine(
        on_grid(tiny_model("llama")), tmp_path, EngineConfig(**{**BUSY.__dict__, "lm_head_gemm": "int8"})
    )
    assert engine.lm_head_gemm == "int8 at every row count"
    handles = [engine.add_request(p, a, SamplingParams(max_new_tokens=n)) for p, a, n in reqs]
    engine.run()
    assert [h.tokens for h in handles] == ref
    assert "forward" not in engine.model.get_output_embeddings().__dict__
