"""Issue 5's API guarantees not covered in test_serve_api.py: a non-streamed client that leaves frees
its request, 429 at the queue bound, 400 naming the field for every kind of bad input (body, token
ids, n, adapter names), 422 for an adapter of another model, the tokenizer's chat template, and the
tokens/s gauge. Runs on the real stories260K Llama and tokenizer from the shared assets."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from conftest import CHAT_TEMPLATE, asset_path, require_asset, tiny_model
from fastapi.testclient import TestClient
from test_serve_api import live_server
from transformers import AutoModelForCausalLM, AutoTokenizer

import paradapt as pa
from paradapt.errors import ConfigError
from paradapt.serve.app import create_app
from paradapt.serve.engine import EncoderEngine, Engine, EngineConfig
from paradapt.serve.metrics import TokenRate
from paradapt.serve.protocol import ChatMessage, chat_prompt

STORIES = asset_path("models", "stories260k-hf")
CFG = EngineConfig(page_size=16, num_blocks=64, token_budget=64, max_running=8, max_slots=2, max_served=3)
LONG = {"max_tokens": 480, "temperature": 0, "ignore_eos": True}  # >= 2.4 s with recording_engine's pause


def stories():
    require_asset(STORIES)
    return AutoModelForCausalLM.from_pretrained(STORIES, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """An adapter root with one LoRA of stories260K ("lo") and one of a tiny Llama ("alien")."""
    root = tmp_path_factory.mktemp("adapters")
    model = stories()
    pa.add_adapter(model, "lo", pa.LoRAConfig(r=4, init="random"))
    pa.save_adapter(model, "lo", root / "lo")
    other = tiny_model("llama")  # hidden 32, not stories260K's 64: its weights cannot fit
    pa.add_adapter(other, "alien", pa.LoRAConfig(r=4, init="random"))
    pa.save_adapter(other, "alien", root / "alien")
    return root


@pytest.fixture(scope="module")
def tok():
    stories()
    return AutoTokenizer.from_pretrained(STORIES)


def recording_engine(root: Path, tok, config: EngineConfig = CFG) -> tuple[Engine, list]:
    """An engine that keeps every handle it hands out (the server pops them when done), and pauses
    5 ms per step, so a LONG request outlives the client's actions however fast the machine is."""
    engine = Engine(stories(), root, config, tokenizer=tok)
    seen: list = []
    add, step = engine.add_request, engine.step
    engine.add_request = lambda *a, **k: seen.append(add(*a, **k)) or seen[-1]
    engine.step = lambda: time.sleep(0.005) or step()
    return engine, seen


def wait_idle(engine: Engine, seconds: float = 30.0) -> None:
    end = time.monotonic() + seconds
    while engine.scheduler.has_work() and time.monotonic() < end:
        time.sleep(0.01)


def test_a_non_streamed_client_that_leaves_frees_its_request(root, tok):
    engine, seen = recording_engine(root, tok)
    with live_server(create_app(engine, model_name="stories")) as port:
        body = {"model": "lo", "prompt": "Once", **LONG}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=0.3)
        wait_idle(engine)
        assert seen[0].status == "cancelled" and len(seen[0].tokens) < LONG["max_tokens"]
        assert engine.runner.pages_in_use() == 0 and not engine.cache.pinned("lo")


def test_the_queue_bound_answers_429(root, tok):
    config = EngineConfig(page_size=16, num_blocks=64, token_budget=64, max_running=1, queue_bound=1)
    engine, seen = recording_engine(root, tok, config)
    url = None
    with live_server(create_app(engine, model_name="stories")) as port:
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": "stories", "prompt": "Once", "stream": True, **LONG}
        with httpx.stream("POST", url, json=body) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # running: the batch (max_running 1) is full
            with httpx.stream("POST", url, json=body):  # waits: the queue (bound 1) is full
                r = httpx.post(url, json={**body, "stream": False, "max_tokens": 2})
                assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        wait_idle(engine)
        assert [h.status for h in seen] == ["cancelled", "cancelled"]
        assert httpx.post(url, json={**body, "stream": False, "max_tokens": 2}).status_code == 200


