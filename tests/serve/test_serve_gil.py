"""serve/gil.py: the server's GIL switch interval is set, and 0 or None leaves Python's alone."""

from __future__ import annotations

import sys

import pytest

from paradapt.serve.gil import SWITCH_INTERVAL, set_switch_interval


@pytest.fixture(autouse=True)
def _restore():
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def test_set_switch_interval_sets_it_and_zero_or_none_leaves_it():
    sys.setswitchinterval(0.005)
    assert set_switch_interval(SWITCH_INTERVAL) == pytest.approx(0.0002)
    assert sys.getswitchinterval() == pytest.approx(0.0002)
    assert set_switch_interval(0) == pytest.approx(0.0002)
    assert set_switch_interval(None) == pytest.approx(0.0002)
    assert set_switch_interval(0.001) == pytest.approx(0.001)
