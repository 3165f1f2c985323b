"""The mixed-batch and fused paths on a CUDA device (fp32 and bf16).

These run only where a GPU is present (``pytest tests/test_cuda.py`` on a GPU machine); on a
CPU-only machine they are skipped, and the same checks run on the CPU in test_banks.py and
test_fuse.py. Every strategy the CUDA path can pick is forced once, plus the measured choice.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, outputs, tiny_model
from test_banks import ROWS, STRATEGIES, add_zoo, mixed, per_row_reference

import paradapt as pa
from paradapt.fusing import fuse

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_mixed_batch_equals_each_row_alone(family, strategy, dtype):
    model = tiny_model(family)
    add_zoo(model)
    model = model.to("cuda", dtype)
    ids = torch.randint(0, 96, (len(ROWS), 7), generator=torch.Generator().manual_seed(1)).cuda()
    ref = per_row_reference(model, ids, ROWS)
    got = mixed(model, ids, ROWS, strategy)
    assert got.device.type == "cuda" and got.dtype == dtype
    torch.testing.assert_close(got.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_cuda_fused_equals_unfused(family):
    model = tiny_model(family)
    pa.add_adapter(model, "a", pa.ParallelConfig(r=4, init="random"))
    model = model.cuda()
    pa.set_active(model, "a")
    ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        unfused = outputs(model, ids)
        fuse(model, "a")
        fused = outputs(model, ids)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_cuda_mixtures_in_a_mixed_batch_equal_each_row_alone(family):
    model = tiny_model(family)
    pa.add_adapter(model, "a", pa.ParallelConfig(r=4, init="random"))
    pa.add_adapter(model, "b", pa.SeriesConfig(r=8, init="random"))
    pa.add_mixture(model, "mx", pa.Mixture(experts=["a", "b"], top_k=1, init="random"))
    pa.add_mixture(model, "seq", pa.Mixture(experts=["a", "b"], granularity="sequence", init="random"))
    model = model.cuda()
    rows = ["mx", "a", None, "seq"]
    ids = torch.randint(1, 96, (len(rows), 7), generator=torch.Generator().manual_seed(1)).cuda()
    mask = torch.ones_like(ids)
    mask[3, -2:] = 0
    with torch.no_grad(), pa.route(model, rows):
        got = outputs(model, ids, attention_mask=mask)
    for i, entry in enumerate(rows):
        n = int(mask[i].sum())
        with torch.no_grad(), pa.route(model, [entry]):
            alone = outputs(model, ids[i : i + 1, :n])
        torch.testing.assert_close(got[i, :n], alone[0], atol=1e-5, rtol=1e-5)
