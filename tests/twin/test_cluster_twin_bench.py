"""Smoke run of ``benchmarks/cluster_twin.py --quick`` (the on-paper cluster report's own code path)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import load_script

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "cluster_twin.py"


def load_bench():
    return load_script(BENCH, "cluster_twin_bench")


def test_quick_report_compares_every_policy_and_saves_json(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "report.json"
    rows = bench.main(["--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    assert len(rows) == 2 * len(bench.POLICIES)
    assert {(r["zipf"], r["policy"]) for r in rows} == {(s, p) for s in (1.0, 0.5) for p in bench.POLICIES}
    assert printed.count("| sticky+spill |") == 2 and "| multiplex |" in printed
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["args"]["replicas"] == 8
    by = {(r["zipf"], r["policy"]): r for r in rows}
    for s in (1.0, 0.5):
        assert all(
            by[(s, p)]["requests"] == by[(s, "random")]["requests"] for p in bench.POLICIES
        )  # one workload
        assert by[(s, "random")]["hit_rate"] < by[(s, "sticky+spill")]["hit_rate"]
        assert by[(s, "sticky+spill+plan")]["hit_rate"] >= by[(s, "sticky+spill")]["hit_rate"]
        assert all(r["imbalance"] >= 1.0 and r["starved"] <= r["adapters_asked"] for r in rows)
    # at Zipf 1 the planned placement spreads the hot adapter: the load is more even than when it is stuck
    assert by[(1.0, "sticky+spill+plan")]["imbalance"] < by[(1.0, "multiplex")]["imbalance"]
