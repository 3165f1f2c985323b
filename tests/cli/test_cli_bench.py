"""``paradapt bench`` against a live server (a tiny Llama): exact counts, refusals by status, the
request log it leaves replays through the twin, an unreachable server is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _train_fixtures import make_llama
from test_serve_api import live_server
from test_twin import COST

import paradapt as pa
from paradapt import cli
from paradapt.cli import serve as serve_cli
from paradapt.loading import load_model
from paradapt.serve.process import free_port
from paradapt.serve.trace import read_trace

ROWS = [
    {"t": 0.00, "adapter": "alpha", "input_len": 5, "output_len": 4},
    {"t": 0.05, "adapter": "beta", "input_len": 3, "output_len": 7},
    {"t": 0.10, "adapter": None, "input_len": 8, "output_len": 2},
    {"t": 0.10, "adapter": "alpha", "input_len": 2, "output_len": 1},
    {"t": 0.20, "adapter": "beta", "input_len": 6, "output_len": 5, "prompt": [5, 6, 7, 8, 9, 10]},
    {"t": 0.30, "adapter": "alpha", "input_len": 4, "output_len": 3},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("bench")
    model_dir = make_llama(base / "tiny-llama")
    root = base / "adapters"
    for name in ("alpha", "beta"):
        _, model = load_model(model_dir)
        pa.add_adapter(model, name, pa.LoRAConfig(r=2))
        pa.save_adapter(model, name, root / name)
    return model_dir, root


def _trace(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _server(setup, *extra: str):
    model_dir, root = setup
    argv = ["serve", "--model", str(model_dir), "--adapter-root", str(root), "--served-model-name", "tiny"]
    return serve_cli.build_server_app(cli.build_parser().parse_args([*argv, "--no-access-log", *extra]))[0]


def test_bench_counts_exactly_what_it_sent_and_the_request_log_replays(setup, tmp_path, capsys):
    trace = _trace(tmp_path / "t.jsonl", ROWS)
    log_path = tmp_path / "requests.jsonl"
    out = tmp_path / "bench.json"
    app = _server(setup, "--request-log", str(log_path))
    with live_server(app) as port:
        argv = ["bench", str(trace), "--url", f"http://127.0.0.1:{port}", "--vocab-size", "20", "--no-progress"]
        assert cli.main([*argv, "--json", str(out), "--slo-ttft", "1e9"]) == 0
    app.state.loop.metrics.request_log.close()
    printed = capsys.readouterr().out
    for word in ("open loop", "6 sent, 6 served, failed: none", "ITL p50", "goodput", "TTFT p50"):
        assert word in printed
    d = json.loads(out.read_text())
    assert d["extra"]["sent"] == d["requests"] == d["finished"] == 6 and d["extra"]["failed"] == {}
    assert d["extra"]["input_tokens"] == sum(r["input_len"] for r in ROWS)
    assert d["extra"]["output_tokens"] == sum(r["output_len"] for r in ROWS)
    for key in ("throughput", "output_throughput", "requests_per_s", "ttft_p50", "tpot_p90", "itl_p99", "goodput"):
        assert key in d
    assert set(d["served_fraction"]) == {"alpha", "beta", "null"}  # null: the base model
    # the server's request log: one line per request, the same lengths, the base under its name
    logged = read_trace(log_path)
    assert sorted((str(r.adapter), r.prompt_len, r.output_len) for r in logged.requests) == sorted(
        (str(r["adapter"]), r["input_len"], r["output_len"]) for r in ROWS
    )
    lines = [json.loads(x) for x in log_path.read_text().splitlines()[1:]]
    assert {x["finish_reason"] for x in lines} == {"length"} and all(x["ttft"] >= 0 for x in lines)
    cost = COST.save(tmp_path / "cost.json")
    twin = tmp_path / "twin.json"
    argv = ["twin", str(log_path), "--max-served", "2", "--max-slots", "1", "--cost", str(cost), "--drain", "10"]
    assert cli.main([*argv, "--json", str(twin)]) == 0
    replayed = json.loads(twin.read_text())
    assert replayed["requests"] == replayed["finished"] == 6
    assert set(replayed) - {"extra"} == set(d) - {"extra"}  # bench and twin: the same keys


def test_bench_reports_the_prompt_tokens_the_server_served_from_its_prefix_cache(setup, tmp_path, capsys):
    prompt = list(range(3, 23))  # 20 tokens: one full page of 16 can be shared
    rows = [{"t": 0.0, "adapter": "alpha", "input_len": 20, "output_len": 2, "prompt": prompt}] * 3
    out = tmp_path / "bench.json"
    for flag, want in (("--enable-prefix-caching", 32), ("--no-enable-prefix-caching", 0)):
        with live_server(_server(setup, flag)) as port:  # one at a time: the 2nd and 3rd find the 1st's page
            argv = ["bench", str(_trace(tmp_path / "t.jsonl", rows)), "--url", f"http://127.0.0.1:{port}"]
            assert cli.main([*argv, "--concurrency", "1", "--no-progress", "--json", str(out)]) == 0
        assert json.loads(out.read_text())["extra"]["cached_input_tokens"] == want
        assert f"60 in ({want} from the prefix cache)" in capsys.readouterr().out


def test_refused_requests_are_counted_by_status_never_served(setup, tmp_path, capsys):
    rows = [{**r, "t": 0.0} for r in ROWS[:3]] + [{"t": 0.0, "adapter": "nope", "input_len": 3, "output_len": 2}]
    trace = _trace(tmp_path / "t.jsonl", rows)
    out = tmp_path / "bench.json"
    with live_server(_server(setup)) as port:
        argv = ["bench", str(trace), "--url", f"http://127.0.0.1:{port}", "--vocab-size", "20"]
        assert cli.main([*argv, "--concurrency", "2", "--no-progress", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["extra"]["failed"] == {"404": 1} and d["extra"]["served"] == d["finished"] == 3
    assert d["extra"]["output_tokens"] == sum(r["output_len"] for r in rows[:3])
    assert "nope" not in d["served_fraction"] or d["served_fraction"]["nope"] == 0
    assert "closed loop, concurrency 2" in capsys.readouterr().out


def test_unreachable_server_is_a_one_line_error(tmp_path, capsys):
    trace = _trace(tmp_path / "t.jsonl", ROWS[:2])
    assert cli.main(["bench", str(trace), "--url", f"http://127.0.0.1:{free_port()}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the server" in err and len(err.strip().splitlines()) == 1


def test_a_bad_trace_fails_before_anything_is_sent(tmp_path, capsys):
    trace = _trace(tmp_path / "bad.jsonl", [ROWS[0], {**ROWS[1], "t": -1}])
    assert cli.main(["bench", str(trace), "--url", "http://127.0.0.1:9", "--no-progress"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_requests_longer_than_the_servers_context_fail_before_anything_is_sent(setup, tmp_path, capsys):
    trace = _trace(tmp_path / "long.jsonl", [ROWS[0], {**ROWS[1], "input_len": 100, "output_len": 100}])
    app = _server(setup)
    with live_server(app) as port:
        argv = ["bench", str(trace), "--url", f"http://127.0.0.1:{port}", "--vocab-size", "20", "--no-progress"]
        assert cli.main(argv) == 2
        assert app.state.loop.metrics.tokens_out == 0  # nothing was sent
    assert "long.jsonl: request 1: input_len + output_len = 200 exceeds" in capsys.readouterr().err


def test_a_traces_shared_prefix_is_sent_as_shared_tokens_and_the_twin_predicts_the_same_hits(setup, tmp_path):
    """Three requests to ``alpha`` sharing their first 17 of 20 tokens (one full page of 16), each
    arriving after the one before has finished: the server finds the page cached for the second
    and the third, and the twin, replaying the same trace, counts the same tokens."""
    rows = [
        {"t": t, "adapter": "alpha", "input_len": 20, "output_len": 2, "shared_prefix": 17} for t in (0.0, 0.5, 1.0)
    ]
    trace = _trace(tmp_path / "t.jsonl", rows)
    out = tmp_path / "bench.json"
    with live_server(_server(setup)) as port:
        argv = ["bench", str(trace), "--url", f"http://127.0.0.1:{port}", "--vocab-size", "20", "--no-progress"]
        assert cli.main([*argv, "--json", str(out)]) == 0
    measured = json.loads(out.read_text())["extra"]["cached_input_tokens"]
    twin = tmp_path / "twin.json"
    cost = COST.save(tmp_path / "cost.json")
    argv = ["twin", str(trace), "--max-served", "2", "--max-slots", "1", "--cost", str(cost), "--drain", "10"]
    assert cli.main([*argv, "--json", str(twin)]) == 0
    assert measured == json.loads(twin.read_text())["extra"]["cached_input_tokens"] == 32


def test_a_request_log_replays_the_prefix_sharing_it_recorded(setup, tmp_path):
    """The shared-prefix trace above, sent to a server that logs its requests; the log (prefix
    hashes, no prompts) sent again to a fresh server finds the same tokens cached, and the twin
    replaying the log predicts them."""
    rows = [
        {"t": t, "adapter": "alpha", "input_len": 20, "output_len": 2, "shared_prefix": 17} for t in (0.0, 0.5, 1.0)
    ]
    log_path = tmp_path / "requests.jsonl"
    app = _server(setup, "--request-log", str(log_path))
    with live_server(app) as port:
        argv = ["bench", str(_trace(tmp_path / "t.jsonl", rows)), "--url", f"http://127.0.0.1:{port}"]
        assert cli.main([*argv, "--vocab-size", "20", "--no-progress"]) == 0
    app.state.loop.metrics.request_log.close()
    out = tmp_path / "replay.json"
    with live_server(_server(setup)) as port:
        argv = ["bench", str(log_path), "--url", f"http://127.0.0.1:{port}", "--vocab-size", "20"]
        assert cli.main([*argv, "--no-progress", "--json", str(out)]) == 0
    twin = tmp_path / "twin.json"
    cost = COST.save(tmp_path / "cost.json")
    argv = ["twin", str(log_path), "--max-served", "2", "--max-slots", "1", "--cost", str(cost), "--drain", "10"]
    assert cli.main([*argv, "--json", str(twin)]) == 0
    replayed = json.loads(out.read_text())["extra"]["cached_input_tokens"]
    assert replayed == json.loads(twin.read_text())["extra"]["cached_input_tokens"] == 32
