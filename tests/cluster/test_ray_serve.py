"""``paradapt serve --replicas 2`` on Ray Serve, end to end: the real CLI as a child process (a
local Ray instance, two replicas of the stories260K model, three LoRA adapters), checked against
the single-process server built in-process from the same flags.

One cluster for the module (starting Ray and two replicas on 2 cores takes 30-40 s); the test
that stops it with SIGTERM runs last and checks that no Ray process is left.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import CHAT_TEMPLATE, asset_path, require_asset
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

import paradapt as pa
from paradapt import cli
from paradapt.cli import serve as serve_cli
from paradapt.cluster.ray_serve import REPLICA_HEADER  # imports ray: the test extra has the cluster extra
from paradapt.serve.process import ServerProcess

STORIES = asset_path("models", "stories260k-hf")
ADAPTERS = ("a1", "a2", "a3")
ENGINE_FLAGS = ["--max-slots", "2", "--max-served", "3", "--no-access-log"]
RAY_PROCESSES = ("raylet", "gcs_server", "ray::")
PLACEMENT = [["a2"], ["a1", "a3"]]  # the cluster starts from this plan (--placement)


def _ray_pids() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(ln.split()[0]) for ln in out.splitlines() if any(p in ln for p in RAY_PROCESSES)}


@pytest.fixture(scope="module")
def flags(tmp_path_factory) -> list[str]:
    """The serve flags both servers share: the model, a root of three LoRAs, a chat template."""
    require_asset(STORIES)
    root = tmp_path_factory.mktemp("adapters")
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    for name in ADAPTERS:
        pa.add_adapter(model, name, pa.LoRAConfig(r=4, init="random"))
        pa.save_adapter(model, name, root / name)
    template = root.parent / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    (root.parent / "plan.json").write_text(json.dumps({"placement": {"replicas": PLACEMENT}}))
    return [
        "--model",
        str(STORIES),
        "--adapter-root",
        str(root),
        "--chat-template",
        str(template),
        *ENGINE_FLAGS,
    ]


@pytest.fixture(scope="module")
def booting(flags):
    """``paradapt serve --replicas 2`` in a child process, started first: it boots while the
    reference server loads; SIGTERM at module end."""
    before = _ray_pids()
    folder = Path(flags[flags.index("--adapter-root") + 1]).parent
    plan, log = str(folder / "plan.json"), str(folder / "requests.jsonl")
    server = ServerProcess(
        [*flags, "--replicas", "2", "--threads-per-replica", "1", "--placement", plan, "--request-log", log]
    )
    server.request_log = Path(log)  # type: ignore[attr-defined]
    server.ray_before = before  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def single(flags, booting):
    """The single-process server on the same flags (the reference), built while the cluster boots."""
    args = cli.build_parser().parse_args(["serve", *flags, "--threads", "1"])
    app, _ = serve_cli.build_server_app(args)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture(scope="module")
def cluster(booting, single):
    """The cluster, once its one endpoint answers /health."""
    booting.wait_healthy(timeout=180)
    return booting


def _post(target, path: str, body: dict):
    if isinstance(target, ServerProcess):
        return httpx.post(f"{target.url}{path}", json=body, timeout=60)
    return target.post(path, json=body)


def _stream_text(url: str, path: str, body: dict) -> tuple[str, str]:
    """The text of an SSE completion (chat deltas or completion text) and the replica header."""
    text = []
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        replica = r.headers[REPLICA_HEADER]
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
    return "".join(text), replica


REQUESTS = [
    (model, prompt)
    for prompt in ("Once upon a time", "The little dog")
    for model in (*ADAPTERS, "stories260k-hf")
]


def test_greedy_outputs_equal_the_single_process_server(cluster, single):
    for model, prompt in REQUESTS:
        body = {"model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0}
        want = _post(single, "/v1/completions", body).json()["choices"][0]["text"]
        got = _post(cluster, "/v1/completions", body)
        assert got.status_code == 200, got.text
        assert got.json()["choices"][0]["text"] == want, (model, prompt)
        assert _stream_text(cluster.url, "/v1/completions", body)[0] == want, (model, prompt)
    chat = {"model": "a2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}
    want = _post(single, "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"]
    assert _post(cluster, "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"] == want
    assert _stream_text(cluster.url, "/v1/chat/completions", chat)[0] == want


def test_adapters_go_where_the_plan_placed_them_and_stick(cluster):
    """--placement: a1 and a3 on replica-1, a2 on replica-0, from their first request on (the
    router alone would have put a1, the first adapter asked for, on replica-0)."""
    where: dict[str, set[str]] = {}
    for _ in range(3):
        for model in ADAPTERS:
            r = _post(cluster, "/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200, r.text
            where.setdefault(model, set()).add(r.headers[REPLICA_HEADER])
    assert where == {"a1": {"replica-1"}, "a2": {"replica-0"}, "a3": {"replica-1"}}, where


def test_models_health_and_errors_in_openai_shape(cluster, single):
    models = httpx.get(f"{cluster.url}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [m["id"] for m in single.get("/v1/models").json()["data"]]
    assert httpx.get(f"{cluster.url}/health", timeout=30).json() == {"status": "ok"}
    r = _post(cluster, "/v1/completions", {"model": "no-such-adapter", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error" and r.json()["error"]["param"] == "model"
    r = _post(cluster, "/v1/completions", {"model": "a1", "prompt": "Hi", "max_tokens": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_metrics_cover_every_replica_and_the_router(cluster):
    """One scrape: each engine's metrics labelled with its replica, and the router's counters."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{cluster.url}/metrics", timeout=30).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    up = {s.labels["replica"]: s.value for s in fams["paradapt_replica_up"].samples}
    assert up == {"replica-0": 1.0, "replica-1": 1.0}
    replicas = {s.labels.get("replica") for s in fams["paradapt_base_weights_info"].samples}
    assert replicas == {"replica-0", "replica-1"}
    routed = {s.labels["replica"]: s.value for s in fams["paradapt_router_routed"].samples if s.name.endswith("_total")}
    assert routed["replica-0"] > 0 and routed["replica-1"] > 0  # the earlier tests' requests
    requests = next(s.value for s in fams["paradapt_router_requests"].samples if s.name.endswith("_total"))
    hits = next(s.value for s in fams["paradapt_router_hits"].samples if s.name.endswith("_total"))
    assert requests >= sum(routed.values()) - 1 and 0 < hits <= requests
    adapter_requests = next(
        s.value for s in fams["paradapt_router_adapter_requests"].samples if s.name.endswith("_total")
    )
    assert hits == adapter_requests > 0  # each replica had loaded its planned adapters ahead


