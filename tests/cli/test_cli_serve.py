"""``paradapt serve``: the real command in a subprocess over loopback (health, models, a completion,
SIGTERM drains and exits 0), encoder wiring, memory split, and one-line errors for bad paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from _train_fixtures import make_bert, make_llama
from conftest import CHAT_TEMPLATE
from fastapi.testclient import TestClient

import paradapt as pa
from paradapt import cli
from paradapt.cli import serve as serve_cli
from paradapt.cli.common import CLIError
from paradapt.loading import load_model
from paradapt.serve.process import free_port

START_TIMEOUT = 120.0  # bound for a loaded CI machine; not a performance check


def _save_lora(model_dir: Path, root: Path, name: str) -> None:
    _, model = load_model(model_dir)
    pa.add_adapter(model, name, pa.LoRAConfig(r=2))
    pa.save_adapter(model, name, root / name)


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("serve_cli")
    model_dir = make_llama(base / "tiny-llama")
    root = base / "adapters"
    root.mkdir()
    for name in ("alpha", "beta"):
        _save_lora(model_dir, root, name)
    return model_dir, root


def _wait_healthy(proc: subprocess.Popen, url: str) -> None:
    end = time.monotonic() + START_TIMEOUT
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early ({proc.returncode}): {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError("server did not become healthy")


def test_serve_subprocess_end_to_end_and_sigterm(llama_setup):
    model_dir, root = llama_setup
    port = free_port()
    cmd = [sys.executable, "-m", "paradapt.cli", "serve", "--model", str(model_dir)]
    cmd += ["--adapter-root", str(root), "--port", str(port), "--max-slots", "2", "--threads", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url)
        ids = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        assert ids == ["tiny-llama", "alpha", "beta"]
        body = {"model": "beta", "prompt": "the movie", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        assert httpx.post(f"{url}/v1/completions", json={**body, "model": "nope"}).status_code == 404

        # a streaming request in flight when SIGTERM arrives still completes (drain), then exit 0
        stream = {**body, "model": "alpha", "max_tokens": 40, "stream": True}
        chunks = []
        with httpx.stream("POST", f"{url}/v1/completions", json=stream, timeout=60) as resp:
            lines = resp.iter_lines()
            chunks.append(next(lines))
            proc.send_signal(signal.SIGTERM)
            chunks += [line for line in lines if line]
        events = [c.removeprefix("data: ") for c in chunks if c.startswith("data: ")]
        assert events[-1] == "[DONE]"
        finish = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
        assert finish[-1] == "length"
        proc.wait(timeout=60)
        assert proc.returncode == 0, proc.stderr.read()
        out = proc.stdout.read()
        assert "2 adapters under" in out and f":{port}" in out and "1 torch threads" in out
        assert "drained" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_encoder_model_gets_the_encoder_endpoints(tmp_path):
    model_dir = make_bert(tmp_path / "tiny-bert")
    args = cli.build_parser().parse_args(["serve", "--model", str(model_dir), "--served-model-name", "bert"])
    app, info = serve_cli.build_server_app(args)
    assert info["kind"] == "encoder" and info["root"] is None
    with TestClient(app, base_url="http://localhost") as client:  # loopback: Host is checked
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["bert"]
        r = client.post("/v1/embeddings", json={"model": "bert", "input": ["good movie"]})
        assert r.status_code == 200
        assert len(r.json()["data"][0]["embedding"]) == 32
        assert client.post("/v1/completions", json={"model": "bert", "prompt": "x"}).status_code == 404


def test_device_memory_takes_adapter_slots_out_of_the_kv_tokens(llama_setup):
    """--device-memory-mb reaches the engine whole: slots of the largest adapter come out of the
    KV pages, and the adapter cache is held to the slots' bytes."""
    from paradapt.serve.engine import AdapterStore, Engine, kv_bytes_per_token

    model_dir, root = llama_setup
    parse = cli.build_parser().parse_args
    common = ["serve", "--model", str(model_dir), "--adapter-root", str(root), "--device-memory-mb", "1"]
    engines = {}
    for slots in (1, 8):
        config = serve_cli.engine_config(parse([*common, "--max-slots", str(slots)]))
        assert config.device_memory == 2**20 and config.max_slots == slots
        _, model = load_model(model_dir)
        engines[slots] = Engine(model, root, config)
    per_token = kv_bytes_per_token(engines[1].model)  # 2 (K,V) x 2 layers x 2 heads x 8 dims x 4 B
    assert per_token == 2 * 2 * 2 * 8 * 4
    slot = AdapterStore(engines[1].model, root).largest()
    assert slot > 0
    for slots, engine in engines.items():  # the KV pages get what the slots leave
        pages = (2**20 - slots * slot) // per_token // engine.config.page_size
        assert engine.runner.kv_tokens == pages * engine.config.page_size
    assert engines[8].runner.kv_tokens < engines[1].runner.kv_tokens


