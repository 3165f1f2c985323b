"""The contract with transformers that the Runner relies on, checked against the pinned version.

paradapt's Scheduler decides each step; transformers 5.23's paged-attention forward executes it
(packed ``[1, T]`` inputs, ``PagedAttentionCache``, ``ContinuousBatchingIOs``), driven by our own
loop with no manager thread. All of that private API sits behind ``paradapt.serve.hf_paged``
(``PagedKV``); these tests drive it directly and fail if a transformers upgrade changes the
contract, and check the per-token routing (``pa.route(..., packed=True)``) that packed sequences
need (docs/serving.md, "Runner plan").
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from conftest import tiny_model
from transformers import GenerationConfig

import paradapt as pa
from paradapt.serve import AdapterCache, Request, Scheduler, SchedulerConfig
from paradapt.serve.hf_paged import PagedKV


def paged(model, max_batch_tokens: int, page_size: int = 16, num_blocks: int = 32) -> PagedKV:
    """transformers' paged KV cache and packed-batch builder, without the manager's thread."""
    return PagedKV(model, page_size=page_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens)


def alone(model, prompt, n, adapter=None, routed=True):
    """Greedy tokens of one request generated on its own (``routed``: the model has adapters)."""
    gc = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    with pa.route(model, [adapter]) if routed else contextlib.nullcontext():
        return model.generate(torch.tensor([prompt]), generation_config=gc)[0, len(prompt) :].tolist()


def forward(model, kv: PagedKV, batch):
    """One packed step: ``batch`` is [(KVState, tokens, samples_next)]; returns next tokens."""
    kw = kv.step_inputs(batch)
    num_q = sum(len(t) for _, t, _ in batch)
    assert kw["input_ids"].shape == (1, num_q)  # packed: one row, every request's tokens
    samplers = sum(s for _, _, s in batch)  # the samplers' rows come first
    return model(**kw).logits[0, kv.sampler_rows(kw, samplers)].argmax(-1).tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_scheduler_drives_the_paged_forward_and_matches_generate(family):
    """Chunked prefill (a 30-token prompt over a 16-token budget) and decodes packed together."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (5, 2, 12, 30, 7)]
    new = [6, 3, 8, 4, 9]
    kv = paged(model, max_batch_tokens=16)
    sched = Scheduler(SchedulerConfig(token_budget=16, kv_tokens=256, max_running=4), AdapterCache({}, 1, 1))
    states, out = {}, {}
    for i, (p, n) in enumerate(zip(prompts, new, strict=True)):
        sched.add(Request(str(i), None, len(p), n, float(i)))
        states[str(i)] = kv.new_request(str(i), p, n)
        out[str(i)] = []
    chunked = False
    with torch.no_grad():
        while sched.has_work():
            plan = sched.schedule(now=0.0)
            batch = [
                (states[c.request_id], prompts[int(c.request_id)][c.start : c.start + c.length], c.last)
                for c in plan.prefills
            ]
            batch += [(states[rid], [out[rid][-1]], True) for rid in plan.decodes]
            chunked |= any(not c.last for c in plan.prefills)
            for (st, _, _), tok in zip([b for b in batch if b[2]], forward(model, kv, batch), strict=True):
                out[st.request_id].append(tok)
            for r in sched.complete(plan, now=0.0):
                kv.free(r.id)
    assert chunked
    assert kv.pages_in_use() == 0
    assert [out[str(i)] for i in range(len(prompts))] == [
        alone(model, p, n, routed=False) for p, n in zip(prompts, new, strict=True)
    ]