def test_delete_is_refused_while_requests_wait_for_the_adapter(root, tok):
    config = EngineConfig(page_size=16, num_blocks=64, token_budget=64, max_running=1)
    engine, seen = recording_engine(root, tok, config)
    with live_server(create_app(engine, model_name="stories")) as port:
        url = f"http://127.0.0.1:{port}"
        body = {"prompt": "Once", "stream": True, **LONG}
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "model": "stories"}) as running:
            lines = running.iter_lines()
            next(lines)  # the one running request
            with httpx.stream("POST", f"{url}/v1/completions", json={**body, "model": "lo"}):
                r = httpx.delete(f"{url}/v1/adapters/lo")  # "lo" only has a queued request
                assert r.status_code == 409 and "queued" in r.json()["error"]["message"]
        wait_idle(engine)
        assert httpx.delete(f"{url}/v1/adapters/lo").status_code == 200
        short = {"model": "lo", "prompt": "Once", "max_tokens": 3, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", json=short, timeout=60).status_code == 200


@pytest.fixture(scope="module")
def client(root, tok):
    app = create_app(
        Engine(stories(), root, CFG, tokenizer=tok), model_name="stories", chat_template=CHAT_TEMPLATE
    )
    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", b"{not json", "body"),
        ("/v1/completions", None, "body"),
        ("/v1/completions", {"model": "lo", "prompt": [1, 99999]}, "prompt"),  # outside the vocabulary
        ("/v1/completions", {"model": "lo", "prompt": [-3]}, "prompt"),
        ("/v1/completions", {"model": "lo", "prompt": "x", "n": 17}, "n"),  # over 16 choices
        ("/v1/completions", {"model": "lo", "prompt": "x", "stop": [""]}, "stop"),
        (
            "/v1/completions",
            {"model": "lo", "prompt": "x", "max_tokens": 600},
            "max_tokens",
        ),  # > 512 positions
        ("/v1/completions", {"model": "lo", "prompt": [5] * 600}, "prompt"),
        ("/v1/completions", {"model": "../lo", "prompt": "x"}, "model"),
        ("/v1/chat/completions", {"model": "lo", "messages": [{"role": "user"}]}, "messages.0.content"),
        ("/v1/adapters", {"name": "../../etc"}, "name"),
    ],
)
def test_bad_input_is_400_naming_the_field(client, path, body, param):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {}
    r = client.post(path, json=body, **kw) if not kw else client.post(path, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert err["message"].split(":")[0] in (param, "adapter")
    ok = client.post("/v1/completions", json={"model": "lo", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200  # nothing above hurt the engine


def test_encoder_texts_over_the_position_limit_are_400_naming_input(tmp_path):
    model = tiny_model("bert")  # 64 positions
    pa.add_adapter(model, "sent", pa.LoRAConfig(r=4, init="random", head={"labels": ["neg", "pos"]}))
    pa.save_adapter(model, "sent", tmp_path / "sent")

    class Tok:  # characters -> ids
        def __call__(self, text):
            return {"input_ids": [3 + (ord(c) % 90) for c in text]}

    engine = EncoderEngine(tiny_model("bert"), tmp_path, EngineConfig(token_budget=256))
    with TestClient(create_app(engine, model_name="bert", tokenizer=Tok())) as c:
        for path, model in (("/classify", "sent"), ("/v1/embeddings", "bert")):
            r = c.post(path, json={"model": model, "input": ["fine", "x" * 100]})
            assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text
            assert "text 1 has 100 tokens" in r.json()["error"]["message"]
        assert c.post("/classify", json={"model": "sent", "input": ["fine"]}).status_code == 200
    assert not engine.handles and not engine.scheduler.has_work()  # nothing queued or left behind


def test_an_adapter_of_another_model_is_422_and_the_rest_keeps_serving(client):
    r = client.post("/v1/completions", json={"model": "alien", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 422 and "alien" in r.json()["error"]["message"]
    assert client.post("/v1/adapters", json={"name": "alien"}).status_code == 422
    r = client.post("/v1/completions", json={"model": "lo", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200


def test_chat_uses_the_tokenizer_chat_template(root, tok):
    templated = AutoTokenizer.from_pretrained(STORIES)
    templated.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A story"}]
    prompt = chat_prompt(templated, [ChatMessage(**m) for m in messages])
    assert prompt == "[system] Be brief.\n[user] A story\n[assistant]"
    with pytest.raises(ConfigError, match="chat template"):  # no template: refused, not invented
        chat_prompt(tok, [ChatMessage(**messages[1])])
    app = create_app(Engine(stories(), root, CFG, tokenizer=templated), model_name="stories")
    body = {"model": "lo", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with TestClient(app) as c:
        chat = c.post("/v1/chat/completions", json={**body, "messages": messages}).json()
        plain = c.post("/v1/completions", json={**body, "prompt": prompt}).json()
    assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"]
    cached = [x["usage"].pop("prompt_tokens_details")["cached_tokens"] for x in (chat, plain)]
    assert chat["usage"] == plain["usage"]
    assert cached[0] <= cached[1] < plain["usage"]["prompt_tokens"]  # the second may reuse the first's pages
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    assert chat_prompt(templated, [ChatMessage(**m) for m in parts]) == prompt  # OpenAI's list form


def test_chat_content_parts_other_than_text_are_400(client):
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    body = {"model": "lo", "messages": [{"role": "user", "content": [image]}], "max_tokens": 2}
    r = client.post("/v1/chat/completions", json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "messages.0.content.0.type" and "text" in err["message"]
    text = {"type": "text", "text": "Hi"}
    body["messages"][0]["content"] = [text, text]
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_a_step_that_raises_fails_its_requests_with_a_500_and_the_server_goes_on(root, tok, caplog):
    engine = Engine(stories(), root, CFG, tokenizer=tok)
    step, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return step()

    engine.step = flaky_step
    body = {"model": "lo", "prompt": "Once", "max_tokens": 3, "temperature": 0}
    with TestClient(create_app(engine, model_name="stories"), raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json=body)
        message = r.json()["error"]["message"]  # says no more than that, and where the log has the rest
        assert r.status_code == 500 and "boom" not in message and message.startswith("internal error")
        rid = r.headers["x-request-id"]
        assert rid in message and any(rid in rec.getMessage() and rec.exc_info for rec in caplog.records)
        assert c.post("/v1/completions", json=body).status_code == 200
    assert not engine.scheduler.has_work() and engine.runner.pages_in_use() == 0


def test_models_carry_the_openai_model_fields(client):
    data = client.get("/v1/models").json()["data"]
    ids = [m["id"] for m in data]  # "alien" is gone once a request failed to load it (issue 15)
    assert ids in (["stories", "alien", "lo"], ["stories", "lo"])
    for m in data:
        assert m["object"] == "model" and m["owned_by"] == "paradapt" and isinstance(m["created"], int)
    assert all(m["parent"] == "stories" for m in data[1:])


def test_metrics_tokens_per_second(client):
    body = {"model": "lo", "prompt": "Once", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    assert client.post("/v1/completions", json=body).status_code == 200
    rows = dict(line.split() for line in client.get("/metrics").text.splitlines() if not line.startswith("#"))
    assert float(rows["paradapt_generation_tokens_per_second"]) > 0


def test_token_rate_averages_over_its_window_and_decays_when_idle():
    now = [100.0]
    rate = TokenRate(window=10.0, clock=lambda: now[0])
    for total in (10, 20, 30):  # 10 tokens a second for 3 s
        now[0] += 1.0
        rate.record(total)
    assert rate.rate(30) == pytest.approx(30 / 3)  # since start: the window is not full yet
    now[0] += 10.0
    rate.record(130)  # 100 tokens in the last 10 s
    assert rate.rate(130) == pytest.approx(100 / 10)
    now[0] += 10.5  # idle
    assert rate.rate(130) == 0.0


def test_cache_salt_over_http_keeps_tenants_apart_and_a_bad_one_is_a_400_naming_it(client):
    """vLLM's ``cache_salt`` field, on completions and chat: the same prompt finds its pages only
    under the same salt; an empty or oversized salt is refused before anything runs."""
    body = {"model": "lo", "prompt": list(range(3, 40)), "max_tokens": 2, "temperature": 0}

    def cached(**extra) -> int:
        r = client.post("/v1/completions", json={**body, **extra})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(cache_salt="tenant-a") == 0
    assert cached(cache_salt="tenant-b") == 0 and cached() == 0
    assert cached(cache_salt="tenant-a") > 0
    chat = {"model": "lo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    for bad in ("", "x" * 1025):
        for path, payload in (("/v1/completions", body), ("/v1/chat/completions", chat)):
            r = client.post(path, json={**payload, "cache_salt": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt", r.text
