"""curves.png: written with matplotlib (the train extra), skipped with a warning without it."""

from __future__ import annotations

import sys

import pytest

from paradapt.train.plot import plot_curves

RECORDS = [{"step": 1, "adapter": "a", "loss": 1.0}, {"step": 2, "adapter": "a", "loss": 0.5}]


def test_curves_are_skipped_with_a_warning_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.warns(UserWarning, match=r"paradapt\[train\]"):
        assert plot_curves(RECORDS, tmp_path / "curves.png") is None
    assert not (tmp_path / "curves.png").exists()