def test_per_token_routes_serve_a_packed_mixed_adapter_batch():
    model = tiny_model("llama")
    pa.add_adapter(model, "lo", pa.LoRAConfig(r=8, init="random"))
    pa.add_adapter(model, "par", pa.ParallelConfig(r=16))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("paradapt.par.") and n.endswith("up.weight"):  # zero-initialised: make it matter
                p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (5, 9, 12, 7)]
    adapters = ["lo", "par", None, "lo"]
    steps = 5
    ref = [alone(model, p, steps, a) for p, a in zip(prompts, adapters, strict=True)]
    base = [alone(model, p, steps) for p in prompts]
    assert ref[0] != base[0] and ref[1] != base[1]  # the adapters matter
    kv = paged(model, max_batch_tokens=64)
    states = [kv.new_request(str(i), p, steps) for i, p in enumerate(prompts)]
    out: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        for step in range(steps):
            batch = [(st, prompts[i] if step == 0 else [out[i][-1]], True) for i, st in enumerate(states)]
            with pa.route(model, adapters, packed=True, lengths=[len(t) for _, t, _ in batch]):
                toks = forward(model, kv, batch)
            for i, t in enumerate(toks):
                out[i].append(t)
    assert out == ref


def test_pages_are_counted_in_the_schedulers_units_and_given_back():
    """What the Runner and the scheduler share: ``kv_block``/``kv_tokens`` are whole pages, a
    request's tokens take ceil(tokens / page) pages as they run, and ``free`` returns them."""
    model = tiny_model("llama")
    kv = paged(model, max_batch_tokens=32, page_size=8, num_blocks=12)
    assert kv.attention_kinds == ["full_attention"]
    assert (kv.kv_block, kv.kv_tokens) == (8, 12 * 8)
    a, b = kv.new_request("a", list(range(3, 20)), 4), kv.new_request("b", [5, 6, 7], 4)
    with torch.no_grad():
        forward(model, kv, [(a, list(range(3, 20)), True), (b, [5, 6, 7], True)])
    assert (kv.pages_in_use("a"), kv.pages_in_use("b"), kv.pages_in_use()) == (3, 1, 4)
    kv.free("a")
    assert kv.pages_in_use() == 1 and kv.kv_tokens == 12 * 8  # the capacity read at start stays


def test_sdpa_gqa_reads_grouped_heads_bit_exactly_and_restores_the_switch(monkeypatch):
    """``sdpa_gqa``: the masked GQA attention on CPU gives the logits of repeated KV heads, bit
    for bit (tiny Llama: 4 query heads over 2 KV heads, a padded batch), and transformers'
    switch is set only inside the block."""
    from paradapt.serve.hf_paged import _FORCE_GQA, sdpa_gqa

    monkeypatch.delenv(_FORCE_GQA, raising=False)
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: the forward takes the masked path
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with sdpa_gqa(torch.device("cpu")):
            assert os.environ[_FORCE_GQA] == "1"
            grouped = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(plain, grouped)
    assert _FORCE_GQA not in os.environ
    monkeypatch.setenv(_FORCE_GQA, "0")
    with sdpa_gqa(torch.device("cpu")):
        pass
    assert os.environ[_FORCE_GQA] == "0"  # a user's own setting comes back
    with sdpa_gqa(torch.device("meta")):
        assert os.environ[_FORCE_GQA] == "0"  # off CPU: untouched


