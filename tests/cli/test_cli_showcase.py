"""``paradapt showcase``: the real command end to end (real server subprocess, bundled adapters, a
small slice of both test sets), the printed table, one-line errors, and the mixed interleaving."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import needs_asset

from paradapt import cli
from paradapt.cli import showcase

needs_assets = needs_asset("data", "agnews", "test.tsv")  # and the SST-2 test set beside it
ROW = re.compile(
    r"^(sst2|agnews)-parallel\s+(SST-2|AG News)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x"
)


def _run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "paradapt.cli", "showcase", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@needs_assets
def test_showcase_end_to_end_on_bundled_adapters():
    proc = _run(
        "--model",
        "all-minilm-l6-v2",
        "--limit",
        "24",
        "--agnews-rows",
        "24",
        "--batch",
        "4",
        "--concurrency",
        "4",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {m.group(1): m for m in map(ROW.match, proc.stdout.splitlines()) if m}
    assert set(rows) == {"sst2", "agnews"}, proc.stdout
    for m in rows.values():
        rows_n, acc, floor = int(m.group(3)), float(m.group(4)), float(m.group(5))
        mixed, base, ratio = float(m.group(6)), float(m.group(7)), float(m.group(8))
        assert rows_n == 24
        assert floor <= acc <= 1.0  # trained adapters: well above chance on these rows
        # the table prints rates to 0.1 and the ratio to 0.01: their rounding moves the quotient of
        # the printed rates by up to ~1 % from the printed ratio (19.2 / 15.6 = 1.231 printed 1.22)
        assert mixed > 0 and base > 0 and ratio == pytest.approx(mixed / base, rel=0.015, abs=0.01)
    assert "OK: every accuracy is at or above its floor" in proc.stdout


@pytest.mark.parametrize(
    ("flag", "value"), [("--limit", "0"), ("--agnews-rows", "-3"), ("--batch", "0"), ("--concurrency", "0")]
)
def test_bad_counts_are_one_line_exit_2(flag, value, capsys):
    assert cli.main(["showcase", "--model", "all-minilm-l6-v2", flag, value]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "at least 1" in lines[0], err
    assert out == ""  # failed before starting a server


def test_missing_test_set_is_a_showcase_error(tmp_path):
    with pytest.raises(showcase.ShowcaseError, match="sst2/test.tsv"):
        showcase.sst2_task(tmp_path, None, "sst2-parallel")


def _task(title: str, n: int) -> showcase.Task:
    return showcase.Task(title, title.lower(), 0.5, [f"{title}{i}" for i in range(n)], [frozenset()] * n)


def test_interleave_spreads_both_tasks_over_the_stream():
    a, b = _task("A", 40), _task("B", 120)  # 10 and 30 requests of 4
    reqs = showcase.interleave([a, b], 4)
    assert len(reqs) == 40
    covered = {t.title: [] for t in (a, b)}
    for t, lo, hi in reqs:
        covered[t.title] += list(range(lo, hi))
    assert covered == {"A": list(range(40)), "B": list(range(120))}  # every row once, in order
    firsts = [t.title for t, _, _ in reqs]
    # Mixed: A's requests are spread out, never all at the start or end of the stream.
    positions = [i for i, name in enumerate(firsts) if name == "A"]
    assert (
        positions[0] < 4
        and positions[-1] > 35
        and max(b - a for a, b in zip(positions, positions[1:], strict=False)) <= 4
    )


def test_sst2_gold_accepts_names_and_indices(tmp_path):
    (tmp_path / "data" / "sst2").mkdir(parents=True)
    (tmp_path / "data" / "sst2" / "test.tsv").write_text(
        "sentence\tlabel\ngood\t1\nbad\t0\n", encoding="utf-8"
    )
    task = showcase.sst2_task(tmp_path, None, "x")
    assert task.texts == ["good", "bad"]
    assert task.gold == [frozenset({"1", "positive"}), frozenset({"0", "negative"})]


def test_retrain_serves_the_trained_folders_under_the_showcase_names(tmp_path, monkeypatch):
    from paradapt.train import run as train_run

    seen = []

    def fake_train(config, **kw):  # stands in for minutes of training; the wiring is what is tested
        seen.append((Path(config).name, kw["output_dir"]))
        folder = Path(kw["output_dir"]) / "adapters" / "x"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(Path(config).name, encoding="utf-8")
        return SimpleNamespace(adapters={"x": folder}, steps=1, metrics={"x": {"accuracy": 0.9}})

    monkeypatch.setattr(train_run, "train", fake_train)
    root = showcase.retrain(tmp_path, "sst2-parallel", "agnews-parallel")
    assert [name for name, _ in seen] == ["train_sst2.yaml", "train_agnews.yaml"]
    assert sorted(p.name for p in root.iterdir()) == ["agnews-parallel", "sst2-parallel"]
    assert (root / "agnews-parallel" / "adapter_config.json").read_text() == "train_agnews.yaml"


def test_report_exits_1_when_an_accuracy_is_under_its_floor(capsys):
    good, bad = _task("A", 10), _task("B", 10)
    good.correct, bad.correct = 9, 4  # floors are 0.5: 0.9 passes, 0.4 does not
    for t in (good, bad):
        t.spans = {"mixed": [0.0, 1.0], "base": [0.0, 2.0]}
    assert showcase.report([good, bad], 1.0, 2.0, 3.0) == 1
    out = capsys.readouterr().out
    assert "0.9000" in out and "0.4000" in out and "BELOW FLOOR" in out and "FAILED" in out
    assert "2.00x" in out  # 10 rows/s mixed vs 5 rows/s base
    bad.correct = 6
    assert showcase.report([good, bad], 1.0, 2.0, 3.0) == 0
