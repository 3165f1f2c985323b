"""Prefix caching in the Engine: requests that share a prompt start under the same adapter share
its KV pages and skip its prefill, and nothing else changes.

Every request's greedy output with the cache equals its output alone via ``model.generate``;
pages never cross adapters, nor outlive an adapter's reload; cached pages are evicted when a
running request needs room; requests asking for prompt log-probabilities run their whole prompt.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_serve_engine import alone

import paradapt as pa
from paradapt.serve.engine import Engine, EngineConfig
from paradapt.serve.sampling import SamplingParams

ADAPTERS = {
    "lo": pa.LoRAConfig(r=4, init="random"),
    "par": pa.ParallelConfig(r=8, init="random"),
    "pre": pa.PrefixConfig(num_virtual_tokens=3, reparam=False),
}
PAGE = 4
CONFIG = EngineConfig(
    page_size=PAGE, num_blocks=96, token_budget=24, max_running=6, max_slots=3, max_served=3
)
SYSTEM = [5, 9, 17, 33, 41, 2 + 60, 7, 8, 12, 70, 71, 72, 80, 81]  # 14 tokens: 3 full pages


def saved(tmp_path, family: str = "llama"):
    model = tiny_model(family)
    for name, cfg in ADAPTERS.items():
        pa.add_adapter(model, name, cfg)
        pa.save_adapter(model, name, tmp_path / name)
    return model


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts that start with SYSTEM and end with their own 1-9 tokens."""
    g = torch.Generator().manual_seed(seed)
    return [
        SYSTEM + torch.randint(3, 96, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def run(engine: Engine, reqs: list[tuple[list[int], str | None, int]], **params):
    handles = [engine.add_request(p, a, SamplingParams(max_new_tokens=n, **params)) for p, a, n in reqs]
    engine.run()
    assert all(h.status == "finished" for h in handles), [(h.status, h.error) for h in handles]
    return handles


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shared_prefixes_are_served_from_the_cache_and_every_answer_is_unchanged(tmp_path, family):
    ref = saved(tmp_path, family)
    engine = Engine(tiny_model(family), tmp_path, CONFIG)
    names = [*ADAPTERS, None]
    first = [(p, names[i % 4], 5) for i, p in enumerate(prompts(8))]
    second = [(p, names[i % 4], 5) for i, p in enumerate(prompts(8, seed=1))]
    handles = run(engine, first) + run(engine, second)  # the second wave finds the first's pages
    for h, (p, a, n) in zip(handles, first + second, strict=True):
        assert h.tokens == alone(ref, p, n, a), (a, p)
    late = handles[8:]
    assert all(h.cached_tokens == 12 for h in late)  # SYSTEM's 3 full pages, under each one's adapter
    assert engine.prefix_stats["hits"] >= 8 * 12
    assert engine.prefix_stats["queries"] == sum(len(p) for p, _, _ in first + second)


def test_the_same_prompt_under_another_adapter_never_reads_its_pages(tmp_path):
    ref = saved(tmp_path)
    engine = Engine(tiny_model("llama"), tmp_path, CONFIG)
    p = prompts(1)[0]
    (a,) = run(engine, [(p, "lo", 6)])
    (b,) = run(engine, [(p, "par", 6)])
    (base,) = run(engine, [(p, None, 6)])
    (again,) = run(engine, [(p, "lo", 6)])
    assert (a.cached_tokens, b.cached_tokens, base.cached_tokens) == (0, 0, 0)
    assert again.cached_tokens == (len(p) - 1) // PAGE * PAGE
    for h, name in ((a, "lo"), (b, "par"), (base, None), (again, "lo")):
        assert h.tokens == alone(ref, p, 6, name)


def test_a_reloaded_adapter_does_not_read_pages_of_its_old_weights(tmp_path):
    ref = saved(tmp_path)
    engine = Engine(tiny_model("llama"), tmp_path, CONFIG)
    p = prompts(1)[0]
    run(engine, [(p, "lo", 4)])
    torch.manual_seed(7)
    pa.remove_adapter(ref, "lo")
    pa.add_adapter(ref, "lo", pa.LoRAConfig(r=4, init="random"))
    pa.save_adapter(ref, "lo", tmp_path / "lo")
    engine.load_adapter("lo")  # rewritten on disk: read again
    (h,) = run(engine, [(p, "lo", 4)])
    assert h.cached_tokens == 0
    assert h.tokens == alone(ref, p, 4, "lo")


def test_cached_pages_are_evicted_when_a_request_needs_room(tmp_path):
    ref = saved(tmp_path)
    small = EngineConfig(
        page_size=PAGE, num_blocks=12, token_budget=24, max_running=2, max_slots=3, max_served=3
    )
    engine = Engine(tiny_model("llama"), tmp_path, small)
    g = torch.Generator().manual_seed(3)
    reqs = [(torch.randint(3, 96, (17,), generator=g).tolist(), "lo", 6) for _ in range(10)]
    for p, a, n in reqs:  # one at a time: each leaves 4 pages cached, the pool holds 12
        (h,) = run(engine, [(p, a, n)])
        assert h.tokens == alone(ref, p, n, a)
        assert engine.runner.pages_in_use() == 0
    assert 0 < engine.runner.kv.cached_pages <= 12
    (h,) = run(engine, [(reqs[-1][0], "lo", 6)])  # the most recent prompt is still cached
    assert h.cached_tokens == 16 and h.tokens == alone(ref, reqs[-1][0], 6, "lo")


def test_prompt_logprobs_requests_run_their_whole_prompt(tmp_path):
    saved(tmp_path)
    engine = Engine(tiny_model("llama"), tmp_path, CONFIG)
    p = prompts(1)[0]
    (plain,) = run(engine, [(p, None, 2)])
    (scored,) = run(engine, [(p, None, 2)], prompt_logprobs=0)
    assert scored.cached_tokens == 0 and len(scored.prompt_logprobs) == len(p)
    assert scored.tokens == plain.tokens


def test_prefix_caching_off_shares_nothing(tmp_path):
    saved(tmp_path)
    for config in (
        EngineConfig(page_size=PAGE, num_blocks=96, prefix_caching=False),
        EngineConfig(page_size=PAGE, num_blocks=96, check_adapter_weights=True),
    ):
        engine = Engine(tiny_model("llama"), tmp_path, config)
        p = prompts(1)[0]
        run(engine, [(p, "lo", 3)])
        (h,) = run(engine, [(p, "lo", 3)])
        assert h.cached_tokens == 0 and engine.prefix_stats == {"queries": 0, "hits": 0}
        assert engine.runner.kv.cached_pages == 0


def test_prefix_caching_must_be_a_bool():
    with pytest.raises(pa.ConfigError, match="prefix_caching"):
        EngineConfig(prefix_caching="yes")


def test_http_usage_and_metrics_report_the_cached_tokens(tmp_path):
    from fastapi.testclient import TestClient

    from paradapt.serve.app import create_app

    saved(tmp_path)
    engine = Engine(tiny_model("llama"), tmp_path, CONFIG)
    p = prompts(1)[0]
    body = {"model": "lo", "prompt": p, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    with TestClient(create_app(engine, model_name="tiny")) as c:
        first, second = (c.post("/v1/completions", json=body).json() for _ in range(2))
        stream = c.post(
            "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
        )
        metrics = c.get("/metrics").text
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    hit = (len(p) - 1) // PAGE * PAGE  # all its full pages but the one holding its last token
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": hit}
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    last = [line for line in stream.text.splitlines() if line.startswith("data: {")][-1]
    assert f'"prompt_tokens_details": {{"cached_tokens": {hit}}}' in last
    assert f"paradapt_prefix_cache_queries_total {3 * len(p)}.0" in metrics
    assert f"paradapt_prefix_cache_hits_total {2 * hit}.0" in metrics


def test_a_next_chat_turn_reads_the_pages_of_the_answer_it_continues(tmp_path):
    ref = saved(tmp_path)
    engine = Engine(tiny_model("llama"), tmp_path, CONFIG)
    p = prompts(1)[0]
    (turn1,) = run(engine, [(p, "par", 12)])
    follow = p + turn1.tokens + [11, 12, 13]
    (turn2,) = run(engine, [(follow, "par", 5)])
    # every page of the first turn's KV (prompt and answer; its last token never got KV) is shared
    assert turn2.cached_tokens == (len(p) + 12 - 1) // PAGE * PAGE > len(p)
    assert turn2.tokens == alone(ref, follow, 5, "par")


def test_a_folder_rewritten_while_evicted_is_read_again_without_its_old_pages(tmp_path):
    ref = saved(tmp_path)
    one = EngineConfig(page_size=PAGE, num_blocks=96, token_budget=24, max_running=6, max_slots=1, max_served=1)
    engine = Engine(tiny_model("llama"), tmp_path, one)
    p = prompts(1)[0]
    run(engine, [(p, "lo", 4)])
    run(engine, [(p, "par", 4)])  # one adapter in host memory: "lo" is evicted
    assert "lo" not in engine.cache.on_host
    torch.manual_seed(11)
    pa.remove_adapter(ref, "lo")
    pa.add_adapter(ref, "lo", pa.LoRAConfig(r=4, init="random"))
    pa.save_adapter(ref, "lo", tmp_path / "lo")  # rewritten on disk, no load_adapter call
    (h,) = run(engine, [(p, "lo", 4)])  # read again on demand: the new weights
    assert h.cached_tokens == 0
    assert h.tokens == alone(ref, p, 4, "lo")


def test_a_cache_salt_shares_pages_only_with_requests_of_the_same_salt(tmp_path):
    """vLLM's ``cache_salt``: one tenant's requests cannot find another tenant's pages (whose
    hits would tell it what the other sent), nor an unsalted request's; the same salt shares."""
    ref = saved(tmp_path)
    engine = Engine(tiny_model("llama"), tmp_path, CONFIG)
    p = prompts(1)[0]
    (a,) = run(engine, [(p, "lo", 6)], cache_salt="tenant-a")
    (b,) = run(engine, [(p, "lo", 6)], cache_salt="tenant-b")
    (plain,) = run(engine, [(p, "lo", 6)])
    (again,) = run(engine, [(p, "lo", 6)], cache_salt="tenant-a")
    (base_a,) = run(engine, [(p, None, 6)], cache_salt="tenant-a")
    assert (a.cached_tokens, b.cached_tokens, plain.cached_tokens, base_a.cached_tokens) == (0, 0, 0, 0)
    assert again.cached_tokens == (len(p) - 1) // PAGE * PAGE > 0  # the same prompt: all but its last page
    assert again.tokens == a.tokens == alone(ref, p, 6, "lo")
    for bad in ("", 3, "x" * 1025):
        with pytest.raises(pa.ConfigError, match="cache_salt"):
            SamplingParams(cache_salt=bad)
