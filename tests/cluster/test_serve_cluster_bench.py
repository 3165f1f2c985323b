"""``benchmarks/serve_cluster.py``: its checks as pure functions (in CI), and a quick run with a
replica killed under load (slow: it starts Ray twice)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_cluster.py"


def load_bench():
    return load_script(BENCH, "serve_cluster_bench")


def test_the_kill_check_counts_unclean_ends_and_answers_that_differ():
    bench = load_bench()
    reference = {"texts": {"0": "a b", "1": "c d", "2": "e f"}}
    row = {
        "statuses": {"0": "ok", "1": "ok", "2": "503", "3": "stream_error"},
        "texts": {"0": "a b", "1": "c X"},
    }
    assert bench.check_kill(row, reference) == {"ended": True, "unclean": 0, "compared": 2, "different": 1}
    row["statuses"]["4"] = "transport_error"
    assert bench.check_kill(row, reference)["ended"] is False
    assert bench.smape(110, 90) == pytest.approx(0.2) and bench.smape(0, 0) == 0.0


@pytest.mark.slow
def test_quick_run_survives_a_killed_replica_with_every_answer_right(tmp_path):
    bench = load_bench()
    assert bench.main(["--quick", "--out", str(tmp_path), "--only", "2 x adapter,kill", "--cost", "none"]) == 0
    rows = {r["label"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    ref, kill = rows["2 x adapter"], rows["kill"]
    assert ref["served"] == ref["sent"] and ref["starved"] == 0
    assert kill["killed"]["pid"] and kill["killed"]["back_s"] is not None  # it came back
    check = kill["check"]
    assert check["ended"] and check["different"] == 0 and check["compared"] > 0


def test_no_ray_runs_the_plain_server_and_replicas_run_behind_ray(tmp_path):
    bench = load_bench()
    a = bench.parse_args(["--out", str(tmp_path)])
    plain = bench.flags(a, tmp_path / "m", tmp_path / "r", 0, "none")
    assert "--replicas" not in plain and "--router" not in plain
    assert plain[plain.index("--threads") + 1] == "1"
    two = bench.flags(a, tmp_path / "m", tmp_path / "r", 2, "adapter")
    assert two[two.index("--replicas") + 1] == "2" and two[two.index("--threads-per-replica") + 1] == "1"
    assert ("no Ray", 0, "none") == bench.CONFIGS[0]
