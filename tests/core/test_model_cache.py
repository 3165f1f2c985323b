"""The converted-model cache: built once, atomic (a failed or killed build leaves no usable-looking
folder), and a damaged or outdated folder is detected and rebuilt. A fake converter stands in
for the GGUF conversion (tests/core/test_models_named.py runs the real one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from paradapt import model_cache
from paradapt.model_cache import MANIFEST, cache_root, cached_folder, folder_problem

SOURCE = {"file": "pkg/model.gguf", "size": 123, "sha256": None, "converter": 1}


class Converter:
    """Writes a small fake model folder and counts its calls; can fail half-way."""

    def __init__(self, fail: bool = False):
        self.calls = 0
        self.fail = fail

    def __call__(self, folder: Path) -> None:
        self.calls += 1
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
        if self.fail:
            raise RuntimeError("conversion interrupted")
        (folder / "tokenizer.json").write_text("{}")


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PARADAPT_CACHE", str(tmp_path / "pc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "pc"
    monkeypatch.delenv("PARADAPT_CACHE")
    assert cache_root() == tmp_path / "xdg" / "paradapt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "paradapt"


def test_built_once_then_reused(tmp_path):
    target, convert = tmp_path / "models" / "m", Converter()
    folder, built = cached_folder(target, SOURCE, convert)
    assert (folder, built, convert.calls) == (target, True, 1)
    manifest = json.loads((target / MANIFEST).read_text())
    assert manifest["source"] == SOURCE
    assert manifest["files"] == {"config.json": 23, "model.safetensors": 1000, "tokenizer.json": 2}
    assert folder_problem(target, SOURCE) is None
    assert _siblings(target) == []  # no temporary folder left behind
    folder, built = cached_folder(target, SOURCE, convert)
    assert (built, convert.calls) == (False, 1)


def test_a_failed_build_leaves_nothing_and_the_error_propagates(tmp_path):
    target = tmp_path / "m"
    with pytest.raises(RuntimeError, match="interrupted"):
        cached_folder(target, SOURCE, Converter(fail=True))
    assert not target.exists() and _siblings(target) == []


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda t: (t / MANIFEST).unlink(), "a conversion did not finish"),
        (lambda t: (t / MANIFEST).write_text("{not json"), "unreadable"),
        (lambda t: (t / "model.safetensors").write_bytes(b"x" * 10), "has 10 bytes, not 1000"),
        (lambda t: (t / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    ],
    ids=["no-manifest", "bad-manifest", "truncated", "missing-file"],
)
def test_a_damaged_folder_is_detected_and_rebuilt(tmp_path, damage, problem):
    target, convert = tmp_path / "m", Converter()
    cached_folder(target, SOURCE, convert)
    damage(target)
    assert problem in folder_problem(target, SOURCE)
    with pytest.warns(UserWarning, match=f"cached model folder m: .*{problem}.*; converting it again"):
        folder, built = cached_folder(target, SOURCE, convert)
    assert built and convert.calls == 2 and folder_problem(folder, SOURCE) is None
    assert (target / "model.safetensors").stat().st_size == 1000
    assert _siblings(target) == []


def test_another_source_rebuilds(tmp_path):
    target, convert = tmp_path / "m", Converter()
    cached_folder(target, SOURCE, convert)
    other = {**SOURCE, "size": 124}
    assert "another source" in folder_problem(target, other)
    with pytest.warns(UserWarning, match="built from another source"):
        _, built = cached_folder(target, other, convert)
    assert built and json.loads((target / MANIFEST).read_text())["source"] == other


def test_a_manifest_cannot_point_outside_the_folder(tmp_path):
    target = tmp_path / "m"
    cached_folder(target, SOURCE, Converter())
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["files"]["../escape"] = 1
    (target / MANIFEST).write_text(json.dumps(manifest))
    assert "../escape is missing" in folder_problem(target, SOURCE)


def test_rebuild_replaces_a_complete_folder(tmp_path):
    target, convert = tmp_path / "m", Converter()
    cached_folder(target, SOURCE, convert)
    _, built = cached_folder(target, SOURCE, convert, rebuild=True)
    assert built and convert.calls == 2 and folder_problem(target, SOURCE) is None


def test_leftovers_of_a_killed_build_are_swept(tmp_path):
    """A build killed mid-conversion leaves its temporary folder; the next build deletes it
    (its process is gone) but not the temporary folder of a build still running."""
    target = tmp_path / "m"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_tmp = tmp_path / f"m.tmp-{int(dead.stdout)}-abcd1234"
    live_tmp = tmp_path / f"m.tmp-{os.getpid()}-beef0000"
    for d in (dead_tmp, live_tmp):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    cached_folder(target, SOURCE, Converter())
    assert not dead_tmp.exists() and live_tmp.exists()


def test_losing_a_race_keeps_the_winners_folder(tmp_path, monkeypatch):
    """Two processes converting at once: the second rename finds the first's folder in place
    and keeps it (its own build is dropped)."""
    target = tmp_path / "m"

    def racing_build(folder: Path) -> None:
        Converter()(folder)
        if not target.exists():  # the other process finishes while this one is converting
            cached_folder(target, SOURCE, Converter())
            monkeypatch.setattr(model_cache, "_move_aside", lambda folder: None)

    folder, built = cached_folder(target, SOURCE, racing_build)
    assert folder == target and folder_problem(target, SOURCE) is None
    assert _siblings(target) == []
