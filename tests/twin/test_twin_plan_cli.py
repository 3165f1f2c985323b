"""``paradapt plan`` on the command line, with the real twin (small workloads, short windows)."""

from __future__ import annotations

import pytest
import yaml
from test_twin_plan import fake_simulate

from paradapt import cli
from paradapt.serve.workload import WorkloadSpec
from paradapt.twin import CostModel, configurator, search


def small_cost() -> CostModel:
    """A cost model from coefficients (the order of magnitude of a small CPU decoder)."""
    step = {"step": 4e-3, "tokens": 8e-5, "seqs": 1e-4, "device_loads": 1e-3}
    for kind in ("lora", "parallel", "series"):
        step[f"adapters_{kind}"] = 3e-4
    moves = {"load_host": (2e-3, 2e-9), "load_device": (3e-4, 5e-10)}
    return CostModel.from_coefficients(step, moves=moves)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A cost file, and a model fitted on the fake surface (the CLI loads it; --check runs the real twin)."""
    folder = tmp_path_factory.mktemp("plan")
    cost = folder / "cost.json"
    small_cost().save(cost)
    specs = search.sample_specs(40, seed=7, capacity=2.0, duration=5)
    results = search.build_dataset(specs, None, workers=1, simulate=fake_simulate)
    model = folder / "plan.json"
    configurator.Configurator.fit(results, max_depth=3).save(model)
    return cost, model


def write_workload(path, **fields):
    d = {
        "num_adapters": 3,
        "rate": 2.0,
        "duration": 5.0,
        "alpha": 0.5,
        "input_len": [8, 64],
        "output_len": [8, 32],
    }
    d.update(fields)
    path.write_text(yaml.safe_dump(d))
    return path


def test_plan_prints_rules_and_a_recommendation(files, tmp_path, capsys):
    cost, model = files
    wl = write_workload(tmp_path / "wl.yaml")
    rc = cli.main(["plan", str(wl), "--model", str(model), "--cost", str(cost), "--check"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "rules that fired" in out
    line = next(x for x in out.splitlines() if x.startswith("recommended:"))
    served, slots = (
        int(line.split("--max-served ")[1].split()[0]),
        int(line.split("--max-slots ")[1].split()[0]),
    )
    assert (served, slots) in search.config_grid(3)
    assert "searched optimum" in out and "tokens/s" in out
    # --check's searched optimum is the twin's, recomputed here the same way
    spec = WorkloadSpec.from_yaml(wl)
    best = search.search_in_twin(spec, CostModel.load(cost), knobs={"max_running": 32}).best
    assert f"searched optimum ({best.max_served}, {best.max_slots})" in out
    shortfall = float(out.split("shortfall vs the searched optimum: ")[1].split("%")[0])
    refined = out.split("refined in the twin (")[1]
    assert int(refined.split()[0]) <= configurator.REFINE_EVALS
    # the refinement never recommends less than the model's own prediction did in the twin
    assert float(refined.splitlines()[0].rsplit("(", 1)[1].split("%")[0]) >= 0.0
    advice = f"use the searched optimum instead: --max-served {best.max_served} --max-slots {best.max_slots}"
    assert (advice in out) == (shortfall > 100 * search.TIE_TOL)


@pytest.mark.parametrize(
    "fields,named",
    [
        ({"rate": -1.0}, "rate"),
        ({"input_len": [50, 10]}, "input_len"),
        ({"num_adapters": None}, "num_adapters"),
    ],
)
def test_bad_workload_is_one_line_naming_the_field(files, tmp_path, capsys, fields, named):
    wl = write_workload(tmp_path / "bad.yaml", **fields)
    if fields.get("num_adapters", 0) is None:  # missing field
        d = yaml.safe_load(wl.read_text())
        del d["num_adapters"]
        wl.write_text(yaml.safe_dump(d))
    rc = cli.main(["plan", str(wl), "--model", str(files[1]), "--cost", str(files[0])])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and named in err and "Traceback" not in err


def test_bad_model_file_and_train_count_are_one_line_errors(files, tmp_path, capsys):
    wl = write_workload(tmp_path / "wl.yaml")
    bad = tmp_path / "plan.json"
    bad.write_text("[]")
    assert cli.main(["plan", str(wl), "--model", str(bad), "--cost", str(files[0])]) == 2
    assert "not a paradapt plan model" in capsys.readouterr().err
    assert cli.main(["plan", str(wl), "--model", str(bad), "--cost", str(files[0]), "--train", "1"]) == 2
    assert "train" in capsys.readouterr().err
    assert (
        cli.main(["plan", str(wl), "--model", str(files[1]), "--cost", str(files[0]), "--max-depth", "0"])
        == 2
    )
    assert "max_depth" in capsys.readouterr().err


def test_train_on_the_real_twin_saves_a_model_that_warns_on_another_cost(files, tmp_path, capsys):
    cost, _ = files
    wl = write_workload(tmp_path / "wl.yaml")
    model = tmp_path / "m" / "plan.json"
    args = ["plan", str(wl), "--model", str(model), "--cost", str(cost), "--train", "3", "--workers", "1"]
    assert cli.main([*args, "--duration", "2", "--max-depth", "2"]) == 0
    out = capsys.readouterr().out
    assert model.is_file() and "|---" in out and "recommended:" in out and "predicted (tree" in out
    assert len(list((model.parent / "cache").glob("*.json"))) == 3
    other = tmp_path / "other.json"
    CostModel.from_coefficients({"step": 1e-2}).save(other)
    assert cli.main(["plan", str(wl), "--model", str(model), "--cost", str(other)]) == 0
    assert "trained on cost model" in capsys.readouterr().err


def test_plan_takes_a_trace_and_recommends_within_its_grid(files, tmp_path, capsys):
    from paradapt.serve.trace import write_trace

    cost, model = files
    spec = WorkloadSpec.from_yaml(write_workload(tmp_path / "wl.yaml", num_adapters=5, duration=20.0))
    trace = write_trace(tmp_path / "wl.jsonl", spec.generate())
    rc = cli.main(["plan", str(trace), "--model", str(model), "--cost", str(cost), "--check"])
    out = capsys.readouterr().out
    assert rc == 0 and "trace of" in out and "rules that fired" in out
    line = next(x for x in out.splitlines() if x.startswith("recommended:"))
    served = int(line.split("--max-served ")[1].split()[0])
    slots = int(line.split("--max-slots ")[1].split()[0])
    assert (served, slots) in search.config_grid(5)
    assert "shortfall vs the searched optimum" in out


def test_refine_zero_prints_the_models_prediction(files, tmp_path, capsys):
    cost, model = files
    wl = write_workload(tmp_path / "wl.yaml")
    assert cli.main(["plan", str(wl), "--model", str(model), "--cost", str(cost), "--refine", "0"]) == 0
    out = capsys.readouterr().out
    assert "refined in the twin" not in out
    pred = next(x for x in out.splitlines() if x.startswith("predicted (tree"))
    rec = next(x for x in out.splitlines() if x.startswith("recommended:"))
    assert rec.split("recommended: ")[1] == pred.split("): ")[1].split("   [")[0]
    assert cli.main(["plan", str(wl), "--model", str(model), "--cost", str(cost), "--refine", "-1"]) == 2
    assert "refine" in capsys.readouterr().err