def test_prefix_caching_is_on_unless_turned_off_with_vllms_flag(llama_setup):
    model_dir, _ = llama_setup
    parse = cli.build_parser().parse_args
    assert serve_cli.engine_config(parse(["serve", "--model", str(model_dir)])).prefix_caching is True
    off = parse(["serve", "--model", str(model_dir), "--no-enable-prefix-caching"])
    assert serve_cli.engine_config(off).prefix_caching is False


def test_kv_tokens_and_device_memory_together_are_refused(llama_setup):
    model_dir, root = llama_setup
    args = cli.build_parser().parse_args(
        ["serve", "--model", str(model_dir), "--kv-tokens", "512", "--device-memory-mb", "1"]
    )
    with pytest.raises(pa.ConfigError, match="--kv-tokens or --device-memory-mb"):
        serve_cli.engine_config(args)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "/no/such/model"], "--model: /no/such/model is not a folder"),
        (["--adapter-root", "/no/such/root"], "--adapter-root: /no/such/root is not a folder"),
    ],
)
def test_bad_paths_are_one_line_errors(flags, message, llama_setup, capsys):
    model_dir, _ = llama_setup
    argv = ["serve", *(flags if flags[0] == "--model" else ["--model", str(model_dir), *flags])]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"paradapt: error: {message}"


def test_port_in_use_is_one_line_before_the_start_banner(llama_setup, capsys):
    """A taken port is the error, exit 2, and no start banner was printed before it."""
    import socket

    model_dir, _ = llama_setup
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--model", str(model_dir), "--port", str(port), "--threads", "1"]) == 2
    out, err = capsys.readouterr()
    assert "paradapt serve:" not in out
    assert err.strip() == f"paradapt: error: --port: cannot listen on 127.0.0.1:{port} (in use?)"


def test_served_name_may_not_shadow_an_adapter(llama_setup, capsys):
    model_dir, root = llama_setup
    argv = ["serve", "--model", str(model_dir), "--adapter-root", str(root), "--served-model-name", "alpha"]
    assert cli.main(argv) == 2
    assert "'alpha' is also an adapter folder" in capsys.readouterr().err


def test_named_minilm_serves_its_bundled_classifiers():
    from paradapt import bundled

    app, info = serve_cli.build_server_app(
        cli.build_parser().parse_args(["serve", "--model", "all-minilm-l6-v2"])
    )
    assert info["name"] == "all-minilm-l6-v2" and info["kind"] == "encoder"
    assert info["root"] == bundled.bundled_root("all-minilm-l6-v2")
    with TestClient(app, base_url="http://localhost") as client:  # loopback: Host is checked
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert ids == ["all-minilm-l6-v2", *sorted(bundled.bundled("all-minilm-l6-v2"))]
        texts = ["a charming and affecting journey", "it 's slow -- very , very slow ."]
        r = client.post("/classify", json={"model": "sst2-parallel", "input": texts})
        assert r.status_code == 200, r.text
        assert [d["label"] for d in r.json()["data"]] == ["positive", "negative"]


