"""The cluster's one ``/metrics`` (``paradapt.cluster.metrics``): the replicas' real expositions
merged with a ``replica`` label, each family once, and the router's own counters; parseable by
Prometheus' own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from paradapt.cluster.metrics import IngressCounts, cluster_metrics
from paradapt.cluster.router import RouterStats

REPLICA_0 = """# HELP paradapt_requests_total Requests finished.
# TYPE paradapt_requests_total counter
paradapt_requests_total{adapter="a1"} 3.0
paradapt_requests_total{adapter="a2"} 1.0
# HELP paradapt_running Requests running.
# TYPE paradapt_running gauge
paradapt_running 2.0
# HELP paradapt_ttft_seconds Time to first token.
# TYPE paradapt_ttft_seconds histogram
paradapt_ttft_seconds_bucket{le="0.1"} 1.0
paradapt_ttft_seconds_bucket{le="+Inf"} 4.0
paradapt_ttft_seconds_count 4.0
paradapt_ttft_seconds_sum 1.5
"""
REPLICA_1 = """# HELP paradapt_requests_total Requests finished.
# TYPE paradapt_requests_total counter
paradapt_requests_total{adapter="a3"} 5.0
# HELP paradapt_running Requests running.
# TYPE paradapt_running gauge
paradapt_running 0.0
"""


def _families(body: bytes) -> dict:
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def test_every_sample_keeps_its_labels_and_gains_its_replica():
    stats = RouterStats(requests=9, adapter_requests=8, hits=6, spills=1)
    counts = IngressCounts(
        routed={"replica-0": 4, "replica-1": 5}, inflight={"replica-0": 2}, up={"replica-0": True, "replica-1": True}
    )
    fams = _families(cluster_metrics({"replica-0": REPLICA_0, "replica-1": REPLICA_1}, stats, counts))
    reqs = {(s.labels["replica"], s.labels["adapter"]): s.value for s in fams["paradapt_requests"].samples}
    assert reqs == {("replica-0", "a1"): 3.0, ("replica-0", "a2"): 1.0, ("replica-1", "a3"): 5.0}
    assert {s.labels["replica"]: s.value for s in fams["paradapt_running"].samples} == {"replica-0": 2.0, "replica-1": 0.0}
    hist = [s for s in fams["paradapt_ttft_seconds"].samples if s.name.endswith("_count")]
    assert [(s.labels, s.value) for s in hist] == [({"replica": "replica-0"}, 4.0)]
    total = {f: next(s.value for s in fams[f].samples if s.name.endswith("_total")) for f in (
        "paradapt_router_requests", "paradapt_router_hits", "paradapt_router_spills", "paradapt_router_retries")}
    assert total == {"paradapt_router_requests": 9, "paradapt_router_hits": 6, "paradapt_router_spills": 1,
                     "paradapt_router_retries": 0}
    inflight = {s.labels["replica"]: s.value for s in fams["paradapt_router_inflight"].samples}
    assert inflight == {"replica-0": 2.0, "replica-1": 0.0}


def test_a_replica_that_did_not_answer_is_down_and_absent():
    counts = IngressCounts(routed={"replica-0": 1, "replica-1": 1}, up={"replica-0": True, "replica-1": False})
    body = cluster_metrics({"replica-0": REPLICA_0}, RouterStats(), counts)
    fams = _families(body)
    assert {s.labels["replica"]: s.value for s in fams["paradapt_replica_up"].samples} == {"replica-0": 1.0, "replica-1": 0.0}
    assert {s.labels["replica"] for s in fams["paradapt_running"].samples} == {"replica-0"}
    assert body.count(b"# TYPE paradapt_running gauge") == 1
