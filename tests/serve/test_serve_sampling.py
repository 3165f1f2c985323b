"""Sampling: filters, greedy, and one seeded stream per request (independent of batch-mates)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import paradapt as pa
from paradapt.serve.engine import Engine, EngineConfig
from paradapt.serve.sampling import (
    History,
    SamplingParams,
    filter_logits,
    logprobs_of,
    make_generator,
    process_logits,
    sample,
)


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0, 0.5])
    out = filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(out).tolist() == [False, True, False, True, False]


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert torch.isfinite(filter_logits(logits, 0, 0.5)).tolist() == [True, False, False, False]
    assert torch.isfinite(filter_logits(logits, 0, 0.6)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, 0, 0.9)).tolist() == [True, True, True, False]
    shuffled = logits[[2, 0, 3, 1]]  # order does not matter
    assert torch.isfinite(filter_logits(shuffled, 0, 0.6)).tolist() == [False, True, False, True]


def test_greedy_is_argmax_and_needs_no_generator():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams()] * 3
    assert make_generator(params[0]) is None
    assert sample(logits, params, [None] * 3) == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_follows_the_filters():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=0.8, top_k=5, seed=7)
    draws = [sample(logits[None], [p], [make_generator(p)])[0] for _ in range(3)]
    assert len(set(draws)) == 1
    g = make_generator(p)
    many = {sample(logits[None], [p], [g])[0] for _ in range(200)}
    assert many <= set(torch.topk(logits, 5).indices.tolist()) and len(many) > 1


@pytest.mark.parametrize(
    ("field", "kw"),
    [
        ("temperature", {"temperature": -1}),
        ("top_p", {"top_p": 0}),
        ("top_p", {"top_p": 1.5}),
        ("top_k", {"top_k": -2}),
        ("max_new_tokens", {"max_new_tokens": 0}),
        ("seed", {"seed": -1}),
        ("stop", {"stop": ("",)}),
        ("presence_penalty", {"presence_penalty": 2.5}),
        ("frequency_penalty", {"frequency_penalty": -3}),
        ("repetition_penalty", {"repetition_penalty": 0}),
        ("min_tokens", {"min_tokens": 5, "max_new_tokens": 4}),
        ("logit_bias", {"logit_bias": ((3, 101.0),)}),
        ("logprobs", {"logprobs": 21}),
        ("prompt_logprobs", {"prompt_logprobs": -1}),
    ],
)
def test_bad_params_name_the_field(field, kw):
    with pytest.raises(pa.ConfigError, match=field):
        SamplingParams(**kw)


def test_seeded_request_is_independent_of_its_batch_mates(tmp_path):
    model = tiny_model("llama")
    pa.add_adapter(model, "lo", pa.LoRAConfig(r=4, init="random"))
    pa.save_adapter(model, "lo", tmp_path / "lo")
    cfg = EngineConfig(page_size=4, num_blocks=64, token_budget=16, max_running=6, max_slots=1, max_served=1)
    params = SamplingParams(max_new_tokens=12, temperature=1.3, top_p=0.95, seed=123, ignore_eos=True)

    def run(mates: int) -> list[int]:
        engine = Engine(tiny_model("llama"), tmp_path, cfg)
        for i in range(mates):  # sampled batch-mates with other seeds, before and after it
            engine.add_request(
                [3 + i, 4, 5 + i], "lo", SamplingParams(max_new_tokens=10, temperature=1.0, seed=i)
            )
        h = engine.add_request([9, 8, 7, 6], "lo", params)
        for i in range(mates):
            engine.add_request(
                list(range(5, 20 + i)), None, SamplingParams(max_new_tokens=5, temperature=2.0)
            )
        engine.run()
        return h.tokens

    solo = run(0)
    assert len(solo) == 12
    assert run(3) == solo == run(0)
    other = Engine(tiny_model("llama"), tmp_path, cfg)
    h = other.add_request(
        [9, 8, 7, 6], "lo", SamplingParams(max_new_tokens=12, temperature=1.3, top_p=0.95, seed=124)
    )
    other.run()
    assert h.tokens != solo  # the seed matters


def test_logit_processing_follows_vllm_and_logprobs_are_the_raw_distribution():
    logits = torch.tensor([2.0, -1.0, 0.5, 1.0, 0.0])
    hist = History(prompt=[0], output=[2, 2, 3], eos=frozenset({4}))
    p = SamplingParams(
        repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((1, 3.0),)
    )
    out = process_logits(logits, p, hist)
    # 0: repeated in the prompt, positive -> /2; 1: biased +3; 2: seen twice in the output
    # (positive /2, then -0.25*2 - 0.5); 3: once (/2, -0.25 - 0.5); 4: untouched
    assert out.tolist() == pytest.approx([1.0, 2.0, 0.25 - 1.0, 0.5 - 0.75, 0.0])
    held = process_logits(logits, SamplingParams(min_tokens=4), hist)  # 3 < 4 tokens: EOS held back
    assert held[4] == float("-inf") and held[:4].tolist() == logits[:4].tolist()
    assert process_logits(logits, SamplingParams(), hist) is logits  # nothing asked: the fast path
    (lp,) = logprobs_of(logits[None], [2], [2])
    ref = logits.log_softmax(-1)
    assert lp.token == 2 and lp.logprob == pytest.approx(float(ref[2]))
    assert [t for t, _ in lp.top] == [0, 3] and [v for _, v in lp.top] == pytest.approx(ref[[0, 3]].tolist())
    rows = torch.stack([logits, logits])
    greedy, biased = SamplingParams(), SamplingParams(logit_bias=((4, 10.0),))
    assert sample(rows, [greedy, biased], [None, None], [None, hist]) == [0, 4]
