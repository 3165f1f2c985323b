"""paradapt's float32-row int4 kernel (``csrc/int4_rows.cpp``) on torch's CPU int4 packing.

It must give the dequantised weight exactly (one-hot rows), equal a float64 reference within
float32 error for every group size and both packing layouts (blocks of 32 and 64 rows), give a
row the same bits alone as in any batch and at any thread count, and be what an int4
``QuantLinear`` uses for few rows on a CPU without native bf16.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paradapt as pa
from paradapt import quantized

pytestmark = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="the kernel needs AVX2"
)


@pytest.fixture(scope="module")
def ext():
    return quantized.int4_rows()


def pack(codes: torch.Tensor, block: int) -> torch.Tensor:
    """Codes ``[N, K]`` in torch's CPU layout with blocks of ``block`` rows (what
    ``quantized._read_blocks`` reads): per block ``[K, block/2]`` bytes, row ``j`` in the low
    nibble and row ``block/2 + j`` in the high one of byte ``j``."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n // block, 2, block // 2, k)
    return (c[:, 0] | (c[:, 1] << 4)).transpose(1, 2).contiguous().view(n, k // 2)


def random_layer(n: int, k: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).bfloat16().float()
    zero = (torch.randn(n, k // group, generator=g) * 0.05).bfloat16().float()
    scales = quantized.int4_scales(scale, zero)
    weight = quantized._dequantize_int4(codes.to(torch.uint8), scales, group)
    return codes, scales, weight


def test_the_packer_here_matches_torchs_own_on_this_cpu():
    codes, _, _ = random_layer(128, 64, 32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(pack(codes, quantized._layout()), packed)


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("group", quantized.INT4_GROUP_SIZES)
def test_one_hot_rows_give_the_dequantised_weight_exactly(ext, block, group):
    codes, scales, weight = random_layer(128, 256, group)
    eye = torch.eye(256)
    for rows in (eye[:3], eye):  # the path that decodes in registers, and the panel path
        got = ext.int4_rows_linear(rows, pack(codes, block), scales, group, block)
        assert torch.equal(got, weight.t()[: rows.shape[0]])


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize(
    ("n", "k", "group"), [(64, 32, 32), (192, 576, 32), (128, 1536, 64), (64, 512, 128), (256, 512, 256)]
)
def test_equals_a_float64_reference(ext, block, n, k, group):
    codes, scales, weight = random_layer(n, k, group, seed=n + k)
    packed = pack(codes, block)
    for m in (1, 2, 3, 4, 5, 6, 7, 13, 40):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        ref = x.double() @ weight.double().t()
        got = ext.int4_rows_linear(x, packed, scales, group, block)
        assert got.dtype == torch.float32 and got.shape == (m, n)
        torch.testing.assert_close(got.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("group", quantized.INT4_GROUP_SIZES)
def test_dequantize_gives_the_references_bits(ext, block, group):
    codes, scales, weight = random_layer(96 if block == 32 else 128, 512, group, seed=group)
    assert torch.equal(ext.int4_dequantize(pack(codes, block), scales, group, block), weight)


def test_a_row_has_the_same_bits_alone_in_any_batch_and_thread_count(ext):
    codes, scales, _ = random_layer(256, 576, 32)
    packed = pack(codes, 32)
    x = torch.randn(17, 576, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    alone = torch.cat([ext.int4_rows_linear(x[i : i + 1], packed, scales, 32, 32) for i in range(17)])
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for m in (2, 3, 4, 6, 9, 17):  # both paths, full and partial tiles
                assert torch.equal(ext.int4_rows_linear(x[:m], packed, scales, 32, 32), alone[:m]), (t, m)
    finally:
        torch.set_num_threads(threads)
    lead = ext.int4_rows_linear(x[:6].view(2, 3, 576), packed, scales, 32, 32)  # any leading shape
    assert lead.shape == (2, 3, 256) and torch.equal(lead.view(6, 256), alone[:6])


def test_bad_arguments_are_refused(ext):
    codes, scales, _ = random_layer(64, 64, 32)
    packed = pack(codes, 32)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="block must be 32 or 64"):
        ext.int4_rows_linear(x, packed, scales, 32, 16)
    with pytest.raises(RuntimeError, match="last dimension"):
        ext.int4_rows_linear(torch.randn(2, 32), packed, scales, 32, 32)
    with pytest.raises(RuntimeError, match="float32"):
        ext.int4_rows_linear(x.double(), packed, scales, 32, 32)
    with pytest.raises(RuntimeError, match="scales"):
        ext.int4_rows_linear(x, packed, scales[:1], 32, 32)
    with pytest.raises(RuntimeError, match="multiple of the packing's block"):
        ext.int4_rows_linear(x, packed[:48], scales[:, :48].contiguous(), 32, 32)
    with pytest.raises(RuntimeError, match="scales"):
        ext.int4_dequantize(packed, scales.float(), 32, 32)


def test_an_int4_layer_without_native_bf16_multiplies_few_rows_in_float32(monkeypatch):
    """On an AVX2 CPU an int4 layer's few rows go through the kernel in float32: within float32
    error of the dequantised reference (torch's bf16 kernel is only within bf16 error), and a
    row alone equals the row in a batch."""
    monkeypatch.setattr(quantized, "native_bf16", lambda: False)
    torch.manual_seed(0)
    q = pa.quantize(nn.Sequential(nn.Linear(576, 192)), "int4")[0]
    assert q.input_dtype() == torch.float32
    x = torch.randn(5, 576)
    with torch.no_grad():
        got = q(x)
        alone = torch.cat([q(x[i : i + 1]) for i in range(5)])
    # float32 error: an input rounded to bf16 (torch's kernel) would miss this by 100x
    ref = x.double() @ q.dequantized_weight().double().t() + q.bias.double()
    torch.testing.assert_close(got.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
    assert torch.equal(got, alone)
    fast = q.dequantized_weight()  # by the kernel too: the same bits as the reference's
    assert torch.equal(fast, quantized._dequantize_int4(q.int4_codes(), q.scales, q.group_size))
    monkeypatch.setattr(quantized, "INT4_KERNEL", "torch")
    assert q.input_dtype() == torch.bfloat16  # the setting is looked at again
