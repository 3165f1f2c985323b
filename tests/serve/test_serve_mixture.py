"""Serving learned mixtures (issue 19): a mixture folder is a ``model`` like any adapter.

The engine brings a mixture's experts with it (the cache's ``needs``), runs its gates inside the
packed step next to plain adapters' rows, and a broken expert or a mixture it cannot serve fails
only that mixture's requests, naming the field or adapter at fault.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_serve_engine import alone

import paradapt as pa
from paradapt.bottleneck import Bottleneck
from paradapt.errors import AdapterNotFoundError, ConfigError
from paradapt.serve.cache import AdapterCache, AdapterPinnedError
from paradapt.serve.engine import AdapterLoadError, Engine, EngineConfig
from paradapt.serve.sampling import SamplingParams
from paradapt.serve.scheduler import RequestTooLargeError

EXPERTS = {
    "lo4": pa.LoRAConfig(r=4, init="random"),
    "lo2": pa.LoRAConfig(r=2, init="random"),
    "par": pa.ParallelConfig(r=8, init="random"),
    "par2": pa.ParallelConfig(r=4, init="random"),
}
MIXTURES = {
    "mix": pa.Mixture(experts=["lo4", "lo2"], top_k=1, init="random"),
    "mixp": pa.Mixture(experts=["par", "par2"], init="random"),  # dense softmax gate
}
ROOMY = EngineConfig(page_size=4, num_blocks=120, token_budget=16, max_running=6, max_slots=3, max_served=4)


def mixture_root(tmp_path, mixtures=MIXTURES):
    """A reference model with the experts and mixtures on it, each saved as a folder under ``tmp_path``."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    for name, cfg in EXPERTS.items():
        pa.add_adapter(model, name, cfg)
        pa.save_adapter(model, name, tmp_path / name)
    for name, cfg in mixtures.items():
        pa.add_mixture(model, name, cfg)
        pa.save_adapter(model, name, tmp_path / name)
    return model


