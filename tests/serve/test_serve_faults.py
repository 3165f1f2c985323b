"""Issue 15: one request's parameters or data fail only that request.

A request that raises inside a packed step is run alone and failed with its own error while
the step's other requests finish with the tokens they get alone; a request whose hidden
states go non-finite leaves the other rows of its packed step bit-identical; sampling
parameters that underflow (temperature, top_p 1e-300) sample greedily instead of raising.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_serve_engine import BUSY, adapter_root, alone

import paradapt as pa
from paradapt.serve.engine import Engine
from paradapt.serve.runner import Runner
from paradapt.serve.sampling import SamplingParams, sample
from paradapt.serve.scheduler import PrefillChunk, ScheduledStep
from paradapt.state import require_state

POISON = 77  # a token id whose embedding lookup raises (a stand-in for any per-request fault)


def poison_embeddings(model) -> None:
    def check(module, args):
        if (args[0] == POISON).any():
            raise RuntimeError("poisoned token")

    model.get_input_embeddings().register_forward_pre_hook(check)


def test_a_request_that_raises_in_a_step_fails_alone_and_the_others_finish_correctly(tmp_path):
    ref_model = adapter_root(tmp_path, "llama")
    engine = Engine(tiny_model("llama"), tmp_path, BUSY)
    poison_embeddings(engine.model)
    good = [([5, 6, 7, 8], "lo4", 6), ([9, 10, 11], None, 5), ([12, 13, 14, 15, 16], "par", 7)]
    handles = [engine.add_request(p, a, SamplingParams(max_new_tokens=n)) for p, a, n in good]
    bad = engine.add_request([5, POISON, 7], "lo4", SamplingParams(max_new_tokens=4))
    seeded = engine.add_request([3, 4, 5], "lo2", SamplingParams(max_new_tokens=6, temperature=0.9, seed=7))
    engine.run()
    assert bad.status == "failed" and "poisoned token" in str(bad.error)
    assert [h.tokens for h in handles] == [alone(ref_model, p, n, a) for p, a, n in good]
    assert all(h.status == "finished" for h in [*handles, seeded])
    # the rerun rewinds the random stream too: the sampled request's tokens are those it gets alone
    solo = Engine(tiny_model("llama"), tmp_path, BUSY)
    twin = solo.add_request([3, 4, 5], "lo2", SamplingParams(max_new_tokens=6, temperature=0.9, seed=7))
    solo.run()
    assert seeded.tokens == twin.tokens
    assert engine.runner.pages_in_use() == 0 and engine.scheduler.kv_used == 0


def _packed_logits(model, prompts, adapters) -> torch.Tensor:
    """The sampled rows' logits of one packed prefill step of ``prompts``."""
    runner = Runner(model, page_size=4, num_blocks=32, max_batch_tokens=64)
    for i, (p, a) in enumerate(zip(prompts, adapters, strict=True)):
        runner.add(f"r{i}", p, a, SamplingParams(max_new_tokens=2))
    got = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: got.append(out.detach().clone()))
    try:
        step = tuple(PrefillChunk(f"r{i}", 0, len(p), True) for i, p in enumerate(prompts))
        runner.execute(ScheduledStep(step, (), tuple(sorted({a for a in adapters if a})), ()))
    finally:
        hook.remove()
    return got[0][0]


def test_a_row_whose_hidden_states_are_nan_leaves_the_other_rows_bit_identical():
    model = tiny_model("llama")
    torch.manual_seed(0)
    pa.add_adapter(model, "broken", pa.LoRAConfig(r=4, init="random"))
    pa.add_adapter(model, "fine", pa.LoRAConfig(r=4, init="random"))
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]
    adapters = ["broken", "fine", None]
    before = _packed_logits(model, prompts, adapters)
    # replaced, not edited in place: the runner routes with fixed_weights, as a served adapter
    # changes only by being loaded again
    pa.remove_adapter(model, "broken")
    pa.add_adapter(model, "broken", pa.LoRAConfig(r=4, init="random"))
    with torch.no_grad():
        for p in require_state(model).container["broken"].parameters():
            p.fill_(float("nan"))
    after = _packed_logits(model, prompts, adapters)
    assert torch.isnan(after[0]).any()  # the broken row is broken
    assert torch.equal(after[1:], before[1:])  # and nobody else's


@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_parameters_that_underflow_sample_greedily(field):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(**{"temperature": 1.0, field: 1e-300})
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    assert sample(logits, [params] * 3, gens) == logits.argmax(-1).tolist()


def test_seeds_outside_torchs_range_are_refused_naming_the_field():
    SamplingParams(temperature=1.0, seed=2**64 - 1)
    with pytest.raises(pa.ConfigError, match="seed"):
        SamplingParams(temperature=1.0, seed=2**64)
