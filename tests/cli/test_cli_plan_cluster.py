"""``paradapt plan --replicas N|auto``: the cluster planner on the command line (the real cluster twin)."""

from __future__ import annotations

import json

import pytest
import yaml

from paradapt import cli
from paradapt.cluster.placement import read_placement

# Small and skewed, short requests: each cluster twin run takes a fraction of a second.
WORKLOAD = {
    "num_adapters": 12,
    "rate": 2.0,
    "duration": 6.0,
    "alpha": 0.1,
    "input_len": [4, 32],
    "output_len": [4, 16],
    "seed": 2,
}
SMALL = ["--token-budget", "64", "--max-running", "8"]


@pytest.fixture
def workload(tmp_path):
    path = tmp_path / "wl.yaml"
    path.write_text(yaml.safe_dump(WORKLOAD))
    return path


def plan(args, capsys):
    rc = cli.main(["plan", *args, *SMALL])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def recommended_replicas(out: str) -> int:
    line = next(x for x in out.splitlines() if x.startswith("recommended: paradapt serve --replicas "))
    return int(line.split("--replicas ")[1].split()[0])


def test_fixed_replicas_prints_the_plan_and_saves_json(workload, tmp_path, capsys):
    out_json = tmp_path / "plan.json"
    rc, out, _ = plan([str(workload), "--replicas", "2", "--json", str(out_json)], capsys)
    assert rc == 0
    assert "replicas            2 (given)" in out
    assert "per replica         --max-served" in out and "placement" in out and "hit rate" in out
    assert "adapter-0000 x2" in out  # the hottest adapter is on both replicas
    assert recommended_replicas(out) == 2
    assert f"--placement {out_json}" in out  # the serve command starts from the saved placement
    d = json.loads(out_json.read_text())
    assert d["replicas"] == 2 and len(d["placement"]["replicas"]) == 2
    assert read_placement(out_json, 2) == tuple(tuple(names) for names in d["placement"]["replicas"])
    held = {a for names in d["placement"]["replicas"] for a in names}
    assert held == {f"adapter-{i:04d}" for i in range(12)}
    assert d["twin_runs"] == len(d["trials"]) >= 1


def test_auto_meets_the_target_and_needs_more_replicas_for_more(workload, capsys):
    counts = []
    for target in ("150", "900"):
        rc, out, _ = plan([str(workload), "--replicas", "auto", "--target-throughput", target], capsys)
        assert rc == 0 and ": MET (" in out and "(searched 1..64)" in out
        counts.append(recommended_replicas(out))
    assert counts[0] < counts[1]


def test_a_target_out_of_reach_says_so(workload, capsys):
    rc, out, _ = plan(
        [str(workload), "--replicas", "auto", "--target-throughput", "20000", "--max-replicas", "2", "--max-runs", "3"],
        capsys,
    )
    assert rc == 0 and "NOT MET" in out and "the target is not met up to 2 replicas" in out


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--replicas", "0"], "--replicas"),
        (["--replicas", "-3"], "--replicas"),
        (["--replicas", "two"], "--replicas"),
        (["--replicas", "2", "--target-throughput", "abc"], "--target-throughput"),
        (["--replicas", "2", "--target-throughput", "-5"], "--target-throughput"),
        (["--replicas", "auto", "--max-replicas", "0"], "--max-replicas"),
    ],
)
def test_bad_flag_values_are_usage_errors_naming_the_flag(workload, capsys, flags, named):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", str(workload), *flags])
    assert e.value.code == 2
    assert f"argument {named}:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--replicas", "auto"], "--target-throughput"),
        (["--target-throughput", "100"], "--replicas"),
        (["--json", "x.json"], "--replicas"),
        (["--one-machine"], "--replicas"),
        (["--replicas", "2", "--one-machine"], "profile-ray"),  # the shipped cost model has no ray section
        (["--replicas", "2", "--check"], "--check"),
    ],
)
def test_inconsistent_flags_are_one_line_errors_exit_2(workload, capsys, flags, named):
    rc, out, err = plan([str(workload), *flags], capsys)
    assert rc == 2 and err.startswith("paradapt: error: ") and named in err
    assert len(err.strip().splitlines()) == 1