def test_one_token_prompts_alone_in_a_step_take_the_write_only_path():
    """A step whose every request brings its first and only prompt token has one query per
    request but nothing to read back (an empty prompt's BOS, found by the fuzz test): it takes
    the write-only path (each request over its own keys of the step), and greedy output equals
    ``generate``."""
    from paradapt.serve.engine import Engine, EngineConfig
    from paradapt.serve.sampling import SamplingParams

    model = tiny_model("llama")
    engine = Engine(tiny_model("llama"), None, EngineConfig(page_size=4, num_blocks=40, max_running=4))
    handles = [engine.add_request([t], None, SamplingParams(max_new_tokens=4, ignore_eos=True)) for t in (5, 9)]
    engine.run()
    def greedy(ids: list[int]) -> list[int]:  # full forward per token, EOS not special
        for _ in range(4):
            with torch.no_grad():
                ids = [*ids, int(model(torch.tensor([ids])).logits[0, -1].argmax())]
        return ids[1:]

    assert [h.tokens for h in handles] == [greedy([t]) for t in (5, 9)]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_per_request_attention_in_mixed_steps_equals_transformers_packed_row(family, monkeypatch):
    """Steps that mix prompt chunks (several tokens, causal over their own past) with decodes take
    the per-request path (each chunk its own SDPA, single tokens through the decode attention):
    every prompt and output log-probability equals transformers' block-diagonal packed row."""
    import paradapt.serve.runner as runner_mod
    from paradapt.serve.engine import Engine, EngineConfig
    from paradapt.serve.sampling import SamplingParams

    def run(per_request: bool) -> list:
        if not per_request:
            monkeypatch.setattr(runner_mod, "lean_decode", lambda device, attend=None: contextlib.nullcontext())
        else:
            monkeypatch.undo()
        model = tiny_model(family)
        # a small token budget splits prompts into chunks, and later arrivals join running decodes
        engine = Engine(model, None, EngineConfig(page_size=4, num_blocks=80, max_running=4, token_budget=12))
        g = torch.Generator().manual_seed(1)
        params = SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=0, prompt_logprobs=0)
        handles = []
        for n in (9, 3, 17, 1, 6):
            handles.append(engine.add_request(torch.randint(3, 60, (n,), generator=g).tolist(), None, params))
            engine.step()
        engine.run()
        return [(h.tokens, [lp.logprob for lp in h.logprobs], [p and p.logprob for p in h.prompt_logprobs]) for h in handles]

    packed, lean = run(False), run(True)
    for (t0, lp0, pp0), (t1, lp1, pp1) in zip(packed, lean, strict=True):
        assert t0 == t1
        torch.testing.assert_close(torch.tensor(lp1), torch.tensor(lp0), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            torch.tensor([p or 0.0 for p in pp1]), torch.tensor([p or 0.0 for p in pp0]), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_burst_of_new_requests_attends_request_by_request_as_transformers_packed_row(family, monkeypatch):
    """A step in which every request is at its first chunk reads nothing back from the cache:
    it takes the write-only per-request path (one causal SDPA per request, not transformers'
    block-diagonal square), with the same tokens and log-probabilities as the packed row."""
    import paradapt.serve.hf_paged as hf_paged_mod
    import paradapt.serve.runner as runner_mod
    from paradapt.serve.engine import Engine, EngineConfig
    from paradapt.serve.sampling import SamplingParams

    own_calls = []
    real_own = hf_paged_mod._attend_own

    def counting(*a, **k):
        own_calls.append(1)
        return real_own(*a, **k)

    def run(per_request: bool) -> list:
        if not per_request:
            monkeypatch.setattr(runner_mod, "lean_decode", lambda device, attend=None: contextlib.nullcontext())
        else:
            monkeypatch.undo()
            monkeypatch.setattr(hf_paged_mod, "_attend_own", counting)
        engine = Engine(tiny_model(family), None, EngineConfig(page_size=4, num_blocks=80, max_running=4))
        g = torch.Generator().manual_seed(2)
        params = SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=0, prompt_logprobs=0)
        handles = [
            engine.add_request(torch.randint(3, 60, (n,), generator=g).tolist(), None, params) for n in (7, 2, 11, 5)
        ]
        engine.run()  # the first step holds all four whole prompts: nothing to read back yet
        return [(h.tokens, [lp.logprob for lp in h.logprobs], [p and p.logprob for p in h.prompt_logprobs]) for h in handles]

    packed, own = run(False), run(True)
    assert own_calls, "the burst's first step took the write-only per-request path"
    for (t0, lp0, pp0), (t1, lp1, pp1) in zip(packed, own, strict=True):
        assert t0 == t1
        torch.testing.assert_close(torch.tensor(lp1), torch.tensor(lp0), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            torch.tensor([p or 0.0 for p in pp1]), torch.tensor([p or 0.0 for p in pp0]), rtol=1e-4, atol=1e-4
        )
