"""Decode attention over the paged KV cache (serve/paged_attention.py): the gather + SDPA path, the
compiled in-place path and the C++ kernel (csrc/paged_decode.cpp) all equal transformers' masked
attention over the packed row."""

from __future__ import annotations

import warnings

import pytest
import torch

from paradapt.errors import ConfigError
from paradapt.serve import paged_attention as pa_attn
from paradapt.serve.hf_paged import _padded_rows

ATTENDS = {
    "gather": pa_attn.gather_attention,
    "compiled": pa_attn.paged_attention,
    "kernel": pa_attn.kernel_attention,
}


def packed_case(lengths: list[int], heads: int, heads_kv: int, dim: int, dtype=torch.float32, seed: int = 0):
    """B one-token queries, each over its own keys, laid out as lean_decode lays them out: the
    keys of request i at packed positions cu[i]:cu[i+1], scattered over the cache rows."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(len(lengths), heads, dim, generator=g).to(dtype)
    k = torch.randn(total + 7, heads_kv, dim, generator=g).to(dtype)  # cache rows, more than read
    v = torch.randn(total + 7, heads_kv, dim, generator=g).to(dtype)
    read = torch.randperm(total + 7, generator=g)[:total]  # packed position -> cache row
    rows, valid = _padded_rows(cu)
    where = read[rows.reshape(-1)].view(rows.shape)
    # the reference: every query over the whole packed row under a block-diagonal mask
    mask = torch.zeros(len(lengths), total, dtype=torch.bool)
    for i in range(len(lengths)):
        mask[i, cu[i] : cu[i + 1]] = True
    kk, vv = (t[read].transpose(0, 1)[None].repeat_interleave(heads // heads_kv, 1) for t in (k, v))
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], kk, vv, attn_mask=mask[None, None], scale=0.3
    )[0].transpose(0, 1)
    return (q, k, v, where, valid), want


@pytest.mark.parametrize("name", list(ATTENDS))
@pytest.mark.parametrize(
    "lengths,heads,heads_kv", [([3, 7, 1, 5], 4, 2), ([9], 2, 2), ([1, 1], 3, 1), ([4, 2, 6], 6, 6)]
)
def test_decode_attention_equals_the_block_diagonal_packed_row(name, lengths, heads, heads_kv):
    args, want = packed_case(lengths, heads, heads_kv, 8)
    got = ATTENDS[name](*args, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["compiled", "kernel"])
def test_in_place_attention_in_bf16_is_close_to_the_gather(name):
    args, _ = packed_case([5, 12, 3], 4, 2, 16, dtype=torch.bfloat16)
    got = ATTENDS[name](*args, 0.25)
    want = pa_attn.gather_attention(*args, 0.25)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_the_kernel_reads_strided_queries_and_caches_of_different_lengths():
    """The engine hands it a transposed query view, and transformers' K and V token views may
    differ in length (only rows below both are indexed)."""
    (q, k, v, where, valid), want = packed_case([3, 7, 1, 5], 4, 2, 8)
    strided = q.transpose(0, 1).contiguous().transpose(0, 1)
    got = pa_attn.kernel_attention(strided, k, v[: int(where.max()) + 1], where, valid, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "lengths,heads,heads_kv,dim",
    [
        ([100, 3, 17, 64], 8, 8, 64),  # the vectorised float path: blocks of 8 keys and a tail
        ([9, 16, 23], 9, 3, 64),  # grouped KV heads (SmolLM2's 9 query heads over 3)
        ([5, 12], 4, 2, 12),  # a head size that is not a multiple of 8: the generic loop
        ([1, 8], 2, 1, 8),
    ],
)
def test_the_kernel_at_real_head_sizes_equals_the_packed_row(lengths, heads, heads_kv, dim):
    args, want = packed_case(lengths, heads, heads_kv, dim, seed=len(lengths))
    got = pa_attn.kernel_attention(*args, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    generic = pa_attn.decode_kernel.load().paged_decode_generic(*args, 0.3)  # the loop without decode_f32
    torch.testing.assert_close(got, generic, rtol=1e-5, atol=1e-5)
    # a request's result does not depend on the others in the call
    q, k, v, where, valid = args
    for i in range(len(lengths)):
        alone = pa_attn.kernel_attention(q[i : i + 1], k, v, where[i : i + 1], valid[i : i + 1], 0.3)
        assert torch.equal(alone, got[i : i + 1])


def test_the_kernel_softmax_is_stable_for_large_and_very_different_scores():
    """Scores far apart (exp of the smaller ones underflows to 0) and large in size must give the
    softmax of the largest, not NaN or inf."""
    (q, k, v, where, valid), _ = packed_case([20, 9], 4, 4, 16)
    q = q * 300.0  # scores of several hundred
    got = pa_attn.kernel_attention(q, k, v, where, valid, 1.0)
    want = pa_attn.gather_attention(q, k, v, where, valid, 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_kernel_refuses_rows_outside_the_cache_and_copied_caches():
    (q, k, v, where, valid), _ = packed_case([3, 7], 4, 2, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        pa_attn.kernel_attention(q, k, v, where + k.shape[0], valid, 0.3)
    with pytest.raises(RuntimeError, match="outside the cache"):
        pa_attn.kernel_attention(q, k, v, where - where.max() - 1, valid, 0.3)
    with pytest.raises(RuntimeError, match="contiguous"):
        pa_attn.kernel_attention(q, k.transpose(0, 1), v, where, valid, 0.3)
    with pytest.raises(RuntimeError, match="dtype"):
        pa_attn.kernel_attention(q, k.double(), v, where, valid, 0.3)


def test_a_mode_that_does_not_exist_names_the_field():
    with pytest.raises(ConfigError, match="decode_attention"):
        pa_attn.DecodeAttention("fast")


def _broken(*_args, **_kwargs):
    raise RuntimeError("no C++ compiler\nsecond line")


def test_auto_falls_back_kernel_then_compiled_then_gather_with_one_warning(monkeypatch):
    from paradapt.serve import decode_kernel

    monkeypatch.setattr(decode_kernel, "load", _broken)
    auto = pa_attn.DecodeAttention("auto")
    with pytest.warns(UserWarning, match="decode attention compiled, the others failed .kernel: RuntimeError: no C\\+\\+ compiler"):
        auto.warm_up(4, 2, 8, torch.float32, torch.device("cpu"))
    assert auto.used == "compiled" and auto.compiled
    monkeypatch.setattr(pa_attn, "_compiled_fn", _broken)
    auto = pa_attn.DecodeAttention("auto")
    with pytest.warns(UserWarning, match="decode attention gather"):
        auto.warm_up(4, 2, 8, torch.float32, torch.device("cpu"))
    assert auto.attend is pa_attn.gather_attention and not auto.compiled
    assert "kernel: RuntimeError: no C++ compiler" in auto.error and "compiled: RuntimeError" in auto.error
    for forced in ("kernel", "compiled"):
        with pytest.raises(ConfigError, match=f"decode_attention.*the {forced} .*no C\\+\\+ compiler"):
            pa_attn.DecodeAttention(forced).warm_up(4, 2, 8, torch.float32, torch.device("cpu"))
    gather = pa_attn.DecodeAttention("gather")
    gather.warm_up(4, 2, 8, torch.float32, torch.device("cpu"))  # never compiles
    assert gather.used == "gather"


def test_auto_takes_the_kernel_when_it_builds():
    mode = pa_attn.DecodeAttention("auto")
    mode.warm_up(4, 2, 8, torch.float32, torch.device("cpu"))
    assert mode.used == "kernel" and mode.compiled and mode.error is None


def test_the_kernel_build_is_named_after_the_cpu_and_the_source():
    from paradapt.serve import decode_kernel

    a = decode_kernel.cpu_fingerprint()
    assert a == decode_kernel.cpu_fingerprint() and len(a) == 12
    assert decode_kernel.SOURCE.is_file()


def test_the_runner_makes_the_adapter_kernel_a_candidate_and_warns_once_when_it_cannot(monkeypatch):
    """The engine's Runner builds or loads the banks' C++ strategy at start (kernels.py); where
    it cannot be built the engine still serves, with one warning naming why."""
    from conftest import tiny_model

    from paradapt.serve import runner as runner_mod

    model = tiny_model("llama")
    assert runner_mod.Runner(model, page_size=4, num_blocks=8, max_batch_tokens=16).adapter_kernel
    monkeypatch.setattr(runner_mod.kernels, "enable_native", lambda: "RuntimeError: no C++ compiler")
    monkeypatch.setattr(runner_mod, "_warned", [])
    with pytest.warns(UserWarning, match="adapter kernel is unavailable.*no C\\+\\+ compiler"):
        first = runner_mod.Runner(model, page_size=4, num_blocks=8, max_batch_tokens=16)
    assert not first.adapter_kernel
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not runner_mod.Runner(model, page_size=4, num_blocks=8, max_batch_tokens=16).adapter_kernel
