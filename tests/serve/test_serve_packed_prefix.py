"""Prefix adapters through the serving Runner: paged KV cache, chunked prefill, packed mixed steps.

A prefix request's greedy tokens in a busy step mix (LoRA, parallel, base and other prefix
requests, prompts chunked over a small token budget) must equal that request alone with its
adapter in the ordinary (unpacked) forward, ``model.generate`` under ``pa.route``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import GenerationConfig

import paradapt as pa
from paradapt.serve import AdapterCache, Request, Scheduler, SchedulerConfig
from paradapt.serve.runner import Runner
from paradapt.serve.sampling import SamplingParams

ADAPTERS = {
    "pre": pa.PrefixConfig(num_virtual_tokens=3, init="random"),
    "pre6": pa.PrefixConfig(num_virtual_tokens=6, init="random", reparam=False),
    "gate": pa.PrefixConfig(num_virtual_tokens=2, init="random", gated=True),
    "mam": pa.MAMConfig(num_virtual_tokens=4, r=8, init="random"),
    "lo": pa.LoRAConfig(r=4, init="random"),
    "par": pa.ParallelConfig(r=8, init="random"),
}


def alone(model, prompt: list[int], n: int, adapter: str | None) -> list[int]:
    """Greedy tokens of the request on its own (``generate`` stops at EOS; the Runner does not)."""
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.no_grad(), pa.route(model, [adapter]):
        return model.generate(torch.tensor([prompt]), generation_config=gc)[0, len(prompt) :].tolist()


def serve(model, reqs, token_budget: int = 16, max_running: int = 6) -> tuple[list[list[int]], int]:
    """Run ``reqs`` (prompt, adapter, n) through our Scheduler + Runner; tokens and the widest step."""
    runner = Runner(model, page_size=4, num_blocks=96, max_batch_tokens=token_budget)
    cache = AdapterCache(dict.fromkeys(ADAPTERS, 1), len(ADAPTERS), len(ADAPTERS))
    sched = Scheduler(
        SchedulerConfig(
            token_budget=token_budget,
            kv_tokens=runner.kv_tokens,
            kv_block=runner.kv_block,
            max_running=max_running,
        ),
        cache,
    )
    for i, (p, a, n) in enumerate(reqs):
        sched.add(Request(str(i), a, len(p), n, float(i)))
    widest, out = 0, {str(i): [] for i in range(len(reqs))}
    while sched.has_work():
        plan = sched.schedule(now=0.0)
        for rid in plan.admitted:
            p, a, n = reqs[int(rid)]
            runner.add(rid, p, a, SamplingParams(max_new_tokens=n, temperature=0))
        widest = max(widest, len(plan.prefills) + len(plan.decodes))
        for rid, tok in runner.execute(plan).items():
            out[rid].append(tok)
        for r in sched.complete(plan, now=0.0):
            runner.free(r.id)
    assert runner.pages_in_use() == 0
    return [out[str(i)] for i in range(len(reqs))], widest


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_requests_in_a_busy_packed_batch_equal_each_alone(family):
    model = tiny_model(family)
    for name, cfg in ADAPTERS.items():
        pa.add_adapter(model, name, cfg)
    with torch.no_grad():  # strong prefixes, so that they change a tiny model's greedy tokens
        for n, p in model.named_parameters():
            if n.split(".")[1] in ("pre", "pre6", "gate", "mam") and n.endswith(("key", "value", "2.weight")):
                p.mul_(4)
    g = torch.Generator().manual_seed(5)
    names = [*ADAPTERS, None]
    reqs = []
    for i in range(12):
        plen = int(torch.randint(1, 30, (1,), generator=g))
        reqs.append((torch.randint(3, 96, (plen,), generator=g).tolist(), names[i % len(names)], 6))
    assert any(len(p) > 16 for p, a, _ in reqs if a and a.startswith("pre"))  # a chunked prefix prompt
    ref = [alone(model, p, n, a) for p, a, n in reqs]
    base = [alone(model, p, n, None) for p, _, n in reqs]
    changed = {a for r, b, (_, a, _) in zip(ref, base, reqs, strict=True) if r != b}
    assert len(changed & {"pre", "pre6", "gate", "mam"}) >= 2  # the prefixes matter
    got, widest = serve(model, reqs)
    assert widest >= 4
    assert [g[: len(r)] for g, r in zip(got, ref, strict=True)] == ref
    assert sum(len(r) for r in ref) >= 50  # most requests ran their 6 tokens before any EOS


def test_engine_serves_prefix_adapters_in_busy_mixed_steps(tmp_path):
    from paradapt.serve.engine import Engine, EngineConfig

    ref_model = tiny_model("llama")
    for name, cfg in ADAPTERS.items():
        pa.add_adapter(ref_model, name, cfg)
        pa.save_adapter(ref_model, name, tmp_path / name)
    g = torch.Generator().manual_seed(0)
    names = [*ADAPTERS, None]
    reqs = []
    for i in range(14):
        plen = int(torch.randint(1, 31, (1,), generator=g))
        reqs.append((torch.randint(3, 96, (plen,), generator=g).tolist(), names[i % len(names)], 8))
    ref = [alone(ref_model, p, n, a) for p, a, n in reqs]
    config = EngineConfig(
        page_size=4, num_blocks=96, token_budget=16, max_running=6, max_slots=3, max_served=4
    )
    engine = Engine(tiny_model("llama"), tmp_path, config)
    handles = [engine.add_request(p, a, SamplingParams(max_new_tokens=n)) for p, a, n in reqs]
    engine.run()
    assert [h.status for h in handles] == ["finished"] * len(reqs)
    assert [h.tokens for h in handles] == ref