def test_server_process_reports_a_server_that_exits(tmp_path):
    """The shared child-process helper (showcase, serve_load) quotes the server's own error line."""
    from paradapt.serve.process import ServerProcess, ServerStartError

    server = ServerProcess(["--model", str(tmp_path / "missing")])
    try:
        with pytest.raises(ServerStartError, match=r"exited with status 2: paradapt: error: --model"):
            server.wait_healthy(60)
    finally:
        assert server.stop() == 2


@pytest.mark.parametrize(
    "cores, torch_default, threads", [(1, 1, 1), (2, 2, 1), (4, 4, 3), (16, 8, 8), (16, 16, 15)]
)
def test_default_threads_leave_a_core_to_the_http_loop(monkeypatch, cores, torch_default, threads):
    import torch

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: torch_default)
    assert serve_cli.default_threads() == threads


def test_threads_flag_overrides_the_default(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(serve_cli, "default_threads", lambda: 3)
    model_dir = make_bert(tmp_path / "tiny-bert")
    before = torch.get_num_threads()
    try:
        for flags, expected in (([], 3), (["--threads", "2"], 2)):
            args = cli.build_parser().parse_args(["serve", "--model", str(model_dir), *flags])
            _, info = serve_cli.build_server_app(args)
            assert info["threads"] == expected == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_chat_template_flag_serves_chat_and_without_a_template_chat_is_400(llama_setup, tmp_path):
    """A tokenizer without a chat template: chat is refused (400 naming messages), not given an
    invented format; ``--chat-template FILE`` serves it with that template."""
    model_dir, _ = llama_setup
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    base = ["serve", "--model", str(model_dir), "--served-model-name", "m"]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for flags, status in (([], 400), (["--chat-template", str(template)], 200)):
        app, _ = serve_cli.build_server_app(cli.build_parser().parse_args([*base, *flags]))
        with TestClient(app, base_url="http://localhost") as client:  # bound to loopback: Host is checked
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == status, r.text
            if status == 400:
                assert (
                    r.json()["error"]["param"] == "messages"
                    and "chat-template" in r.json()["error"]["message"]
                )
    missing = cli.build_parser().parse_args([*base, "--chat-template", str(tmp_path / "none.jinja")])
    with pytest.raises(CLIError, match="--chat-template"):
        serve_cli.build_server_app(missing)


def _wait_queued(url: str, n: int, timeout: float = 30.0) -> None:
    """Until the server's ``paradapt_queue_length`` gauge says ``n`` requests wait."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        gauge = [ln.split()[-1] for ln in text.splitlines() if ln.startswith("paradapt_queue_length")]
        if gauge and float(gauge[0]) == n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{n} requests never waited in the queue")


def test_sigterm_past_the_drain_answers_every_request_in_openais_shape(tmp_path):
    """More work than ``--shutdown-timeout 0`` allows: every non-streamed request gets a 503 with
    an OpenAI error body (not uvicorn's plain-text 500), every stream ends with
    ``finish_reason: "abort"`` then ``[DONE]``, and the server exits 0."""
    import threading

    from conftest import asset_path, require_asset

    stories = require_asset(asset_path("models", "stories260k-hf"))
    port = free_port()
    cmd = [sys.executable, "-m", "paradapt.cli", "serve", "--model", str(stories), "--port", str(port)]
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)  # stories260K's tokenizer has none; chat without one is a 400
    cmd += ["--threads", "1", "--shutdown-timeout", "0", "--no-access-log", "--chat-template", str(template)]
    cmd += ["--max-running", "2"]  # the two streams run; the three posts wait behind them
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    body = {"model": "stories260k-hf", "prompt": "Once", "max_tokens": 480, "ignore_eos": True}
    chat = {
        **{k: v for k, v in body.items() if k != "prompt"},
        "messages": [{"role": "user", "content": "Hi"}],
    }
    whole: list[httpx.Response] = []
    try:
        _wait_healthy(proc, url)
        posts = [
            threading.Thread(
                target=lambda: whole.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60))
            )
            for _ in range(3)
        ]
        streams = []
        with (
            httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as a,
            httpx.stream(
                "POST", f"{url}/v1/chat/completions", json={**chat, "stream": True}, timeout=60
            ) as b,
        ):
            lines = [a.iter_lines(), b.iter_lines()]
            firsts = [next(x for x in it if x.startswith("data: ")) for it in lines]
            for t in posts:  # queued behind the running streams: none can finish before SIGTERM
                t.start()
            _wait_queued(url, 3)
            proc.send_signal(signal.SIGTERM)
            for first, it in zip(firsts, lines, strict=True):
                streams.append([first, *(ln for ln in it if ln.startswith("data: "))])
        for t in posts:
            t.join(timeout=60)
        assert [r.status_code for r in whole] == [503] * 3
        for r in whole:
            err = r.json()["error"]
            assert err["type"] == "server_error" and "shutting down" in err["message"]
        for events in streams:
            assert events[-1] == "data: [DONE]"
            assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "abort"
        proc.wait(timeout=60)
        assert proc.returncode == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_security_flags_make_the_guard_config(monkeypatch):
    monkeypatch.setenv("PARADAPT_API_KEY", "from-env")
    parse = cli.build_parser().parse_args
    g = serve_cli.guard_config(parse(["serve"]))
    assert g.api_key == "from-env" and g.allowed_hosts == ("localhost", "127.0.0.1", "[::1]")
    assert g.access_log and not g.metrics_without_key and g.max_request_bytes == 16 * 1024 * 1024
    g = serve_cli.guard_config(
        parse(["serve", "--api-key", "k", "--host", "0.0.0.0", "--no-access-log", "--metrics-without-key"])
    )
    assert g.api_key == "k" and g.allowed_hosts is None and not g.access_log and g.metrics_without_key
    g = serve_cli.guard_config(
        parse(["serve", "--allowed-hosts", "a.example, b.example", "--max-request-bytes", "10"])
    )
    assert g.allowed_hosts == ("a.example", "b.example") and g.max_request_bytes == 10
    assert serve_cli.guard_config(parse(["serve", "--allowed-hosts", "*"])).allowed_hosts is None


def _log_prompt(args, prompt: list[int]) -> None:
    """Build a server app from ``args`` (as a replica or the single process does), send one
    completion of ``prompt`` (token ids), and stop it, which closes its request log."""
    app, _ = serve_cli.build_server_app(args)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_replicas_share_the_request_logs_hash_key_so_a_shared_prompt_start_hashes_alike(tmp_path):
    # --replicas N: every replica appends to one --request-log; hashes keyed per replica would
    # make a prompt start two replicas both served look unrelated in the replay
    model_dir = make_llama(tmp_path / "tiny")
    log = tmp_path / "requests.jsonl"
    argv = ["serve", "--model", str(model_dir), "--served-model-name", "tiny", "--request-log", str(log)]
    args = cli.build_parser().parse_args([*argv, "--replicas", "2", "--threads-per-replica", "1"])
    one, _ = serve_cli._replica_args(args)
    assert isinstance(one.request_log_key, bytes) and len(one.request_log_key) == 16
    assert "request_log_key" not in vars(args)  # the driver's own flags are left as they were
    prompt = list(range(5, 25))  # 20 tokens: one whole unit of 16
    _log_prompt(one, prompt)  # replica 0
    _log_prompt(one, prompt)  # replica 1 (the same flags, as Ray hands them to each)
    _log_prompt(cli.build_parser().parse_args(argv), prompt)  # a single-process server: its own key
    lines = [json.loads(x) for x in log.read_text().splitlines() if '"t"' in x]
    hashes = [x["prefix_hashes"] for x in lines]
    assert len(hashes) == 3 and all(len(h) == 1 for h in hashes)
    assert hashes[0] == hashes[1] and hashes[2] != hashes[0]
    assert one.request_log_key.hex() not in log.read_text()
    no_hashes = cli.build_parser().parse_args([*argv, "--replicas", "2", "--request-log-no-hashes"])
    assert not hasattr(serve_cli._replica_args(no_hashes)[0], "request_log_key")
