"""The HTTP API over the Engine: OpenAI shapes, SSE streaming, errors by status, the openai client.

Runs on the real stories260K Llama and its tokenizer from the shared assets.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import pytest
import torch
from conftest import CHAT_TEMPLATE, asset_path, completion_text, require_asset, tiny_model
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import paradapt as pa
from paradapt import heads
from paradapt.serve.app import create_app
from paradapt.serve.engine import EncoderEngine, Engine, EngineConfig
from paradapt.serve.process import free_port

STORIES = asset_path("models", "stories260k-hf")
CFG = EngineConfig(page_size=16, num_blocks=64, token_budget=64, max_running=8, max_slots=2, max_served=3)


def _need_stories() -> None:
    require_asset(STORIES)


def stories():
    return AutoModelForCausalLM.from_pretrained(STORIES, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An adapter root with two adapters, a reference model carrying them, and the tokenizer."""
    _need_stories()
    root = tmp_path_factory.mktemp("adapters")
    ref = stories()
    pa.add_adapter(ref, "lo", pa.LoRAConfig(r=4, init="random"))
    pa.add_adapter(ref, "par", pa.ParallelConfig(r=8, init="random"))
    for n in ("lo", "par"):
        pa.save_adapter(ref, n, root / n)
    return root, ref, AutoTokenizer.from_pretrained(STORIES)


@pytest.fixture
def client(served):
    root, _, tok = served
    app = create_app(
        Engine(stories(), root, CFG, tokenizer=tok), model_name="stories", chat_template=CHAT_TEMPLATE
    )
    with TestClient(app) as c:
        yield c


def alone_text(served, prompt: str, n: int, adapter: str | None) -> str:
    _, ref, tok = served
    ids = tok(prompt)["input_ids"]
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=0)
    with pa.route(ref, [adapter]):
        out = ref.generate(torch.tensor([ids]), generation_config=gc)[0, len(ids) :].tolist()
    return completion_text(tok, ids, out)


def test_completions_per_adapter_equal_generate_alone(client, served):
    prompts = {"lo": "Once upon a time", "par": "The little dog", "stories": "Lily saw a bird"}
    for model, prompt in prompts.items():
        r = client.post(
            "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == model
        assert body["choices"][0]["text"] == alone_text(
            served, prompt, 12, None if model == "stories" else model
        )
        assert body["usage"]["completion_tokens"] <= 12


def test_streaming_sse_concatenates_to_the_full_text(client, served):
    with client.stream(
        "POST",
        "/v1/completions",
        json={"model": "lo", "prompt": "Tom had", "max_tokens": 10, "temperature": 0, "stream": True},
    ) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert "".join(c["choices"][0]["text"] for c in chunks) == alone_text(served, "Tom had", 10, "lo")


def test_chat_completions_shape(client):
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "par",
            "messages": [{"role": "user", "content": "Tell a story"}],
            "max_tokens": 5,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)


