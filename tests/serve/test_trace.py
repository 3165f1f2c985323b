"""Request traces: spec -> trace -> twin gives the spec's result, bad lines are named, request logs replay."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from test_twin import COST, SPEC

from paradapt import cli
from paradapt.errors import ConfigError
from paradapt.serve.engine import RequestHandle
from paradapt.serve.request_log import RequestLog
from paradapt.serve.sampling import SamplingParams
from paradapt.serve.trace import is_trace, load_workload, read_trace, write_trace
from paradapt.serve.workload import leading_ids
from paradapt.twin import simulate
from paradapt.twin.features import trace_features, workload_features

GOOD = {"t": 0.5, "adapter": "a", "input_len": 4, "output_len": 3}


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_spec_trace_twin_round_trip_gives_the_specs_result(tmp_path):
    workload = SPEC.generate()
    path = write_trace(tmp_path / "t.jsonl", workload)
    back = read_trace(path)
    assert back.duration == SPEC.duration and back.adapters == workload.adapters
    assert [(r.adapter, r.arrival, r.prompt_len, r.output_len) for r in back.requests] == [
        (r.adapter, r.arrival, r.prompt_len, r.output_len) for r in workload.requests
    ]
    a = simulate(SPEC, COST, max_served=3, max_slots=2, drain=0.5)
    b = simulate(back, COST, max_served=3, max_slots=2, drain=0.5)
    assert a.row() == b.row() and a.served_fraction == b.served_fraction


def test_a_shared_prefix_survives_the_trace_and_the_twin_prices_its_cache_hits(tmp_path):
    spec = SPEC.__class__(**{**SPEC.to_dict(), "shared_prefix": 9})
    back = read_trace(write_trace(tmp_path / "t.jsonl", spec.generate()))
    assert [r.shared_prefix for r in back.requests] == [r.shared_prefix for r in spec.generate().requests]
    knobs = dict(max_served=3, max_slots=2, drain=0.5, page_size=4)
    a, b = simulate(spec, COST, **knobs), simulate(back, COST, **knobs)
    assert a.row() == b.row() and a.extra["cached_input_tokens"] == b.extra["cached_input_tokens"] > 0
    assert simulate(SPEC, COST, **knobs).extra["cached_input_tokens"] == 0
    off = simulate(spec, COST, **knobs, prefix_caching=False)
    assert "cached_input_tokens" not in off.extra and off.row() != a.row()


def test_cli_workload_then_twin_prints_the_same_metrics(tmp_path, capsys):
    spec = tmp_path / "w.yaml"
    spec.write_text(
        "num_adapters: 6\nrate: 60\nduration: 0.6\nalpha: 0.3\ninput_len: [2, 30]\noutput_len: [2, 12]\n"
        "ranks: [4, 8]\nkinds: [lora, parallel, series]\n"
    )
    trace = tmp_path / "t.jsonl"
    assert cli.main(["workload", str(spec), "--out", str(trace)]) == 0
    assert "wrote" in capsys.readouterr().out and is_trace(trace) and not is_trace(spec)
    cost = COST.save(tmp_path / "cost.json")
    outs = []
    for src in (spec, trace):
        j = tmp_path / f"{src.suffix[1:]}.json"
        argv = [
            "twin",
            str(src),
            "--max-served",
            "3",
            "--max-slots",
            "2",
            "--cost",
            str(cost),
            "--json",
            str(j),
        ]
        assert cli.main(argv) == 0
        d = json.loads(j.read_text())
        d.pop("sim_seconds")
        outs.append(d)
    assert outs[0] == outs[1]
    assert "trace of" in capsys.readouterr().out


def test_trace_features_are_close_to_the_specs():
    spec = SPEC.__class__(
        **{**SPEC.to_dict(), "duration": 200.0, "input_len": (2, 30), "output_len": (2, 12)}
    )
    measured = trace_features(read_back(spec))
    exact = workload_features(spec)
    for name in ("rate_total", "input_mean", "output_mean", "cv", "rank_mean", "num_adapters"):
        assert measured[name] == pytest.approx(exact[name], rel=0.1), name


def read_back(spec):
    from paradapt.serve.trace import parse_trace, trace_lines

    return parse_trace(list(trace_lines(spec.generate())), "mem")


@pytest.mark.parametrize(
    "row, field, message",
    [
        ({k: v for k, v in GOOD.items() if k != "input_len"}, "input_len", "missing field"),
        ({**GOOD, "output_len": "3"}, "output_len", "integer"),
        ({**GOOD, "output_len": True}, "output_len", "integer"),
        ({**GOOD, "t": -1}, "t", ">= 0"),
        ('{"t": NaN, "adapter": "a", "input_len": 4, "output_len": 3}', "t", "finite"),
        ({**GOOD, "adapter": 3}, "adapter", "name"),
        ({**GOOD, "prompt": [1, 2]}, "prompt", "input_len"),
        ({**GOOD, "shared_prefix": 5}, "shared_prefix", "0 to input_len"),
        ({**GOOD, "shared_prefix": -1}, "shared_prefix", "0 to input_len"),
        ("[1, 2]", "trace", "object"),
        ("{not json", "trace", "JSON"),
        ({"trace": {"window": 1.0}}, "trace", "first line"),
    ],
)
def test_bad_line_is_an_error_naming_file_line_and_field(tmp_path, row, field, message):
    path = _write(tmp_path / "bad.jsonl", [GOOD, row])
    with pytest.raises(ConfigError) as e:
        read_trace(path)
    assert e.value.field == field and "bad.jsonl:2" in str(e.value) and message in str(e.value)


def test_unknown_adapter_and_context_checked_before_anything_runs(tmp_path):
    path = _write(tmp_path / "t.jsonl", [GOOD, {**GOOD, "adapter": "zzz", "t": 1.0}])
    with pytest.raises(ConfigError, match=r"t.jsonl:2: unknown adapter 'zzz'") as e:
        read_trace(path, adapters={"a"})
    assert e.value.field == "adapter"
    with pytest.raises(ConfigError, match=r"t.jsonl:1: input_len \+ output_len = 7 exceeds"):
        read_trace(path, context=6)
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    argv = ["twin", str(path), "--max-served", "2", "--max-slots", "1", "--adapter-root", str(root)]
    assert cli.main(argv) == 2


def test_unsorted_times_are_sorted_with_a_warning(tmp_path):
    path = _write(tmp_path / "u.jsonl", [{**GOOD, "t": 2.0}, {**GOOD, "t": 1.0, "adapter": "b"}])
    with pytest.warns(UserWarning, match="u.jsonl: arrival times are not sorted"):
        w = read_trace(path)
    assert [r.adapter for r in w.requests] == ["b", "a"] and [r.id for r in w.requests] == [0, 1]
    assert w.duration == 2.0  # no header: the last arrival


def test_base_name_and_header(tmp_path):
    head = {"trace": {"window": 5.0, "base": "m", "adapters": {"a": {"kind": "parallel", "rank": 16}}}}
    path = _write(tmp_path / "h.jsonl", [head, GOOD, {**GOOD, "adapter": "m"}, {**GOOD, "adapter": None}])
    w = read_trace(path)
    assert [r.adapter for r in w.requests] == ["a", None, None] and w.duration == 5.0
    assert [(a.name, a.kind, a.rank) for a in w.adapters] == [("a", "parallel", 16)]
    r = simulate(w, COST, max_served=1, max_slots=1, drain=5.0)
    assert r.finished == 3
    with pytest.raises(ConfigError, match="kind"):
        read_trace(_write(tmp_path / "k.jsonl", [{"trace": {"adapters": {"a": {"kind": "x"}}}}, GOOD]))


def test_load_workload_reads_yaml_specs_too(tmp_path):
    spec = tmp_path / "w.yaml"
    spec.write_text("num_adapters: 2\nrate: 10\nduration: 1\n")
    assert load_workload(spec).spec.num_adapters == 2


def _handle(rid: str, adapter: str | None, arrival: float, n_in: int, n_out: int) -> RequestHandle:
    h = RequestHandle(rid, adapter, list(range(3, 3 + n_in)), SamplingParams(max_new_tokens=n_out))
    h.tokens = [5] * n_out
    h.arrival, h.first_token_at, h.finished_at = arrival, arrival + 0.1, arrival + 0.3
    h.status, h.finish_reason = "finished", "length"
    return h


def test_request_log_lines_replay_through_the_twin(tmp_path, monkeypatch):
    import paradapt.serve.request_log as request_log

    monkeypatch.setattr(request_log.time, "time", lambda: 5e8)  # no wall time passes while it opens
    path = tmp_path / "logs" / "requests.jsonl"
    t0 = 1000.0
    log = RequestLog(path, base="model", clock=lambda: t0)
    first = _handle("1", "a", t0 + 0.2, 5, 4)
    first.cached_tokens = 4
    log.record(first)
    log.record(_handle("2", None, t0 + 0.5, 3, 2))
    enc = _handle("3", "a", t0 + 0.6, 3, 1)
    enc.task = "classify"
    log.record(enc)  # encoder requests are not generations: not logged
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["trace"]["base"] == "model" and len(lines) == 3
    assert lines[1] == {
        "t": pytest.approx(0.2),
        "adapter": "a",
        "input_len": 5,
        "output_len": 4,
        "ttft": pytest.approx(0.1),
        "e2e": pytest.approx(0.3),
        "finish_reason": "length",
        "cached_tokens": 4,
        "prefix_hashes": [],  # 5 prompt tokens: no whole unit of 16
    }
    w = read_trace(path)
    assert [(r.adapter, r.prompt_len, r.output_len) for r in w.requests] == [("a", 5, 4), (None, 3, 2)]
    result = simulate(w, COST, max_served=1, max_slots=1, drain=5.0)
    assert result.requests == 2 and result.finished == 2
    # a restarted server appends on the same time axis (the header's start)
    later = RequestLog(path, base="model", clock=lambda: 50.0)
    later.record(_handle("4", "a", 51.0, 2, 2))  # 1 s after this server started
    later.close()
    rows = [json.loads(r) for r in path.read_text().splitlines()]
    assert len(rows) == 4 and sum("trace" in r for r in rows) == 1
    assert rows[-1]["t"] >= 1.0  # at least 1 s after the first server's start
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # still sorted
        assert len(read_trace(path).requests) == 3


def test_a_request_logs_prefix_hashes_replay_as_prompts_that_share_what_the_logged_ones_shared(tmp_path):
    path = tmp_path / "requests.jsonl"
    log = RequestLog(path, base="model", clock=lambda: 0.0)
    system = list(range(100, 140))  # 40 shared tokens: two whole units of 16
    cases = [("a", [1, 2, 3], None), ("a", [4, 5, 6, 7], None), ("b", [1, 2, 3], None), ("a", [1], "tenant")]
    for i, (adapter, tail, salt) in enumerate(cases):
        h = _handle(str(i), adapter, float(i), 1, 2)
        h.prompt, h.params = system + tail, SamplingParams(max_new_tokens=2, cache_salt=salt)
        log.record(h)
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()[1:]]
    hashes = [x["prefix_hashes"] for x in lines]
    assert all(len(h) == 2 for h in hashes)
    assert hashes[0] == hashes[1] and hashes[2][0] != hashes[0][0]  # same adapter shares; another does not
    assert hashes[3][0] != hashes[0][0] and "tenant" not in path.read_text()  # a cache_salt keeps its requests apart
    lines, hashes = lines[:3], hashes[:3]
    assert all("prompt" not in x for x in lines) and "100, 101, 102" not in path.read_text()  # no tokens
    back = read_trace(path)
    lead = [leading_ids(r, 0, range(3, 20)) for r in back.requests][:3]  # what bench sends first
    assert lead[0] == lead[1] and len(lead[0]) == 32 and lead[2][:16] != lead[0][:16]
    assert all(3 <= t < 20 for x in lead for t in x)
    again_back = read_trace(write_trace(tmp_path / "round.jsonl", back))
    assert [r.prefix_hashes for r in again_back.requests] == [r.prefix_hashes for r in back.requests]
    again = RequestLog(tmp_path / "other.jsonl", base="model", clock=lambda: 0.0)
    h = _handle("x", "a", 0.0, 1, 2)
    h.prompt = system
    again.record(h)
    again.close()
    other = json.loads((tmp_path / "other.jsonl").read_text().splitlines()[1])["prefix_hashes"]
    assert other[0] != hashes[0][0]  # keyed per log: nothing to look a known prompt up by


def test_a_request_log_without_hashes_keeps_only_the_counts(tmp_path):
    from paradapt.cli import build_parser

    assert build_parser().parse_args(["serve", "--request-log-no-hashes"]).request_log_no_hashes
    log = RequestLog(tmp_path / "r.jsonl", base="model", clock=lambda: 0.0, prefix_hashes=False)
    h = _handle("1", "a", 0.5, 40, 2)
    log.record(h)
    log.close()
    line = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[1])
    assert "prefix_hashes" not in line and line["input_len"] == 40
    assert read_trace(tmp_path / "r.jsonl").requests[0].prefix_hashes is None


def test_bad_prefix_hashes_are_named(tmp_path):
    for row, message in (
        ({**GOOD, "input_len": 16, "prefix_hashes": ["ab", "cd"]}, "one per whole 16"),
        ({**GOOD, "prefix_hashes": "ab"}, "list of hash strings"),
    ):
        with pytest.raises(ConfigError, match=message) as e:
            read_trace(_write(tmp_path / "bad.jsonl", [row]))
        assert e.value.field == "prefix_hashes" and "bad.jsonl:1" in str(e.value)


def test_replicas_appending_to_one_request_log_share_its_header_and_time_axis(tmp_path):
    """paradapt serve --replicas N --request-log FILE: the driver writes the header (start_log),
    then each replica's RequestLog appends: one header, every line whole, one time axis."""
    from paradapt.serve.request_log import start_log

    path = tmp_path / "requests.jsonl"
    start = start_log(path, "model")
    assert start_log(path, "model") == start  # an existing header is kept
    logs = [RequestLog(path, base="model", clock=lambda: 100.0) for _ in range(2)]
    for i in range(50):
        for k, log in enumerate(logs):
            log.record(_handle(f"{k}-{i}", f"a{k}", 100.0 + i * 0.01, 3, 2))
    for log in logs:
        log.close()
    rows = [json.loads(r) for r in path.read_text().splitlines()]
    assert sum("trace" in r for r in rows) == 1 and len(rows) == 101
    assert {r["adapter"] for r in rows if "t" in r} == {"a0", "a1"}
    assert len(read_trace(path).requests) == 100


