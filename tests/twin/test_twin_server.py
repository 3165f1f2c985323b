"""The twin prices the HTTP server (``paradapt profile --server``): the cost file's ``server``
section, the twin's use of it (exact, on modelled numbers), the fits on synthetic traces, and
the measurement against the real in-process HTTP app (tiny Llama; no wall-clock thresholds)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from _train_fixtures import make_llama
from test_twin import COST, EXAMPLES

from paradapt import cli
from paradapt.errors import ConfigError
from paradapt.serve.core import MoveTime, StepShape, StepTrace
from paradapt.serve.workload import Workload, WorkloadRequest
from paradapt.twin import CostModel, SimBackend, SimEngine, replay, simulate
from paradapt.twin.costmodel import ServerCost
from paradapt.twin.server_cost import fit_step, lone, step_periods

SERVER = ServerCost(request=0.05, step=0.002, token=0.001, requests=30, fit={"steps": 12})


def with_server(server: ServerCost | None) -> CostModel:
    return CostModel.from_dict({**COST.to_dict(), **({"server": server.to_dict()} if server else {})})


def one_request(prompt_len: int = 10, output_len: int = 5) -> Workload:
    return Workload(None, (), (WorkloadRequest(0, None, 0.0, prompt_len, output_len),), 1.0)


# -- the cost file --------------------------------------------------------------------------------


def test_server_section_round_trips_and_shows_in_describe(tmp_path):
    cost = with_server(SERVER)
    back = CostModel.load(cost.save(tmp_path / "cost.json"))
    assert back.server == SERVER and back.to_dict() == cost.to_dict()
    assert json.loads((tmp_path / "cost.json").read_text())["server"]["request"] == 0.05
    text = back.describe()
    assert "HTTP server" in text and "50.000 ms" in text and "2000.0 us" in text and "30 requests" in text
    built = CostModel.from_coefficients({"step": 0.004}, server=SERVER)
    assert built.server is SERVER and "server" in built.to_dict()


def test_a_cost_file_without_a_server_section_loads_as_before(tmp_path):
    old = COST.to_dict()
    assert "server" not in old  # files written before --server: the content (and its hash) unchanged
    (tmp_path / "old.json").write_text(json.dumps(old))
    back = CostModel.load(tmp_path / "old.json")
    assert back.server is None and back.to_dict() == old and "HTTP server" not in back.describe()


@pytest.mark.parametrize("bad, field", [({"step": -1.0}, "server.step"), ({"request": "x"}, "server.request")])
def test_a_bad_server_section_is_an_error_naming_the_field(tmp_path, bad, field):
    (tmp_path / "bad.json").write_text(json.dumps({**COST.to_dict(), "server": {**SERVER.to_dict(), **bad}}))
    with pytest.raises(ConfigError, match=field):
        CostModel.load(tmp_path / "bad.json")


# -- the twin with it -----------------------------------------------------------------------------


def test_the_request_term_shifts_ttft_and_finish_by_exactly_request():
    latency_only = with_server(ServerCost(request=0.05))
    base = simulate(one_request(), COST, max_served=1, max_slots=1, drain=10)
    priced = simulate(one_request(), latency_only, max_served=1, max_slots=1, drain=10)
    assert priced.ttft_p50 == pytest.approx(base.ttft_p50 + 0.05, abs=1e-12)
    assert priced.tpot_p50 == pytest.approx(base.tpot_p50, abs=1e-12)  # first and finish move together
    assert priced.extra["busy_seconds"] == base.extra["busy_seconds"]  # a latency, not engine time
    off = simulate(one_request(), latency_only, max_served=1, max_slots=1, drain=10, server=False)
    assert off.to_dict() | {"sim_seconds": 0} == base.to_dict() | {"sim_seconds": 0}


def test_each_step_costs_step_plus_token_per_emitted_token_more():
    cost = with_server(SERVER)
    work = one_request(prompt_len=10, output_len=5)  # one prefill step, then four decodes: 1 token each
    base = replay(work, SimBackend(SimEngine(work, COST, _config())), drain=10)
    priced = replay(work, SimBackend(SimEngine(work, cost, _config())), drain=10)
    assert len(base.steps) == len(priced.steps) == 5
    gaps = [b.end - a.end for a, b in zip(base.steps, base.steps[1:], strict=False)]
    priced_gaps = [b.end - a.end for a, b in zip(priced.steps, priced.steps[1:], strict=False)]
    for g, p in zip(gaps, priced_gaps, strict=True):
        assert p == pytest.approx(g + 0.002 + 0.001, abs=1e-12)
    assert priced.first["w0"] == pytest.approx(base.first["w0"] + 0.003 + 0.05, abs=1e-12)
    assert priced.finished["w0"] == pytest.approx(base.finished["w0"] + 5 * 0.003 + 0.05, abs=1e-12)


def test_a_batched_step_pays_the_token_term_per_streamed_token():
    cost = with_server(ServerCost(token=0.001))
    reqs = tuple(WorkloadRequest(i, None, 0.0, 4, 3) for i in range(4))
    work = Workload(None, (), reqs, 1.0)
    base = simulate(work, COST, max_served=1, max_slots=1, drain=10)
    priced = simulate(work, cost, max_served=1, max_slots=1, drain=10)
    # every token of every request is streamed once: 4 x 3 tokens, whatever the batching
    assert priced.extra["busy_seconds"] == pytest.approx(base.extra["busy_seconds"] + 12 * 0.001, abs=1e-12)


def _config():
    from paradapt.twin import engine_config

    return engine_config(1, 1, queue_bound=8)


# -- the fits ----------------------------------------------------------------------------------------


def _trace(start: float, seconds: float, decodes: int, prefill: int = 0, moves: float = 0.0) -> StepTrace:
    seqs = 1 if prefill else 0
    shape = StepShape(prefill, seqs, decodes, decodes + seqs, 0, 0, ((None, prefill + decodes),))
    mv = (MoveTime("load_device", "a", 1, moves),) if moves else ()
    return StepTrace(shape, seconds, mv, start)


def test_step_periods_count_only_steps_followed_at_once():
    steps = [
        _trace(0.0, 0.01, 0, prefill=8),
        _trace(0.02, 0.01, 1, moves=0.004),  # an adapter move is priced apart
        _trace(0.05, 0.01, 1),
        _trace(0.5, 0.01, 0, prefill=4),
    ]
    periods = step_periods(steps)
    assert [round(p, 9) for _, p in periods] == [0.02, 0.026]  # the last gap waited for an arrival
    assert periods[0][0] is steps[0]


def test_fit_step_recovers_known_server_costs():
    info: dict = {}
    steps, t = [], 0.0
    for i in range(60):
        decodes = 1 + i % 8
        shape_step = _trace(t, 0.0, decodes)
        period = COST.step_time(shape_step.shape, info) + 0.0015 + 0.0004 * shape_step.shape.samplers
        steps.append(replace(shape_step, seconds=period * 0.9))
        t += period
    steps.append(_trace(t, 0.0, 1))
    step, token, fit = fit_step(step_periods(steps), COST, info)
    assert step == pytest.approx(0.0015, rel=1e-6) and token == pytest.approx(0.0004, rel=1e-6)
    assert fit["steps"] == 60 and fit["period_error_with_server"]["mape"] < fit["period_error_in_process"]["mape"]


def test_lone_requests_are_those_nothing_overlapped_before_their_first_chunk():
    from paradapt.bench import Outcome

    outcomes = {
        0: Outcome(sent=0.0, chunks=[0.1, 0.3]),
        1: Outcome(sent=0.2, chunks=[0.4, 0.5]),  # sent while 0 streamed
        2: Outcome(sent=1.0, chunks=[1.1, 1.2]),
        3: Outcome(sent=2.0, chunks=[], status="429"),
    }
    assert lone(outcomes) == [0, 2]


# -- against the real HTTP app ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from paradapt.loading import load_model

    return load_model(make_llama(tmp_path_factory.mktemp("srv") / "tiny-llama"))


def test_profile_server_measures_the_real_http_app(tiny):
    import paradapt as pa
    from paradapt.cli.serve import serve_engine
    from paradapt.twin.server_cost import profile_server

    tok, model = tiny
    sizes = dict(requests=4, saturating=6, low_rate=4.0, high_rate=200.0, max_running=4, token_budget=64)
    s = profile_server(
        model, COST, serve_engine, tokenizer=tok, kinds=("lora",), ranks=(4,), log=lambda m: None, **sizes
    )
    assert s.requests == 4 + 6  # exactly what it sent (the two warm-up requests aside)
    for v in (s.request, s.step, s.token):
        assert math.isfinite(v) and v >= 0
    assert s.fit["steps"] > 0 and 0 <= s.fit["lone_requests"] <= 4
    assert math.isfinite(s.fit["request_median_ms"])
    assert not pa.list_adapters(model)  # the model is left bare
    with pytest.raises(ConfigError, match="tokenizer"):
        profile_server(model, COST, serve_engine, tokenizer=None, log=lambda m: None)


def test_cli_profile_server_writes_the_section_and_twin_uses_it(tiny, tmp_path, capsys, monkeypatch):
    from paradapt.twin import profile as profile_mod

    real = profile_mod.profile

    def quick(model, **kw):  # the in-process profile at test size (its own test covers it)
        small = {"workload_rates": (20.0,), "workload_seconds": 0.3, "copies": 1, "move_repeats": 1}
        return real(model, **{**kw, **small})

    monkeypatch.setattr(profile_mod, "profile", quick)
    folder = make_llama(tmp_path / "m")
    out = tmp_path / "cost.json"
    argv = ["profile", "--model", str(folder), "--kinds", "lora", "--ranks", "4", "--scenarios", "2"]
    argv += ["--max-running", "4", "--token-budget", "64", "--server", "--server-requests", "3", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "HTTP server (paradapt profile --server, 15 requests)" in capsys.readouterr().out  # 3 + 3 x 4
    saved = json.loads(out.read_text())["server"]
    assert saved["requests"] == 15 and all(saved[k] >= 0 for k in ("request", "step", "token"))

    cost = with_server(ServerCost(request=0.05)).save(tmp_path / "priced.json")
    twin = ["twin", str(EXAMPLES / "workload.yaml"), "--max-served", "8", "--max-slots", "4"]
    twin += ["--cost", str(cost), "--drain", "100"]  # every first token counts, shifted or not
    assert cli.main([*twin, "--json", str(tmp_path / "on.json")]) == 0
    assert "HTTP server priced" in capsys.readouterr().out
    assert cli.main([*twin, "--no-server", "--json", str(tmp_path / "off.json")]) == 0
    assert "HTTP server priced" not in capsys.readouterr().out
    on, off = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("on", "off"))
    assert on["ttft_p50"] == pytest.approx(off["ttft_p50"] + 0.05, abs=1e-9)
    assert on["throughput"] == off["throughput"]