def requests(names, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        plen = int(torch.randint(2, 26, (1,), generator=g))
        out.append((torch.randint(3, 96, (plen,), generator=g).tolist(), names[i % len(names)], 6))
    return out


def test_mixtures_and_plain_adapters_in_busy_steps_equal_each_request_alone(tmp_path, monkeypatch):
    """Greedy tokens equal each request alone; in a step shared with other rows a mixture's
    experts (all bottlenecks here) run in the banks: no expert module is called there."""
    ref_model = mixture_root(tmp_path)
    reqs = requests(["mix", "lo4", "mixp", None, "par2", "mix"])
    ref = [alone(ref_model, p, n, a) for p, a, n in reqs]
    engine = Engine(tiny_model("llama"), tmp_path, ROOMY)
    module_calls, step_adapters = [], []
    delta, batch = Bottleneck.delta, engine.runner._batch
    monkeypatch.setattr(Bottleneck, "delta", lambda self, src: module_calls.append(1) or delta(self, src))

    def recording(step):
        out = batch(step)
        step_adapters.append({seq.adapter for seq, _, _ in out})
        return out

    monkeypatch.setattr(engine.runner, "_batch", recording)
    handles = [engine.add_request(p, a, SamplingParams(max_new_tokens=n)) for p, a, n in reqs]
    shared = 0
    while engine.has_work():
        step_adapters.clear()
        before = len(module_calls)
        engine.step()
        here = step_adapters[0] if step_adapters else set()
        if {"mix", "mixp"} & here and len(here) > 1:
            shared += 1
            assert len(module_calls) == before, here  # the mixture's experts ran in the banks
    assert [h.status for h in handles] == ["finished"] * len(reqs)
    assert [h.tokens for h in handles] == ref
    assert shared  # a mixture's rows ran in steps with other adapters' rows
    # the cache counted each mixture with its experts: 3 slots, a mixture of two needs all three
    assert engine.cache.stats.device_evictions > 0
    assert engine.cache.needs("mix") == ("lo4", "lo2")


def test_expert_stays_on_device_while_its_mixture_is_there():
    cache = AdapterCache({"a": 1, "b": 1, "c": 1}, max_served=4, max_slots=3)
    cache.add_adapter("m", 1, needs=["a", "b"])
    assert cache.fits(["m"]) and not cache.fits(["m", "c"])
    res = cache.ensure_resident(["m"])
    assert [mv.adapter for mv in res.moves if mv.op == "load_device"] == ["a", "b", "m"]
    cache.pin("m")
    assert cache.pinned("a") and cache.pinned("b")
    assert cache.ensure_resident(["c"]).missing == ("c",)  # every slot held by the pinned mixture
    cache.unpin("m")
    assert not cache.pinned("a")
    res = cache.ensure_resident(["c"])
    evicted = [mv.adapter for mv in res.moves if mv.op == "evict_device"]
    assert evicted == ["m"]  # the experts are LRU, but the mixture needing them leaves first
    with pytest.raises(AdapterPinnedError, match="expert of mixture 'm'"):
        cache.remove_adapter("a")
    cache.remove_adapter("m")
    cache.remove_adapter("a")


def test_cache_refuses_unknown_needs_and_chains():
    cache = AdapterCache({"a": 1, "b": 1}, max_served=4, max_slots=4)
    with pytest.raises(AdapterNotFoundError, match="needs 'x'"):
        cache.add_adapter("m", 1, needs=["a", "x"])
    cache.add_adapter("m", 1, needs=["a", "b"])
    with pytest.raises(ConfigError, match="needs adapters itself"):
        cache.add_adapter("mm", 1, needs=["m", "a"])
    assert "mm" not in cache


def test_a_broken_expert_fails_only_its_mixture_and_itself(tmp_path):
    mixture_root(tmp_path)
    (tmp_path / "lo2" / "adapter.safetensors").write_bytes(b"not a safetensors file")
    engine = Engine(tiny_model("llama"), tmp_path, ROOMY)
    bad = engine.add_request([5, 6, 7], "mix", SamplingParams(max_new_tokens=3))
    good = engine.add_request([5, 6, 7], "mixp", SamplingParams(max_new_tokens=3))
    base = engine.add_request([5, 6, 7], None, SamplingParams(max_new_tokens=3))
    engine.run()
    assert bad.status == "failed" and isinstance(bad.error, AdapterLoadError)
    assert "'mix'" in str(bad.error) and "'lo2'" in str(bad.error)
    assert good.status == "finished" and base.status == "finished"
    assert "mix" not in engine.cache and "lo2" not in engine.cache  # forgotten: a later request retries
    assert "mix" not in pa.list_adapters(engine.model)


def test_missing_expert_folder_is_named(tmp_path):
    mixture_root(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "lo4")
    engine = Engine(tiny_model("llama"), tmp_path, ROOMY)
    with pytest.raises(AdapterNotFoundError, match=r"mixture 'mix', experts\[0\].*'lo4'"):
        engine.add_request([5, 6], "mix", SamplingParams(max_new_tokens=2))
    assert "mix" not in engine.cache
    h = engine.add_request([5, 6], "mixp", SamplingParams(max_new_tokens=2))
    engine.run()
    assert h.status == "finished"


def test_sequence_mixture_is_refused_by_the_decoder_engine(tmp_path):
    seq = {"seq": pa.Mixture(experts=["lo4", "lo2"], granularity="sequence", init="random")}
    mixture_root(tmp_path, seq)
    engine = Engine(tiny_model("llama"), tmp_path, ROOMY)
    h = engine.add_request([5, 6, 7], "seq", SamplingParams(max_new_tokens=2))
    other = engine.add_request([5, 6, 7], "lo4", SamplingParams(max_new_tokens=2))
    engine.run()
    assert h.status == "failed" and "granularity" in str(h.error)
    assert other.status == "finished"


def test_mixture_larger_than_the_slots_is_refused_at_once(tmp_path):
    mixture_root(tmp_path)
    engine = Engine(tiny_model("llama"), tmp_path, EngineConfig(page_size=4, num_blocks=40, max_slots=2))
    with pytest.raises(RequestTooLargeError, match="mixture 'mix' needs 3 adapter slots"):
        engine.add_request([5, 6], "mix", SamplingParams(max_new_tokens=2))


def test_unloading_an_expert_of_a_known_mixture_is_refused(tmp_path):
    mixture_root(tmp_path)
    engine = Engine(tiny_model("llama"), tmp_path, ROOMY)
    engine.load_adapter("mix")
    with pytest.raises(AdapterPinnedError, match="expert of mixture 'mix'"):
        engine.unload_adapter("lo4")
    engine.unload_adapter("mix")
    engine.unload_adapter("lo4")
    assert "lo4" not in engine.cache


def test_mixture_over_http_equals_generate_alone(tmp_path):
    """``model: <mixture>`` through /v1/completions, next to its experts and the base model;
    /v1/models lists it; a mixture naming a missing expert is a 404 that names the expert."""
    from conftest import asset_path, completion_text, require_asset
    from fastapi.testclient import TestClient
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from paradapt.serve.app import create_app

    stories = asset_path("models", "stories260k-hf")
    require_asset(stories)
    ref = AutoModelForCausalLM.from_pretrained(stories, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(stories)
    torch.manual_seed(0)
    for name, cfg in (("lo4", EXPERTS["lo4"]), ("lo2", EXPERTS["lo2"])):
        pa.add_adapter(ref, name, cfg)
        pa.save_adapter(ref, name, tmp_path / name)
    pa.add_mixture(ref, "mix", pa.Mixture(experts=["lo4", "lo2"], top_k=1, init="random"))
    pa.save_adapter(ref, "mix", tmp_path / "mix")
    broken = tmp_path / "broken"
    broken.mkdir()
    cfg_text = (tmp_path / "mix" / "adapter_config.json").read_text().replace('"lo2"', '"gone"')
    (broken / "adapter_config.json").write_text(cfg_text)
    (broken / "adapter.safetensors").write_bytes((tmp_path / "mix" / "adapter.safetensors").read_bytes())

    model = AutoModelForCausalLM.from_pretrained(stories, attn_implementation="sdpa").eval()
    engine = Engine(model, tmp_path, ROOMY, tokenizer=tok)
    with TestClient(create_app(engine, model_name="stories")) as client:
        assert "mix" in [m["id"] for m in client.get("/v1/models").json()["data"]]
        for name in ("mix", "lo2", "mix", "stories"):
            r = client.post(
                "/v1/completions",
                json={"model": name, "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0},
            )
            assert r.status_code == 200, r.text
            ids = tok("Once upon a time")["input_ids"]
            gc = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=0)
            with pa.route(ref, [None if name == "stories" else name]):
                out = ref.generate(torch.tensor([ids]), generation_config=gc)[0, len(ids) :].tolist()
            assert r.json()["choices"][0]["text"] == completion_text(tok, ids, out)
        r = client.post("/v1/completions", json={"model": "broken", "prompt": "Once", "max_tokens": 2})
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert "'gone'" in err["message"] and "experts[1]" in err["message"]
        assert str(tmp_path) not in err["message"]