def test_admin_holds_on_every_replica_or_is_answered_as_one_server(cluster, single):
    """vLLM's load_lora_adapter through the cluster reaches every replica (each lists the alias
    and serves it as its folder); a call every replica refuses changes nothing and is answered
    as the single-process server answers it, path kept private. (A refusal on one replica only,
    undone on the others, is tested with fake handles in test_ingress.py.)"""
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    want = _post(single, "/v1/completions", {**body, "model": "a2"}).json()["choices"][0]["text"]
    r = _post(cluster, "/v1/load_lora_adapter", {"lora_name": "mine", "lora_path": "a2"})
    assert r.status_code == 200 and "mine" in r.text, r.text
    listed: dict[str, set[str]] = {}
    for _ in range(16):  # /v1/models balances freely: both replicas answer within a few tries
        models = httpx.get(f"{cluster.url}/v1/models", timeout=30)
        listed[models.headers[REPLICA_HEADER]] = {m["id"] for m in models.json()["data"]}
    assert set(listed) == {"replica-0", "replica-1"} and all("mine" in ids for ids in listed.values())
    got = _post(cluster, "/v1/completions", {**body, "model": "mine"})
    assert got.status_code == 200 and got.json()["choices"][0]["text"] == want
    for outside in ("/etc", "../"):
        r = _post(cluster, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": outside})
        assert r.status_code == 403 and r.json()["error"]["param"] == "lora_path", r.text
        assert "/etc" not in r.text and "replicas" not in r.json()["error"]  # one server's answer
    assert _post(cluster, "/v1/unload_lora_adapter", {"lora_name": "mine"}).status_code == 200
    r = _post(cluster, "/v1/unload_lora_adapter", {"lora_name": "mine"})  # gone from every replica
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name", r.text


def test_sigterm_stops_ray_and_leaves_no_process(cluster):
    """Last in the module: stop the server as the fixture will, and look for Ray processes."""
    start = time.monotonic()
    assert cluster.stop(timeout=90) == 0
    assert time.monotonic() - start < 60
    time.sleep(2)
    left = _ray_pids() - cluster.ray_before
    assert not left, f"Ray processes left after SIGTERM: {sorted(left)}"
    _check_request_log(cluster.request_log)


def _check_request_log(path: Path) -> None:
    """--request-log with replicas: one header, then every replica's finished requests on one
    time axis, and the file replays as a trace (paradapt twin / bench read it)."""
    from paradapt.serve.trace import read_trace

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert sum(1 for line in lines if "t" not in line) == 1, lines[:2]  # the header, once
    requests = [line for line in lines if "t" in line]
    assert len(requests) >= len(REQUESTS) and all(r["t"] >= 0 for r in requests)
    assert {r["adapter"] for r in requests} >= {*ADAPTERS, "stories260k-hf"}
    assert len(read_trace(path).requests) == len(requests)