def test_errors_map_to_statuses_naming_the_field(client, served):
    root = served[0]
    r = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"model": "lo", "prompt": "x", "temperature": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = client.post("/v1/completions", json={"model": "../lo", "prompt": "x"})
    assert r.status_code == 400 and "adapter" in r.json()["error"]["message"]
    bad = root / "broken"
    bad.mkdir(exist_ok=True)
    (bad / "adapter_config.json").write_text((root / "lo" / "adapter_config.json").read_text())
    (bad / "adapter.safetensors").write_bytes(b"garbage")
    try:
        r = client.post("/v1/completions", json={"model": "broken", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 422 and "broken" in r.json()["error"]["message"]
        r = client.post("/v1/adapters", json={"name": "broken"})
        assert r.status_code == 422
        r = client.post("/v1/completions", json={"model": "lo", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200  # the server keeps serving
    finally:
        for f in bad.iterdir():
            f.unlink()
        bad.rmdir()


def test_models_adapters_health_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids[0] == "stories" and {"lo", "par"} <= set(ids)
    assert client.post("/v1/adapters", json={"name": "par"}).status_code == 200
    assert client.delete("/v1/adapters/par").status_code == 200
    assert client.delete("/v1/adapters/par").status_code == 404  # no longer known
    client.post("/v1/completions", json={"model": "lo", "prompt": "x", "max_tokens": 3, "ignore_eos": True})
    text = client.get("/metrics").text
    assert "paradapt_queue_length 0" in text and "paradapt_generated_tokens_total 3" in text
    assert "paradapt_time_to_first_token_seconds_count 1" in text
    assert (
        "paradapt_adapter_load_host_seconds_total" in text
        and "paradapt_adapter_load_device_seconds_total" in text
    )
    assert 'paradapt_time_per_output_token_seconds_bucket{le="+Inf"} 1' in text


@contextlib.contextmanager
def live_server(app):
    """``app`` under a real uvicorn on a free loopback port (a thread), stopped on exit; yields the port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        yield port
    finally:
        server.should_exit = True
        t.join(timeout=10)


def test_the_openai_client_works_unchanged(served):
    import openai  # a pinned test dependency: a missing install fails, not skips

    root, _, tok = served
    app = create_app(
        Engine(stories(), root, CFG, tokenizer=tok), model_name="stories", chat_template=CHAT_TEMPLATE
    )
    with live_server(app) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model="lo", prompt="Once upon a time", max_tokens=8, temperature=0)
        assert out.choices[0].text == alone_text(served, "Once upon a time", 8, "lo")
        chat = client.chat.completions.create(
            model="par", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
        )
        assert isinstance(chat.choices[0].message.content, str)
        streamed = "".join(
            c.choices[0].text
            for c in client.completions.create(
                model="lo", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
            )
        )
        assert streamed == out.choices[0].text
        assert {"stories", "lo", "par"} <= {m.id for m in client.models.list()}
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="missing", prompt="x", max_tokens=2)


def test_encoder_classify_and_embeddings(tmp_path):
    model = tiny_model("bert")
    pa.add_adapter(model, "sent", pa.LoRAConfig(r=4, init="random", head={"labels": ["neg", "pos"]}))
    pa.save_adapter(model, "sent", tmp_path / "sent")

    class Tok:  # characters -> ids, enough for a vocabulary of 96
        def __call__(self, text):
            return {"input_ids": [3 + (ord(c) % 90) for c in text]}

    app = create_app(
        EncoderEngine(tiny_model("bert"), tmp_path, EngineConfig(token_budget=64)),
        model_name="bert",
        tokenizer=Tok(),
    )
    with TestClient(app) as c:
        r = c.post("/classify", json={"model": "sent", "input": ["good film", "bad", "so so"]})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        for i, text in enumerate(["good film", "bad", "so so"]):
            with torch.no_grad(), pa.route(model, "sent"):
                hidden = model(torch.tensor([Tok()(text)["input_ids"]])).last_hidden_state
            probs = heads.classify(model, hidden, None, "sent")[0].softmax(-1)
            assert data[i]["index"] == i and data[i]["label"] == ["neg", "pos"][int(probs.argmax())]
            torch.testing.assert_close(torch.tensor(data[i]["probs"]), probs, atol=1e-5, rtol=1e-5)
        e = c.post("/v1/embeddings", json={"model": "bert", "input": "hello"})
        assert e.status_code == 200 and len(e.json()["data"][0]["embedding"]) == 32
        assert (
            c.post("/classify", json={"model": "bert", "input": ["x"]}).status_code == 400
        )  # no head on the base
        assert c.post("/v1/completions", json={"model": "sent", "prompt": "x"}).status_code == 404


def test_a_client_that_disconnects_mid_stream_frees_its_request(served):
    import httpx

    root, _, tok = served
    engine = Engine(stories(), root, CFG, tokenizer=tok)
    seen = []
    add = engine.add_request
    engine.add_request = lambda *a, **k: seen.append(add(*a, **k)) or seen[-1]
    app = create_app(engine, model_name="stories")
    with live_server(app) as port:
        body = {
            "model": "lo",
            "prompt": "Once",
            "max_tokens": 400,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
            lines = r.iter_lines()  # kept: dropping the iterator would close the connection here
            next(lines)  # the first chunk arrived: the request is running
            assert len(engine.scheduler.running) == 1
        for _ in range(400):  # the server notices the closed connection and cancels
            if not engine.scheduler.has_work():
                break
            time.sleep(0.01)
        assert seen[0].status == "cancelled" and len(seen[0].tokens) < 400
        assert not engine.scheduler.has_work() and engine.runner.pages_in_use() == 0
        assert engine.cache.stats.device_loads == 1 and not engine.cache.pinned("lo")
