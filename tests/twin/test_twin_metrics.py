"""The metrics both the twin and ``paradapt bench`` report, on a hand-made replay log."""

from __future__ import annotations

import pytest

from paradapt.serve.workload import AdapterSpec, Workload, WorkloadRequest
from paradapt.twin.metrics import summarize
from paradapt.twin.replay import ReplayLog, StepEvent


def _log() -> ReplayLog:
    reqs = (WorkloadRequest(0, "a", 0.0, 4, 3), WorkloadRequest(1, "b", 1.0, 2, 2))
    w = Workload(None, (AdapterSpec("a", "lora", 8), AdapterSpec("b", "lora", 8)), reqs, 10.0)
    log = ReplayLog(w, 10.0, 20.0)
    log.requests = {"w0": reqs[0], "w1": reqs[1]}
    # a: prefill + first token at 1, then tokens at 2 and 4; b: first at 2, second at 12 (after T)
    log.steps = [
        StepEvent(1.0, (("w0", 4),), ("w0",)),
        StepEvent(2.0, (("w1", 2),), ("w0", "w1")),
        StepEvent(4.0, (), ("w0",)),
        StepEvent(12.0, (), ("w1",)),
    ]
    log.first = {"w0": 1.0, "w1": 2.0}
    log.finished = {"w0": 4.0, "w1": 12.0}
    return log


def test_output_throughput_itl_p99_and_goodput():
    r = summarize(_log(), slo_ttft=0.5, slo_tpot=None)
    assert r.output_throughput == pytest.approx(4 / 10)  # 4 output tokens by T = 10
    assert r.throughput == pytest.approx((4 + 2 + 4) / 10)
    # gaps: a 1, 2; b 10 (its second token came after T, before the stop)
    assert r.itl_p50 == pytest.approx(2.0) and r.itl_p99 == pytest.approx(2 + 8 * 0.98)
    assert r.ttft_p99 == pytest.approx(1.0)  # both waited 1 s for their first token
    assert r.goodput == 0.0  # a finished by T but its TTFT is 1 s > 0.5 s; b finished after T
    assert summarize(_log()).goodput == pytest.approx(1 / 10)  # no SLO: a counts
    assert summarize(_log(), slo_tpot=1.0).goodput == 0.0  # a's TPOT is (4 - 1) / 2 = 1.5 s