def _root_with_shapes(tmp_path: Path) -> Path:
    """Adapter folders of four kinds (one rank given by a reduction factor) and a broken one."""
    import paradapt as pa
    from paradapt.twin.profile import build_model

    model = build_model(layers=2, hidden=64)
    root = tmp_path / "root"
    for name, cfg in {
        "par16": pa.ParallelConfig(r=16),
        "ser_rf": pa.SeriesConfig(reduction_factor=8),
        "lora4": pa.LoRAConfig(r=4),
        "ia3": pa.IA3Config(),
    }.items():
        pa.add_adapter(model, name, cfg)
        pa.save_adapter(model, name, root / name)
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    return root


def test_adapter_root_gives_each_folders_kind_and_rank(tmp_path):
    from paradapt.serve.trace import shapes_in

    shapes = shapes_in(_root_with_shapes(tmp_path))
    assert shapes == {
        "broken": ("lora", 8),  # unreadable: the default (the server says what is wrong with it)
        "ia3": ("ia3", 1),
        "lora4": ("lora", 4),
        "par16": ("parallel", 16),
        "ser_rf": ("series", 8),  # hidden 64 / reduction factor 8
    }


def test_a_traces_adapters_are_priced_by_their_folders(tmp_path, capsys):
    root = _root_with_shapes(tmp_path)
    header = {"trace": {"window": 2.0, "adapters": {"par16": {"kind": "lora", "rank": 64}}}}
    rows = [header] + [
        {"t": 0.1 * i, "adapter": a, "input_len": 8, "output_len": 4}
        for i, a in enumerate(["par16", "ser_rf", "lora4"])
    ]
    path = _write(tmp_path / "t.jsonl", rows)
    from paradapt.serve.trace import shapes_in

    w = read_trace(path, adapters=shapes_in(root))
    assert {a.name: (a.kind, a.rank) for a in w.adapters} == {
        "par16": ("parallel", 16),  # the folder over the header
        "ser_rf": ("series", 8),
        "lora4": ("lora", 4),
    }
    assert [a.name for a in read_trace(path).adapters] == [
        "par16",
        "lora4",
        "ser_rf",
    ]  # without: header, defaults
    assert (
        cli.main(["twin", str(path), "--adapter-root", str(root), "--max-served", "4", "--max-slots", "2"])
        == 0
    )
    assert "trace of 3 requests, 3 adapters" in capsys.readouterr().out


def test_profile_takes_kinds_and_ranks_from_an_adapter_root(tmp_path):
    import argparse

    from paradapt.cli.twin import profile_shapes

    root = _root_with_shapes(tmp_path)
    args = argparse.Namespace(adapter_root=str(root), kinds=None, ranks=None)
    assert profile_shapes(args) == (["ia3", "lora", "parallel", "series"], [1, 4, 8, 16])
    with pytest.raises(ConfigError, match="either --adapter-root or --kinds"):
        profile_shapes(argparse.Namespace(adapter_root=str(root), kinds=["lora"], ranks=None))
    assert profile_shapes(argparse.Namespace(adapter_root=None, kinds=None, ranks=None)) == (
        ["lora", "parallel", "series"],
        [8, 16, 32],
    )


def test_a_request_log_key_must_be_a_blake2b_key(tmp_path):
    for bad in (b"short", "a text of sixteen", b"x" * 65):
        with pytest.raises(ValueError, match="16 to 64 bytes"):
            RequestLog(tmp_path / "r.jsonl", base="model", clock=lambda: 0.0, key=bad)
