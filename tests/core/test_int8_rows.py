"""paradapt's float32-row int8 kernel (``csrc/int8_rows.cpp``) and the int8 grid it multiplies.

The kernel must give the dequantised weight exactly (one-hot rows), equal a float64 reference
within float32 error for group and per-row scales and for output counts that do not fill a
block, give a row the same bits alone as in any batch and at any thread count, and refuse bad
tensors with an error that names them. ``quantized.int8_grid`` must find a GGUF Q8_0 tensor's
own integers and scales from its float32 weights (the gguf package's quantiser), and nothing
from weights off such a grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from paradapt import quantized

pytestmark = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="the kernel needs AVX2"
)


@pytest.fixture(scope="module")
def ext():
    return quantized.int8_rows()


def random_layer(n: int, k: int, groups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(n, groups, generator=g) * 0.01 + 1e-4
    weight = (q.float().view(n, groups, k // groups) * scales[..., None]).view(n, k)
    return q, scales, weight


def on_q8_0_grid(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` through the gguf package's own Q8_0 quantiser and back: what transformers
    loads from a GGUF file's Q8_0 tensor."""
    from gguf import GGMLQuantizationType, dequantize, quantize

    kind = GGMLQuantizationType.Q8_0
    data = weight.numpy().astype(np.float32)
    return torch.from_numpy(
        np.array(dequantize(quantize(data, kind), kind), dtype=np.float32).reshape(data.shape)
    )


@pytest.mark.parametrize("groups", [1, 2, 18])
def test_one_hot_rows_give_the_dequantised_weight_exactly(ext, groups):
    q, scales, weight = random_layer(37, 576, groups)
    assert torch.equal(ext.int8_dequantize(q, scales), weight)
    eye = torch.eye(576)
    for rows in (eye[:1], eye[:2], eye[:3], eye[:7], eye):  # every row-group shape and the tail
        got = ext.int8_rows_linear(rows, q, scales)
        assert torch.equal(got, weight.t()[: rows.shape[0]])


@pytest.mark.parametrize(("n", "k", "groups"), [(49, 64, 2), (16, 32, 1), (130, 256, 8), (3, 8, 1)])
def test_equals_a_float64_reference_for_any_rows(ext, n, k, groups):
    q, scales, weight = random_layer(n, k, groups, seed=n)
    x = torch.randn(13, k, generator=torch.Generator().manual_seed(1))
    for m in (1, 2, 3, 4, 5, 8, 13):
        got = ext.int8_rows_linear(x[:m], q, scales)
        ref = (x[:m].double() @ weight.double().t()).float()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_a_rows_bits_do_not_depend_on_the_other_rows_or_the_threads(ext):
    q, scales, _ = random_layer(200, 576, 18)
    x = torch.randn(11, 576, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.int8_rows_linear(x, q, scales)
        torch.set_num_threads(2)
        two = ext.int8_rows_linear(x, q, scales)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    for i in range(11):
        assert torch.equal(ext.int8_rows_linear(x[i : i + 1], q, scales)[0], one[i])
        assert torch.equal(ext.int8_rows_linear(x[max(0, i - 3) : i + 1], q, scales)[-1], one[i])


def test_leading_dimensions_and_empty_inputs(ext):
    q, scales, weight = random_layer(20, 64, 2)
    x = torch.randn(2, 3, 64)
    got = ext.int8_rows_linear(x, q, scales)
    assert got.shape == (2, 3, 20)
    torch.testing.assert_close(got, x @ weight.t(), rtol=1e-5, atol=1e-5)
    assert ext.int8_rows_linear(torch.randn(0, 64), q, scales).shape == (0, 20)
    strided = torch.randn(2, 3, 128)[..., ::2]  # not contiguous: copied first
    torch.testing.assert_close(
        ext.int8_rows_linear(strided, q, scales), strided @ weight.t(), rtol=1e-5, atol=1e-5
    )


def test_bad_tensors_are_refused_by_name(ext):
    q, scales, _ = random_layer(16, 64, 2)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="x must be float32"):
        ext.int8_rows_linear(x.double(), q, scales)
    with pytest.raises(RuntimeError, match="x's last dimension is 32"):
        ext.int8_rows_linear(torch.randn(2, 32), q, scales)
    with pytest.raises(RuntimeError, match="q must be a contiguous int8"):
        ext.int8_rows_linear(x, q.to(torch.int16), scales)
    with pytest.raises(RuntimeError, match="q must be a contiguous int8"):
        ext.int8_rows_linear(torch.randn(2, 16), q.t(), scales)
    with pytest.raises(RuntimeError, match="scales must be a contiguous float32"):
        ext.int8_rows_linear(x, q, scales.bfloat16())
    with pytest.raises(RuntimeError, match="scales must be a contiguous float32"):
        ext.int8_rows_linear(x, q, scales[:8])
    with pytest.raises(RuntimeError, match="is not G = 3 groups"):
        ext.int8_rows_linear(x, q, torch.ones(16, 3))
    with pytest.raises(RuntimeError, match="is not G = 16 groups of a multiple of 8"):
        ext.int8_dequantize(q, torch.ones(16, 16))


def test_the_grid_of_a_gguf_q8_0_tensor_is_found_exactly():
    w = on_q8_0_grid(torch.randn(64, 96, generator=torch.Generator().manual_seed(3)) * 0.05)
    w[5, 32:64] = 0.0  # a block of zeros: scale 0, codes 0
    found = quantized.int8_grid(w)
    assert found is not None
    q, scales = found
    assert q.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (64, 3)
    assert torch.equal((q.float().view(64, 3, 32) * scales[..., None]).view(64, 96), w)
    assert int(q.abs().amax()) == 127 and torch.equal(scales[5, 1], torch.tensor(0.0))
    assert torch.equal(quantized.int8_rows().int8_dequantize(q, scales), w)


def test_weights_off_the_grid_have_none():
    w = on_q8_0_grid(torch.randn(64, 96) * 0.05)
    assert quantized.int8_grid(torch.randn(64, 96)) is None  # a float model's weights
    off = w.clone()
    off[63, 95] = torch.nextafter(off[63, 95], torch.tensor(1.0))  # one weight one ulp off
    assert quantized.int8_grid(off) is None
    nan = w.clone()
    nan[0, 0] = float("nan")
    assert quantized.int8_grid(nan) is None
    assert quantized.int8_grid(w.bfloat16()) is None  # only float32 weights
    assert quantized.int8_grid(w[:, :80]) is None  # inputs not whole groups of 32
    assert quantized.int8_grid(w[0]) is None


def test_a_kernel_that_does_not_build_warns_once_and_is_not_tried_again(monkeypatch):
    from paradapt import native

    monkeypatch.setattr(quantized, "_build_failed", {})
    tries = []

    class Broken(native.Extension):
        def load(self):
            tries.append(1)
            raise RuntimeError("no compiler\nmore detail")

    broken = Broken("int8_rows", native.INT8_ROWS.source)
    monkeypatch.setattr(native, "INT8_ROWS", broken)
    with pytest.warns(UserWarning, match=r"int8_rows kernel did not build \(RuntimeError: no compiler\); the LM head"):
        assert quantized.int8_rows_usable() is False
    assert quantized.int8_rows_usable() is False  # no second try, no second warning
    assert tries == [1]
