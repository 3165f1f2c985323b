"""``paradapt profile-ray``: one replica behind Ray Serve measured, Ray's cost fitted into the
cost model. The plumbing with the measurement replaced (CI); the real thing is slow (it starts Ray)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import asset_path, require_asset
from test_twin_ray_cost import SERVER  # the twin tests' server costs
from transformers import AutoModelForCausalLM

import paradapt as pa
from paradapt import cli
from paradapt.cli.engine_flags import engine_flag_args
from paradapt.cluster import profile as ray_profile
from paradapt.serve.workload import WorkloadSpec
from paradapt.twin.costmodel import CostModel, load_cost
from paradapt.twin.ray_cost import RayRun

STORIES = asset_path("models", "stories260k-hf")
# Saturating for one replica of the tiny model on 2 cores, a few seconds of arrivals.
WORKLOAD = {"num_adapters": 3, "rate": 40.0, "duration": 4.0, "alpha": 0.5, "input_len": [8, 24],
            "output_len": [8, 16], "kinds": ["lora"], "ranks": [4], "seed": 1}  # fmt: skip
SMALL = ["--max-served", "3", "--max-slots", "2", "--token-budget", "64", "--max-running", "8"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The model, a root holding the workload's adapters, the workload file, and a cost file
    with a server section (the shipped cost model has none)."""
    require_asset(STORIES)
    folder = tmp_path_factory.mktemp("profile_ray")
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    for spec in WorkloadSpec(**WORKLOAD).generate().adapters:
        pa.add_adapter(model, spec.name, pa.LoRAConfig(r=4, init="random"))
        pa.save_adapter(model, spec.name, folder / "adapters" / spec.name)
    (folder / "wl.yaml").write_text(yaml.safe_dump(WORKLOAD))
    cost = load_cost()
    CostModel.from_dict({**cost.to_dict(), "server": SERVER.to_dict()}).save(folder / "cost.json")
    return folder


def args(folder, *more: str) -> list[str]:
    return ["profile-ray", str(folder / "wl.yaml"), "--model", str(STORIES), "--adapter-root",
            str(folder / "adapters"), "--cost", str(folder / "cost.json"), "--out", str(folder / "out.json"),
            *SMALL, *more]  # fmt: skip


def test_the_measured_run_is_fitted_and_saved_with_the_servers_flags(setup, monkeypatch, capsys):
    seen = {}

    def measure(serve_args, workload, config, **kw):
        seen.update(serve_args=list(serve_args), requests=len(workload.requests), vocab=config.vocab_size)
        cpu = {"replica-0": 9.0, "ingress": 2.0, "ray": 2.5, "client": 0.5}
        return RayRun(throughput=100.0, cpu=cpu, wall=10.0, tokens=1000, cores=2), _Finished()

    monkeypatch.setattr(ray_profile, "measure_replica", measure)
    assert cli.main(args(setup, "--threads-per-replica", "1")) == 0
    out = capsys.readouterr().out
    ray = CostModel.load(setup / "out.json").ray
    assert ray is not None and "Ray Serve" in out and "saved" in out
    assert ray.replica_cpu == pytest.approx(0.9) and ray.outside_cpu == pytest.approx(5.0 / 1000)
    assert ray.fit["measured"] == 100.0 and ray.fit["twin"] == pytest.approx(
        100.0, rel=0.05
    )  # whole steps in a 4 s window
    assert ray.token > 0  # the twin's plain server is faster than 100 tokens/s on this workload
    s = seen["serve_args"]
    for flag, value in (("--max-served", "3"), ("--max-slots", "2"), ("--token-budget", "64"),
                        ("--max-running", "8"), ("--threads-per-replica", "1"),
                        ("--queue-bound", str(seen["requests"]))):  # fmt: skip
        assert s[s.index(flag) + 1] == value
    assert seen["vocab"] == json.loads((STORIES / "config.json").read_text())["vocab_size"]


def test_a_replica_that_kept_up_is_refused_and_nothing_is_saved(setup, monkeypatch, capsys):
    def measure(serve_args, workload, config, **kw):
        fast = workload.offered_tokens() / workload.duration  # served all that was offered
        return RayRun(throughput=fast, cpu={"replica-0": 1.0}, wall=5.0, tokens=100, cores=2), _Finished()

    monkeypatch.setattr(ray_profile, "measure_replica", measure)
    target = setup / "kept_up.json"
    a = args(setup)
    a[a.index("--out") + 1] = str(target)
    assert cli.main(a) == 2
    assert "raise its rate" in capsys.readouterr().err
    assert not target.exists()


def test_bad_flags_name_what_is_missing(setup, tmp_path):
    no_root = [a for a in args(setup) if a not in ("--adapter-root", str(setup / "adapters"))]
    assert cli.main(no_root) == 2
    plain = tmp_path / "plain.json"
    load_cost().save(plain)  # no server section
    bad = args(setup)
    bad[bad.index("--cost") + 1] = str(plain)
    assert cli.main(bad) == 2


def test_engine_flags_pass_on_as_given():
    a = cli.build_parser().parse_args(["twin", "w.yaml", "--max-served", "2", "--max-slots", "1",
                                       "--token-budget", "128", "--starvation-after", "0.5"])  # fmt: skip
    assert engine_flag_args(a) == ["--token-budget", "128", "--starvation-after", "0.5"]


@pytest.mark.slow
def test_profile_ray_end_to_end_on_a_real_replica(setup, capsys):
    assert cli.main(args(setup)) == 0
    ray = CostModel.load(setup / "out.json").ray
    assert ray.fit["measured"] > 0 and ray.fit["tokens"] > 0
    assert 0 < ray.replica_cpu <= 2.0 and ray.outside_cpu > 0 and ray.cores >= 1
    # the shipped cost model is another model's: Ray's cost fills the gap if the twin is faster
    if ray.fit["twin_without"] > ray.fit["measured"]:
        assert ray.token > 0 and ray.fit["twin"] == pytest.approx(ray.fit["measured"], rel=0.05)
    else:
        assert ray.token == 0.0


class _Finished:
    finished = requests = 1
