"""``--placement``: a plan file's per-replica adapters, read and checked before any replica starts."""

import json

import pytest

from paradapt.cluster.placement import read_placement, unknown_adapters
from paradapt.errors import ConfigError


def _write(tmp_path, data, name="plan.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_a_plan_files_placement_is_read_per_replica_without_repeats(tmp_path):
    plan = {"replicas": 2, "placement": {"replicas": [["a", "b", "a"], ["b", "c"]], "load": [1, 1]}}
    assert read_placement(_write(tmp_path, plan), 2) == (("a", "b"), ("b", "c"))
    assert read_placement(_write(tmp_path, [["x"], []], "bare.json"), 2) == (("x",), ())


@pytest.mark.parametrize(
    "data, replicas, message",
    [
        ("{not json", 2, "plan.json: not a readable JSON plan"),
        ({"placement": {"replicas": [["a"], ["b"]]}}, 3, "places adapters on 2 replicas but --replicas is 3"),
        ({"placement": {}}, 2, "plan.json: placement.replicas: expected a list"),
        ({"placement": [["a"], ["b"]]}, 2, "plan.json: placement.replicas: expected a list"),
        ("7", 2, "plan.json: expected a list"),
        ({"placement": {"replicas": [["a"], "b"]}}, 2, "expected a list with one list"),
        ({"placement": {"replicas": [["a"], ["../../etc"]]}}, 2, r"placement.replicas\[1\]\[0\]: adapter names"),
        ({"placement": {"replicas": [["a"], [7]]}}, 2, r"placement.replicas\[1\]\[0\]"),
    ],
)
def test_a_bad_plan_file_is_an_error_naming_the_file_and_field(tmp_path, data, replicas, message):
    with pytest.raises(ConfigError, match=message) as e:
        read_placement(_write(tmp_path, data), replicas)
    assert e.value.field == "placement" and str(tmp_path) not in str(e.value)


def test_a_missing_file_is_named_without_its_folder(tmp_path):
    with pytest.raises(ConfigError, match="nope.json: no such file") as e:
        read_placement(tmp_path / "nope.json", 1)
    assert str(tmp_path) not in str(e.value)


def test_unknown_adapters_are_those_without_a_folder():
    assert unknown_adapters((("a", "b"), ("c",)), {"a", "c"}) == ["b"]


def _serve(capsys, *argv) -> tuple[int, str]:
    from paradapt import cli

    code = cli.main(["serve", *argv])
    return code, capsys.readouterr().err


def test_cluster_only_flags_without_replicas_are_refused(capsys, tmp_path):
    code, err = _serve(capsys, "--placement", str(tmp_path / "p.json"))
    assert code == 2 and "--placement needs --replicas N" in err
    code, err = _serve(capsys, "--router", "random")
    assert code == 2 and "--router needs --replicas N" in err


def test_a_placement_naming_an_adapter_without_a_folder_stops_before_ray_starts(capsys, tmp_path):
    """Checked on the driver, so no replica starts on a plan the adapter root cannot serve."""
    from conftest import asset_path, require_asset

    model = require_asset(asset_path("models", "stories260k-hf"))
    root = tmp_path / "root"
    (root / "a1").mkdir(parents=True)
    plan = _write(tmp_path, {"placement": {"replicas": [["a1"], ["a9", "a8"]]}})
    argv = ["--model", str(model), "--adapter-root", str(root), "--replicas", "2", "--placement", str(plan)]
    code, err = _serve(capsys, *argv)
    assert code == 2 and "no folder under --adapter-root: a8, a9" in err, err
    code, err = _serve(capsys, *argv[:-3], "3", "--placement", str(plan))
    assert code == 2 and "places adapters on 2 replicas but --replicas is 3" in err, err
