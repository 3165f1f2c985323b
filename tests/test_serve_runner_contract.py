"""The contract the Runner (next increment) will rely on, checked against the pinned transformers.

paradapt's Scheduler decides each step; transformers 5.23's paged-attention forward executes it
(packed ``[1, T]`` inputs, ``PagedAttentionCache``, ``ContinuousBatchingIOs``), driven by our own
loop with no manager thread. These tests fail if a transformers upgrade changes that contract,
and check the per-token routing (``pa.route(..., packed=True)``) that packed sequences need (docs/serving.md, "Runner plan").
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import tiny_model
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.requests import FutureRequestState, RequestState

import paradapt as pa
from paradapt.serve import AdapterCache, Request, Scheduler, SchedulerConfig


def paged(model, max_batch_tokens: int):
    """transformers' paged KV cache and packed-batch builder, without the manager's thread."""
    gc = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=-1)
    cb = ContinuousBatchingConfig(
        auto_switch_to_flash=False, num_blocks=32, max_batch_tokens=max_batch_tokens, max_blocks_per_request=0
    )
    bp = model.init_continuous_batching(
        generation_config=gc, continuous_batching_config=cb
    )._create_batch_processor()
    return bp.cache, bp.inputs_and_outputs, bp.logit_processor


def alone(model, prompt, n, adapter=None, routed=True):
    """Greedy tokens of one request generated on its own (``routed``: the model has adapters)."""
    gc = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    with pa.route(model, [adapter]) if routed else contextlib.nullcontext():
        return model.generate(torch.tensor([prompt]), generation_config=gc)[0, len(prompt) :].tolist()


def forward(model, cache, io, lp, batch):
    """One packed step: ``batch`` is [(RequestState, tokens, samples_next)]; returns next tokens."""
    fut = []
    for st, tokens, samples in batch:
        st.tokens_to_process = tokens
        assert cache.can_store_request_tokens(st, len(tokens))  # allocates the pages
        fut.append(
            FutureRequestState(st, has_new_token=samples, complete_blocks={}, query_length=len(tokens))
        )
    num_q = sum(len(t) for _, t, _ in batch)
    io.prepare_batch_tensors(
        fut, lp, False, num_q, sum(f.state.position_offset for f in fut), use_padding=False
    )
    kw = io.get_model_kwargs()
    assert kw["input_ids"].shape == (1, num_q)  # packed: one row, every request's tokens
    samplers = sum(s for _, _, s in batch)  # logits_indices is sized per sequence; samplers come first
    return model(**kw).logits[0, kw["logits_indices"][:samplers]].argmax(-1).tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_scheduler_drives_the_paged_forward_and_matches_generate(family):
    """Chunked prefill (a 30-token prompt over a 16-token budget) and decodes packed together."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (5, 2, 12, 30, 7)]
    new = [6, 3, 8, 4, 9]
    cache, io, lp = paged(model, max_batch_tokens=16)
    sched = Scheduler(SchedulerConfig(token_budget=16, kv_tokens=256, max_running=4), AdapterCache({}, 1, 1))
    states, out = {}, {}
    for i, (p, n) in enumerate(zip(prompts, new, strict=True)):
        sched.add(Request(str(i), None, len(p), n, float(i)))
        states[str(i)] = RequestState(request_id=str(i), initial_tokens=p, max_new_tokens=n)
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
            for (st, _, _), tok in zip(
                [b for b in batch if b[2]], forward(model, cache, io, lp, batch), strict=True
            ):
                out[st.request_id].append(tok)
            for r in sched.complete(plan, now=0.0):
                cache.free_blocks(r.id)
    assert chunked
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
    cache, io, lp = paged(model, max_batch_tokens=64)
    states = [
        RequestState(request_id=str(i), initial_tokens=p, max_new_tokens=steps) for i, p in enumerate(prompts)
    ]
    out: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        for step in range(steps):
            batch = [(st, prompts[i] if step == 0 else [out[i][-1]], True) for i, st in enumerate(states)]
            with pa.route(model, adapters, packed=True, lengths=[len(t) for _, t, _ in batch]):
                toks = forward(model, cache, io, lp, batch)
            for i, t in enumerate(toks):
                out[i].append(t)
    assert out == ref
