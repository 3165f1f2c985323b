"""Issue 15: access control and exposure, and bad input that must be a 400, not a 500.

API key (401 in OpenAI's shape, /health open, /metrics opened by a flag), the Host check, the
request-body bound (413), the access log, error messages without absolute paths, adapter
files linking out of the root, non-finite adapter weights (422 naming the tensor), keep-alive
after a 500, lone surrogates and overlong names, bounded `stop`, seeds and underflowing
temperatures. Runs on the real stories260K Llama and tokenizer from the shared assets.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from test_serve_api import live_server
from test_serve_api_audit import CFG, root, stories, tok  # noqa: F401  (fixtures)

import paradapt as pa
from paradapt.serve.app import create_app
from paradapt.serve.engine import Engine
from paradapt.serve.security import GuardConfig, redact
from paradapt.state import require_state

BODY = {"model": "lo", "prompt": "Once", "max_tokens": 3, "temperature": 0}


def app_with(root, tok, **guard):  # noqa: F811
    return create_app(Engine(stories(), root, CFG, tokenizer=tok), model_name="stories", guard=GuardConfig(**guard))


def test_the_api_key_guards_every_endpoint_but_health(root, tok):  # noqa: F811
    with TestClient(app_with(root, tok, api_key="s3cret")) as c:
        assert c.get("/health").status_code == 200
        for method, path in [("get", "/v1/models"), ("get", "/metrics"), ("post", "/v1/completions")]:
            r = getattr(c, method)(path, **({"json": BODY} if method == "post" else {}))
            err = r.json()["error"]
            assert r.status_code == 401 and err["code"] == "invalid_api_key" and "message" in err
        wrong = c.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.post("/v1/completions", json=BODY, headers=ok).status_code == 200
    with TestClient(app_with(root, tok, api_key="s3cret", metrics_without_key=True)) as c:
        assert c.get("/metrics").status_code == 200
        assert c.get("/v1/models").status_code == 401


def test_the_openai_client_sends_the_key(root, tok):  # noqa: F811
    import openai

    with live_server(app_with(root, tok, api_key="s3cret")) as port:
        url = f"http://127.0.0.1:{port}/v1"
        good = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert good.completions.create(model="lo", prompt="Once", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()


def test_unexpected_host_headers_are_refused(root, tok):  # noqa: F811
    app = app_with(root, tok, allowed_hosts=("localhost", "127.0.0.1", "::1"))
    with TestClient(app, base_url="http://localhost:8000") as c:
        assert c.get("/health").status_code == 200
        assert c.get("/health", headers={"Host": "[::1]:8000"}).status_code == 200
        assert c.get("/health", headers={"Host": "127.0.0.1"}).status_code == 200
        r = c.get("/v1/models", headers={"Host": "evil.example:8000"})
        assert r.status_code == 400 and "evil.example" in r.json()["error"]["message"]


def test_bodies_over_the_bound_are_413_before_anything_parses_them(root, tok):  # noqa: F811
    with TestClient(app_with(root, tok, max_request_bytes=1000)) as c:
        big = {**BODY, "prompt": "x" * 2000}
        r = c.post("/v1/completions", json=big)
        assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: counted as it arrives
            yield json.dumps(big).encode()

        r = c.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        assert c.post("/v1/completions", json=BODY).status_code == 200


def test_an_access_log_line_per_request(root, tok, caplog):  # noqa: F811
    with TestClient(app_with(root, tok)) as c, caplog.at_level(logging.INFO, logger="paradapt.access"):
        body = {**BODY, "ignore_eos": True}
        rid = c.post("/v1/completions", json=body).headers["x-request-id"]
        c.get("/v1/models")
    lines = [r.getMessage() for r in caplog.records if r.name == "paradapt.access"]
    gen = next(ln for ln in lines if rid in ln)
    assert gen.startswith("POST /v1/completions 200 adapter=lo tokens=") and "latency_ms=" in gen
    n_prompt = len(tok("Once")["input_ids"])
    assert f"tokens={n_prompt + 3} " in gen
    assert any(ln.startswith("GET /v1/models 200 adapter=-") for ln in lines)
    caplog.clear()
    with TestClient(app_with(root, tok, access_log=False)) as c, caplog.at_level(logging.INFO):
        c.get("/v1/models")
    assert not [r for r in caplog.records if r.name == "paradapt.access"]


def test_bad_text_and_names_are_400_not_500(root, tok):  # noqa: F811
    with TestClient(app_with(root, tok), raise_server_exceptions=False) as c:
        r = c.post(
            "/v1/completions",
            content=b'{"model": "lo", "prompt": "a\\ud800b", "max_tokens": 2}',
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "surrogate" in r.text
        chat = {"model": "lo", "messages": [{"role": "user", "content": "\ud800"}]}
        r = c.post("/v1/chat/completions", content=json.dumps(chat), headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"
        r = c.post("/v1/completions", json={**BODY, "model": "a" * 300})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        r = c.post("/v1/adapters", json={"name": "lo\n"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "name"


def test_stop_is_bounded_like_openais(root, tok):  # noqa: F811
    with TestClient(app_with(root, tok)) as c:
        r = c.post("/v1/completions", json={**BODY, "stop": ["a", "b", "c", "d", "e"]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
        r = c.post("/v1/completions", json={**BODY, "stop": "x" * 10_000})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
        assert c.post("/v1/completions", json={**BODY, "stop": ["a", "b", "c", "d"]}).status_code == 200


def test_seeds_and_underflowing_parameters_fail_only_their_request(root, tok):  # noqa: F811
    with TestClient(app_with(root, tok)) as c:
        r = c.post("/v1/completions", json={**BODY, "temperature": 1.0, "seed": 2**64})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
        greedy = c.post("/v1/completions", json=BODY).json()["choices"][0]["text"]
        for extra in ({"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-300}):
            r = c.post("/v1/completions", json={**BODY, **extra})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy


def _broken_copy(root, name: str, how: str):  # noqa: F811
    """An adapter folder ``name`` under ``root``: a copy of "lo" with an infinite weight, or whose
    weights file is a link out of the root."""
    folder = root / name
    if how == "inf":
        model = stories()
        pa.load_adapter(model, root / "lo", name="lo")
        with torch.no_grad():
            next(iter(require_state(model).container["lo"].parameters())).view(-1)[0] = float("inf")
        pa.save_adapter(model, "lo", folder)
    else:
        outside = root.parent / f"outside-{name}"
        outside.mkdir(exist_ok=True)
        pa.save_adapter(_lo(root), "lo", outside / "x")
        folder.mkdir()
        (folder / "adapter_config.json").write_bytes((root / "lo" / "adapter_config.json").read_bytes())
        os.symlink(outside / "x" / "adapter.safetensors", folder / "adapter.safetensors")
    return folder


def _lo(root):  # noqa: F811
    model = stories()
    pa.load_adapter(model, root / "lo", name="lo")
    return model


def test_broken_adapter_files_are_422_naming_the_file_without_absolute_paths(tmp_path, tok):  # noqa: F811
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    model = stories()
    pa.add_adapter(model, "lo", pa.LoRAConfig(r=4, init="random"))
    pa.save_adapter(model, "lo", adapters / "lo")
    _broken_copy(adapters, "infinite", "inf")
    _broken_copy(adapters, "linked", "link")
    with TestClient(app_with(adapters, tok)) as c:
        r = c.post("/v1/adapters", json={"name": "infinite"})
        msg = r.json()["error"]["message"]
        assert r.status_code == 422 and "non-finite" in msg and "tensor '" in msg
        assert str(tmp_path) not in msg and "infinite/adapter.safetensors" in msg
        r = c.post("/v1/completions", json={**BODY, "model": "linked"})
        msg = r.json()["error"]["message"]
        assert r.status_code == 422 and "outside the adapter root" in msg and str(tmp_path) not in msg
        assert c.post("/v1/completions", json=BODY).status_code == 200


def test_redact_keeps_paths_relative_to_the_root_and_hides_the_rest(tmp_path):
    adapters = tmp_path / "adapters"
    msg = f"{adapters}/lo/adapter.safetensors: bad; see {tmp_path}/other/file and /v1/adapters"
    out = redact(msg, [adapters])
    assert out.startswith("lo/adapter.safetensors: bad") and str(tmp_path) not in out
    assert "<path>" in out


def _raw_post(sock: socket.socket, port: int, body: dict) -> int:
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    sock.sendall(head + data)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        buf += chunk
    header, rest = buf.split(b"\r\n\r\n", 1)
    length = next(int(x.split(b":")[1]) for x in header.split(b"\r\n") if x.lower().startswith(b"content-length"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        rest += chunk
    return int(header.split()[1])


def test_the_keep_alive_connection_survives_a_500(root, tok):  # noqa: F811
    engine = Engine(stories(), root, CFG, tokenizer=tok)
    step, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return step()

    engine.step = flaky_step
    with live_server(create_app(engine, model_name="stories")) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            assert _raw_post(sock, port, BODY) == 500
            assert _raw_post(sock, port, BODY) == 200  # same connection


def test_health_answers_while_a_huge_prompt_is_being_handled(root, tok):  # noqa: F811
    """/health within 0.5 s (the issue's target is 100 ms; 0.5 s keeps the test robust on two busy
    cores) while a 12 MB prompt is received, checked and refused."""
    with live_server(app_with(root, tok)) as port:
        url = f"http://127.0.0.1:{port}"
        done = threading.Event()
        status: list[int] = []

        def big():
            body = {"model": "lo", "prompt": "Once upon a time " * 700_000, "max_tokens": 2}
            status.append(httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code)
            done.set()

        threading.Thread(target=big, daemon=True).start()
        worst = 0.0
        with httpx.Client(timeout=30) as client:
            while not done.is_set():
                t0 = time.perf_counter()
                assert client.get(f"{url}/health").status_code == 200
                worst = max(worst, time.perf_counter() - t0)
                time.sleep(0.01)
        assert status == [400]
        assert worst < 0.5, f"/health took {worst:.3f} s"


def test_the_openapi_schema_documents_the_statuses_the_server_sends(root, tok):  # noqa: F811
    with TestClient(app_with(root, tok)) as c:
        paths = c.get("/openapi.json").json()["paths"]
        responses = paths["/v1/completions"]["post"]["responses"]
        assert {"200", "400", "404", "413", "422"} <= set(responses)
        assert "ValidationError" not in json.dumps(responses) and "fails to load" in responses["422"]["description"]
        assert c.post("/v1/completions", json={"model": "lo"}).status_code == 400  # as documented
