"""The Engine on a quantised base: its packed mixed-adapter step equals each request alone.

The reference is ``model.generate`` on the same quantised model, one request at a time with its
adapter; the engine packs many requests of different adapters into each step.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import GenerationConfig

import paradapt as pa
from paradapt.serve.engine import Engine, EngineConfig
from paradapt.serve.sampling import SamplingParams

BUSY = EngineConfig(page_size=4, num_blocks=80, token_budget=16, max_running=6, max_slots=2, max_served=4)
ADAPTERS = {
    "lo4": pa.LoRAConfig(r=4, init="random"),
    "lo8": pa.LoRAConfig(r=8, init="random", targets="all-linear"),
    "par": pa.ParallelConfig(r=16, init="random"),
    "ia3": pa.IA3Config(init="random"),
    "pre": pa.PrefixConfig(num_virtual_tokens=3, reparam=False, init="random"),
}


def _alone(model, prompt: list[int], n: int, adapter: str | None) -> list[int]:
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.no_grad(), pa.route(model, [adapter]):
        return model.generate(torch.tensor([prompt]), generation_config=gc)[0, len(prompt) :].tolist()


def _workload(n: int = 12):
    g = torch.Generator().manual_seed(0)
    names = [*ADAPTERS, None]
    out = []
    for i in range(n):
        plen = int(torch.randint(1, 30, (1,), generator=g))
        prompt = torch.randint(3, 96, (plen,), generator=g).tolist()
        out.append((prompt, names[i % len(names)], int(torch.randint(1, 10, (1,), generator=g))))
    return out


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_engine_mixed_batch_on_a_quantised_base_equals_each_request_alone(tmp_path, precision):
    ref = pa.quantize(tiny_model("llama"), precision)
    for name, cfg in ADAPTERS.items():
        pa.add_adapter(ref, name, cfg)
        pa.save_adapter(ref, name, tmp_path / name)
    reqs = _workload()
    want = [_alone(ref, p, n, a) for p, a, n in reqs]
    engine = Engine(pa.quantize(tiny_model("llama"), precision), tmp_path, BUSY)
    handles = [engine.add_request(p, a, SamplingParams(max_new_tokens=n)) for p, a, n in reqs]
    widest = 0
    while engine.has_work():
        widest = max(widest, len(engine.scheduler.running))
        engine.step()
    assert widest >= 4  # requests of several adapters shared steps
    assert [h.tokens for h in handles] == want
    assert all(h.status == "finished" for h in handles)
