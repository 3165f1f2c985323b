"""The Engine end to end: Scheduler + AdapterCache (real adapter folders) + Runner (packed paged forward).

Every request's greedy output in a busy mixed batch must equal its output alone via
``model.generate`` with its adapter.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_model
from transformers import GenerationConfig

import paradapt as pa
from paradapt import heads
from paradapt.banks import Bank
from paradapt.serve.cache import AdapterPinnedError
from paradapt.serve.engine import AdapterLoadError, EncoderEngine, Engine, EngineConfig
from paradapt.serve.sampling import SamplingParams
from paradapt.serve.scheduler import RequestTooLargeError

ADAPTERS = {
    "lo4": pa.LoRAConfig(r=4, init="random"),
    "lo8": pa.LoRAConfig(r=8, init="random", targets="all-linear"),
    "lo2": pa.LoRAConfig(r=2, init="random"),
    "par": pa.ParallelConfig(r=16, init="random"),
    "ser": pa.SeriesConfig(r=4, init="random"),
    "ia3": pa.IA3Config(init="random"),
}


def adapter_root(tmp_path, family: str):
    """A reference model with every adapter attached, and the adapters saved under ``tmp_path``."""
    model = tiny_model(family)
    for name, cfg in ADAPTERS.items():
        pa.add_adapter(model, name, cfg)
        pa.save_adapter(model, name, tmp_path / name)
    return model


def alone(model, prompt: list[int], n: int, adapter: str | None) -> list[int]:
    """Greedy tokens of one request generated on its own with its adapter (stops at EOS like the engine)."""
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=0)
    with pa.route(model, [adapter]):
        return model.generate(torch.tensor([prompt]), generation_config=gc)[0, len(prompt) :].tolist()


def workload(seed: int = 0, n: int = 14, max_prompt: int = 30):
    g = torch.Generator().manual_seed(seed)
    names = [*ADAPTERS, None]
    reqs = []
    for i in range(n):
        plen = int(torch.randint(1, max_prompt + 1, (1,), generator=g))
        prompt = torch.randint(3, 96, (plen,), generator=g).tolist()
        reqs.append((prompt, names[i % len(names)], int(torch.randint(1, 12, (1,), generator=g))))
    return reqs


BUSY = EngineConfig(page_size=4, num_blocks=80, token_budget=16, max_running=6, max_slots=2, max_served=3)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_busy_mixed_batch_equals_each_request_alone(tmp_path, family, monkeypatch):
    # the engine routes with fixed_weights (its adapters come from files): loads, evictions and
    # reloads below must still give each request its own adapter's tokens without re-checking a
    # bank slot's source tensors (counted, not raised: a raising step is rerun row by row)
    rechecks = []
    monkeypatch.setattr(Bank, "fresh", lambda *a: rechecks.append(a) or True)
    ref_model = adapter_root(tmp_path, family)
    reqs = workload()
    assert any(len(p) > BUSY.token_budget for p, _, _ in reqs)  # some prompts are chunked
    ref = [alone(ref_model, p, n, a) for p, a, n in reqs]
    engine = Engine(tiny_model(family), tmp_path, BUSY)
    handles = [engine.add_request(p, a, SamplingParams(max_new_tokens=n)) for p, a, n in reqs]
    steps, widest = 0, 0
    while engine.has_work():
        widest = max(widest, len(engine.scheduler.running))
        engine.step()
        steps += 1
    assert [h.tokens for h in handles] == ref
    assert all(h.status == "finished" for h in handles)
    assert widest >= 4  # requests of several adapters really shared steps
    assert rechecks == []
    stats = engine.cache.stats
    assert stats.device_evictions > 0 and stats.host_evictions > 0  # slots < adapters: loads and evictions
    assert engine.runner.pages_in_use() == 0 and engine.scheduler.kv_used == 0
    assert sorted(pa.list_adapters(engine.model)) == sorted(engine.cache.on_device)  # device tier == attached
    assert sorted(engine.store.host) == sorted(engine.cache.on_host)  # host tier == CPU state dicts


def test_streaming_callback_and_iterator_see_every_token(tmp_path):
    ref_model = adapter_root(tmp_path, "llama")
    engine = Engine(tiny_model("llama"), tmp_path, BUSY)
    seen: list[int] = []
    a = engine.add_request(
        [5, 9, 11, 3], "par", SamplingParams(max_new_tokens=6), on_token=lambda h, t: seen.append(t)
    )
    b = engine.add_request([7, 8], "lo4", SamplingParams(max_new_tokens=9))
    streamed = list(engine.stream(b.id))
    engine.run()
    assert streamed == b.tokens == alone(ref_model, [7, 8], 9, "lo4")
    assert seen == a.tokens == alone(ref_model, [5, 9, 11, 3], 6, "par")


def test_cancel_frees_the_kv_pages_and_the_others_finish(tmp_path):
    ref_model = adapter_root(tmp_path, "llama")
    engine = Engine(tiny_model("llama"), tmp_path, BUSY)
    keep = engine.add_request([4, 5, 6, 7, 8], "lo8", SamplingParams(max_new_tokens=8))
    drop = engine.add_request(list(range(3, 23)), "ser", SamplingParams(max_new_tokens=10))
    for _ in range(3):
        engine.step()
    assert drop.status == "running" and engine.runner.pages_in_use(drop.id) > 0
    total, reserved = engine.runner.pages_in_use(), engine.scheduler.kv_used
    held = engine.runner.pages_in_use(drop.id)
    assert engine.cancel(drop.id)
    assert engine.runner.pages_in_use(drop.id) == 0
    assert engine.runner.pages_in_use() == total - held
    assert engine.scheduler.kv_used < reserved
    assert drop.status == "cancelled" and drop.finish_reason == "cancelled"
    assert not engine.cancel(drop.id)  # already done
    engine.run()
    assert keep.tokens == alone(ref_model, [4, 5, 6, 7, 8], 8, "lo8")
    assert engine.runner.pages_in_use() == 0


def test_corrupt_adapter_folder_fails_only_its_requests(tmp_path):
    ref_model = adapter_root(tmp_path, "gpt2")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tmp_path / "lo4" / "adapter_config.json").read_text())
    (bad / "adapter.safetensors").write_bytes(b"\x00not safetensors at all")
    (tmp_path / "empty").mkdir()
    engine = Engine(tiny_model("gpt2"), tmp_path, BUSY)
    reqs = [([5, 6, 7], "lo4", 5), ([8, 9], "bad", 4), ([10, 11, 12, 13], None, 6), ([3, 4], "bad", 2)]
    empty = engine.add_request([5, 6], "empty", SamplingParams(max_new_tokens=2))
    handles = [engine.add_request(p, a, SamplingParams(max_new_tokens=n)) for p, a, n in reqs]
    engine.run()
    for h, (p, a, n) in zip(handles, reqs, strict=True):
        if a == "bad":
            assert h.status == "failed" and isinstance(h.error, AdapterLoadError)
            assert "'bad'" in str(h.error) and "adapter.safetensors" in str(h.error)
            assert h.tokens == []
        else:
            assert h.status == "finished" and h.tokens == alone(ref_model, p, n, a)
    assert empty.status == "failed" and "adapter_config.json: missing" in str(empty.error)
    assert "bad" not in engine.cache and "bad" not in pa.list_adapters(engine.model)
    assert engine.runner.pages_in_use() == 0
    late = engine.add_request([5, 5], "bad", SamplingParams(max_new_tokens=2))  # tried again, fails again
    ok = engine.add_request([6, 6], "lo4", SamplingParams(max_new_tokens=2))
    engine.run()
    assert late.status == "failed" and ok.tokens == alone(ref_model, [6, 6], 2, "lo4")


def test_adapter_names_cannot_leave_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    adapter_root(outside, "llama")
    os.symlink(outside / "lo4", root / "escape")
    engine = Engine(tiny_model("llama"), root, BUSY)
    for name in ("../outside/lo4", "lo4/../../outside", "/etc", "..", "a b"):
        with pytest.raises(pa.ConfigError, match="adapter"):
            engine.add_request([1, 2], name)
    with pytest.raises(pa.ConfigError, match="outside the adapter root"):
        engine.add_request([1, 2], "escape")
    with pytest.raises(pa.AdapterNotFoundError, match="nope"):
        engine.add_request([1, 2], "nope")
    assert not engine.has_work()


def test_prefix_adapter_in_a_busy_step_equals_it_alone(tmp_path):
    model = tiny_model("llama")
    pa.add_adapter(model, "pre", pa.PrefixConfig(num_virtual_tokens=2, init="random"))
    pa.save_adapter(model, "pre", tmp_path / "pre")
    ref = alone(model, [5, 6, 7], 4, "pre")
    engine = Engine(tiny_model("llama"), tmp_path, BUSY)
    others = [engine.add_request([1 + i, 2, 3], None, SamplingParams(max_new_tokens=4)) for i in range(3)]
    h = engine.add_request([5, 6, 7], "pre", SamplingParams(max_new_tokens=4))
    engine.run()
    assert h.status == "finished" and h.tokens == ref
    assert all(o.status == "finished" for o in others)


class CharTokenizer:
    """Decodes ids as ``<id>`` so stop strings can be matched exactly."""

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def test_stop_strings_and_eos_end_a_request(tmp_path):
    ref_model = adapter_root(tmp_path, "llama")
    full = alone(ref_model, [9, 8, 7], 10, "lo2")
    k = next(i for i, t in enumerate(full) if i >= 2 and t not in full[:i])
    engine = Engine(tiny_model("llama"), tmp_path, BUSY, tokenizer=CharTokenizer())
    s = engine.add_request([9, 8, 7], "lo2", SamplingParams(max_new_tokens=10, stop=(f"<{full[k]}>",)))
    j = next(i for i, t in enumerate(full) if i >= 1 and t not in full[:i])
    e = engine.add_request([9, 8, 7], "lo2", SamplingParams(max_new_tokens=10, eos_token_id=full[j]))
    engine.run()
    assert s.tokens == full[: k + 1] and s.finish_reason == "stop"
    assert s.text == "".join(f"<{t}>" for t in full[:k])
    # two stop strings: the text is cut at the earliest one in the text, whatever their list order
    # (token k completes both "<N>" and "N>"; no earlier token's text contains "N>")
    k = next(i for i, t in enumerate(full) if not any(str(u).endswith(str(t)) for u in full[:i]))
    engine = Engine(tiny_model("llama"), tmp_path, BUSY, tokenizer=CharTokenizer())
    stops = (f"{full[k]}>", f"<{full[k]}>")  # the first listed starts one character later in the text
    two = engine.add_request([9, 8, 7], "lo2", SamplingParams(max_new_tokens=10, stop=stops))
    engine.run()
    assert two.text == "".join(f"<{t}>" for t in full[:k]) and two.finish_reason == "stop"
    assert e.tokens == full[: j + 1] and e.finish_reason == "eos"
    assert e.text == "".join(f"<{t}>" for t in full[:j])  # the EOS token's text is not in the answer
    with pytest.raises(pa.ConfigError, match="stop"):
        Engine(tiny_model("llama"), tmp_path, BUSY).add_request([1], None, SamplingParams(stop=("x",)))


def test_engine_refuses_bad_requests_by_field(tmp_path):
    engine = Engine(tiny_model("llama"), tmp_path, BUSY)
    with pytest.raises(pa.ConfigError, match="prompt"):
        engine.add_request([], None)
    with pytest.raises(pa.ConfigError, match="prompt"):
        engine.add_request("text without a tokenizer", None)
    vocab, positions = engine.model.config.vocab_size, engine.model.config.max_position_embeddings
    with pytest.raises(pa.ConfigError, match="prompt.*vocabulary"):
        engine.add_request([1, vocab], None)
    with pytest.raises(pa.ConfigError, match="prompt.*vocabulary"):
        engine.add_request([-1], None)
    with pytest.raises(pa.ConfigError, match="max_tokens.*positions"):
        engine.add_request([1] * positions, None, SamplingParams(max_new_tokens=1))
    with pytest.raises(pa.ConfigError, match="max_running"):
        EngineConfig(max_running=0)
    engine.add_request([1, 2], None, request_id="x")
    with pytest.raises(pa.ConfigError, match="'x'"):
        engine.add_request([1, 2], None, request_id="x")


# -- encoders -----------------------------------------------------------------------------


def encoder_root(tmp_path):
    model = tiny_model("bert")
    pa.add_adapter(model, "sent", pa.LoRAConfig(r=4, init="random", head={"labels": ["neg", "pos"]}))
    pa.add_adapter(model, "topic", pa.ParallelConfig(r=8, init="random", head={"labels": ["a", "b", "c"]}))
    pa.add_adapter(model, "nohead", pa.LoRAConfig(r=2, init="random"))
    for name in ("sent", "topic", "nohead"):
        pa.save_adapter(model, name, tmp_path / name)
    return model


def test_encoder_classify_and_embed_equal_each_text_alone(tmp_path):
    ref_model = encoder_root(tmp_path)
    g = torch.Generator().manual_seed(4)
    texts = [torch.randint(3, 96, (int(n),), generator=g).tolist() for n in (5, 12, 3, 9, 7, 2, 11)]
    names = ["sent", "topic", "sent", "topic", "sent", None, "topic"]
    engine = EncoderEngine(
        tiny_model("bert"), tmp_path, EngineConfig(token_budget=32, max_running=4, max_slots=2)
    )
    handles = [
        engine.add_request(t, a, task="classify" if a else "embed") for t, a in zip(texts, names, strict=True)
    ]
    bad = engine.add_request([4, 5, 6], "nohead")
    engine.run()
    for h, t, a in zip(handles, texts, names, strict=True):
        with torch.no_grad(), pa.route(ref_model, a):
            hidden = ref_model(torch.tensor([t])).last_hidden_state
        if a is None:
            torch.testing.assert_close(
                torch.tensor(h.result["embedding"]), hidden.mean(1)[0], atol=1e-5, rtol=1e-5
            )
            continue
        logits = heads.classify(ref_model, hidden, None, a)[0]
        assert h.status == "finished"
        assert h.result["label"] == heads.head_of(ref_model, a).labels[int(logits.argmax())]
        torch.testing.assert_close(torch.tensor(h.result["logits"]), logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(h.result["probs"]), logits.softmax(-1), atol=1e-5, rtol=1e-5)
    assert bad.status == "failed" and "no classification head" in str(bad.error)
    with pytest.raises(pa.ConfigError, match="adapter"):
        engine.add_request([1, 2], None, task="classify")


def test_kv_capacity_bounds_the_batch_and_oversized_requests_are_refused(tmp_path):
    ref_model = adapter_root(tmp_path, "llama")
    cfg = EngineConfig(page_size=4, num_blocks=10, token_budget=16, max_running=6, max_slots=2, max_served=2)
    engine = Engine(tiny_model("llama"), tmp_path, cfg)
    assert engine.runner.kv_tokens == 40
    reqs = [(list(range(3 + i, 15 + i)), ["lo4", "par", None][i % 3], 8) for i in range(5)]  # 20 tokens each
    handles = [engine.add_request(p, a, SamplingParams(max_new_tokens=n)) for p, a, n in reqs]
    most = 0
    while engine.has_work():
        engine.step()
        most = max(most, engine.runner.pages_in_use())
    assert most <= 10 and len({h.status for h in handles}) == 1
    assert [h.tokens for h in handles] == [alone(ref_model, p, n, a) for p, a, n in reqs]
    with pytest.raises(RequestTooLargeError, match="max_tokens"):
        engine.add_request(list(range(3, 30)), None, SamplingParams(max_new_tokens=20))


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(tmp_path, monkeypatch):
    ref_model = adapter_root(tmp_path, "llama")
    engine = Engine(tiny_model("llama"), tmp_path, BUSY)
    a = engine.add_request([5, 6, 7], "lo4", SamplingParams(max_new_tokens=3))
    execute = engine.runner.execute

    def broken(plan):
        monkeypatch.setattr(engine.runner, "execute", execute)  # only this step fails
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "execute", broken)
    failed = engine.step()
    assert failed == [a] and a.status == "failed" and "device lost" in str(a.error)
    assert engine.runner.pages_in_use() == 0 and engine.scheduler.kv_used == 0
    b = engine.add_request([5, 6, 7], "lo4", SamplingParams(max_new_tokens=3))
    engine.run()
    assert b.tokens == alone(ref_model, [5, 6, 7], 3, "lo4")
    assert engine.pop(b.id) is b and b.id not in engine.handles
    with pytest.raises(pa.ConfigError, match="unknown request"):
        engine.pop(b.id)
    c = engine.add_request([1, 2], None)
    with pytest.raises(pa.ConfigError, match="still waiting"):
        engine.pop(c.id)


def test_prefetched_folders_are_read_on_the_reader_thread_and_checked_when_needed(tmp_path, monkeypatch):
    """Queued requests' adapters are read while steps run (file I/O off the engine thread); a
    folder that fails its check still fails only its own requests."""
    import threading

    import paradapt.serve.engine as eng

    ref_model = adapter_root(tmp_path, "llama")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tmp_path / "lo4" / "adapter_config.json").read_text())
    (bad / "adapter.safetensors").write_bytes(b"\x00not safetensors at all")
    readers: dict[str, str] = {}
    parse = eng.parse_folder

    def spy(folder, name=None):
        readers[name] = threading.current_thread().name
        return parse(folder, name)

    monkeypatch.setattr(eng, "parse_folder", spy)
    config = EngineConfig(
        page_size=4, num_blocks=80, token_budget=16, max_running=6, max_slots=1, max_served=4
    )
    engine = Engine(tiny_model("llama"), tmp_path, config)
    reqs = [([5, 6, 7], "lo4", 4), ([8, 9], "par", 3), ([3, 4], "bad", 2), ([4, 4, 4], "ser", 3)]
    handles = [engine.add_request(p, a, SamplingParams(max_new_tokens=n)) for p, a, n in reqs]
    engine.run()
    for h, (p, a, n) in zip(handles, reqs, strict=True):
        if a == "bad":
            assert h.status == "failed" and "adapter.safetensors" in str(h.error)
        else:
            assert h.status == "finished" and h.tokens == alone(ref_model, p, n, a)
    assert readers["lo4"] == "MainThread"  # needed at once: read on demand
    assert all(readers[a].startswith("paradapt-reader") for a in ("par", "bad", "ser"))  # read ahead
    assert engine.cache.stats.prefetch_loads >= 3 and not engine.store.pending


def test_an_adapter_is_built_once_per_host_read_and_serves_the_same_after_evictions(tmp_path, monkeypatch):
    """The module checked when a folder is read is the one attached (no second build), and it
    serves identically after being evicted from the device and attached again."""
    import paradapt.inject as inject

    ref_model = adapter_root(tmp_path, "llama")
    builds: list[str] = []
    build = inject.build
    monkeypatch.setattr(
        inject, "build", lambda st, name, cfg, **kw: builds.append(name) or build(st, name, cfg, **kw)
    )
    config = EngineConfig(
        page_size=4, num_blocks=80, token_budget=16, max_running=6, max_slots=1, max_served=6
    )
    engine = Engine(tiny_model("llama"), tmp_path, config)
    order = ["lo4", "par", "lo4", "ser", "par", "lo4"]  # one slot: every switch evicts and re-attaches
    for i, a in enumerate(order):
        prompt = [5 + i, 6, 7]
        h = engine.add_request(prompt, a, SamplingParams(max_new_tokens=3))
        engine.run()
        assert h.status == "finished" and h.tokens == alone(ref_model, prompt, 3, a)
    assert sorted(builds) == ["lo4", "par", "ser"]  # one build per folder read, none per attach
    assert engine.cache.stats.device_loads == len(order)


def test_admin_operations_load_unload_discard_and_fail(tmp_path):
    """The public operations a server runs between steps (serve/app.py uses only these)."""
    adapter_root(tmp_path, "llama")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tmp_path / "lo4" / "adapter_config.json").read_text())
    (bad / "adapter.safetensors").write_bytes(b"\x00not safetensors at all")
    engine = Engine(tiny_model("llama"), tmp_path, BUSY)
    assert engine.store.names() == sorted([*ADAPTERS, "bad"])
    engine.load_adapter("lo4")  # read into host memory now
    assert "lo4" in engine.served_adapters()
    with pytest.raises(AdapterLoadError, match="'bad'"):
        engine.load_adapter("bad")
    assert "bad" not in engine.cache
    h = engine.add_request([4, 5, 6], "lo4", SamplingParams(max_new_tokens=4))
    assert (engine.num_waiting, engine.num_running, engine.adapter_users("lo4")) == (1, 0, 1)
    with pytest.raises(AdapterPinnedError, match="1 running or queued"):
        engine.unload_adapter("lo4")  # queued, not yet pinned: still refused
    engine.step()
    assert (engine.num_waiting, engine.num_running) == (0, 1)
    engine.discard(h.id)  # unfinished: cancelled, then forgotten
    assert h.status == "cancelled" and h.id not in engine.handles
    engine.unload_adapter("lo4")
    assert "lo4" not in engine.cache
    a = engine.add_request([4, 5], "lo2", SamplingParams(max_new_tokens=4))
    b = engine.add_request([6, 7], None, SamplingParams(max_new_tokens=4))
    engine.step()
    boom = RuntimeError("boom")
    assert {x.id for x in engine.fail_all(boom)} == {a.id, b.id}
    assert a.error is boom and b.status == "failed" and not engine.has_work()
    assert engine.runner.pages_in_use() == 0


def test_check_adapter_weights_sees_an_adapter_edited_in_place_between_requests(tmp_path):
    """``EngineConfig(check_adapter_weights=True)``: a LoRA the process edits in place (an
    optimizer step while the engine serves it) is served with its new weights at once."""
    adapter_root(tmp_path, "llama")
    engine = Engine(tiny_model("llama"), tmp_path, EngineConfig(check_adapter_weights=True, max_slots=4))
    reqs = [([5, 6, 7, 8], "lo4", 6), ([9, 10, 11], "lo8", 6), ([12, 13], None, 6)]

    def run() -> list[list[int]]:
        handles = [engine.add_request(p, a, SamplingParams(max_new_tokens=n)) for p, a, n in reqs]
        engine.run()
        return [h.tokens for h in handles]

    run()  # the adapters are attached and banked
    with torch.no_grad():
        for p in engine.model.paradapt["lo4"].parameters():
            p.mul_(-3.0)
    got = run()
    assert got == [alone(engine.model, p, n, a) for p, a, n in reqs]
    with pytest.raises(pa.ConfigError, match="check_adapter_weights"):
        EngineConfig(check_adapter_weights="yes")
