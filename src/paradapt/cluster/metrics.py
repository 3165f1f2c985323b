"""One ``/metrics`` for the whole cluster: every replica's metrics, labelled, plus the router's.

Behind ``paradapt serve --replicas N`` a scrape of ``/metrics`` would otherwise reach whichever
replica the router picked, so a dashboard would jump between engines. The ingress asks every
replica instead and merges their Prometheus text here: each sample gets a ``replica`` label
(the convention for one target standing for several processes), each family's HELP/TYPE is
written once, and the ingress adds what only it knows, the router's decisions:

- ``paradapt_router_requests_total``, ``..._adapter_requests_total``, ``..._hits_total``
  (adapter requests sent where the adapter was already on device or host),
  ``..._spills_total`` (extra replicas given to a hot adapter), ``..._replacements_total``
  (adapters placed anew after their replicas died), ``..._retries_total`` (requests re-sent
  after a replica died before answering);
- ``paradapt_router_routed_total{replica}``, ``paradapt_router_inflight{replica}``,
  ``paradapt_replica_up{replica}`` (1 while its last state report arrived, else 0: a replica
  whose scrape fails is listed as down and its metrics are simply absent).

Pure text in, text out (prometheus-client's parser and exposition), so it is tested without
Ray; :mod:`paradapt.cluster.ray_serve` calls :func:`cluster_metrics`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from .router import RouterStats

REPLICA_LABEL = "replica"


@dataclass
class IngressCounts:
    """What the ingress counts besides the router's own :class:`RouterStats`."""

    routed: Mapping[str, int] = field(default_factory=dict)  # requests sent, per replica
    inflight: Mapping[str, int] = field(default_factory=dict)  # open now, per replica
    up: Mapping[str, bool] = field(default_factory=dict)  # last state report arrived
    retries: int = 0


def relabel(replica: str, text: str) -> list[Metric]:
    """The families in one replica's exposition, every sample labelled ``replica=...``."""
    families = []
    for fam in text_string_to_metric_families(text):
        fam.samples = [
            s._replace(labels={**s.labels, REPLICA_LABEL: replica}) for s in fam.samples
        ]
        families.append(fam)
    return families


def merge(per_replica: Mapping[str, str]) -> list[Metric]:
    """All replicas' families, one per name (HELP/TYPE from the first replica that has it)."""
    merged: dict[str, Metric] = {}
    for replica, text in per_replica.items():
        for fam in relabel(replica, text):
            have = merged.get(fam.name)
            if have is None:
                merged[fam.name] = fam
            else:
                have.samples.extend(fam.samples)
    return list(merged.values())


def router_families(stats: RouterStats, counts: IngressCounts) -> list[Metric]:
    """The router's and the ingress's own counters and gauges."""
    out: list[Metric] = []
    for name, help_, value in (
        ("paradapt_router_requests", "requests the router placed", stats.requests),
        ("paradapt_router_adapter_requests", "requests for an adapter (not the base model)", stats.adapter_requests),
        ("paradapt_router_hits", "adapter requests sent where the adapter was resident", stats.hits),
        ("paradapt_router_spills", "extra replicas given to a hot adapter", stats.spills),
        ("paradapt_router_replacements", "adapters placed anew after their replicas died", stats.replacements),
        ("paradapt_router_retries", "requests re-sent after a replica died before answering", counts.retries),
    ):
        out.append(CounterMetricFamily(name, help_, value=value))
    routed = CounterMetricFamily("paradapt_router_routed", "requests sent to each replica", labels=[REPLICA_LABEL])
    inflight = GaugeMetricFamily("paradapt_router_inflight", "requests open on each replica", labels=[REPLICA_LABEL])
    up = GaugeMetricFamily("paradapt_replica_up", "1 if the replica's last state report arrived", labels=[REPLICA_LABEL])
    for name in sorted(set(counts.routed) | set(counts.inflight) | set(counts.up)):
        routed.add_metric([name], counts.routed.get(name, 0))
        inflight.add_metric([name], counts.inflight.get(name, 0))
        up.add_metric([name], 1.0 if counts.up.get(name, False) else 0.0)
    return [*out, routed, inflight, up]


class _Families:
    """A collector over ready-made families (what ``generate_latest`` takes)."""

    def __init__(self, families: Iterable[Metric]):
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def cluster_metrics(per_replica: Mapping[str, str], stats: RouterStats, counts: IngressCounts) -> bytes:
    """The cluster's ``/metrics`` body (Prometheus text format 0.0.4)."""
    return generate_latest(_Families([*merge(per_replica), *router_families(stats, counts)]))


__all__ = ["IngressCounts", "cluster_metrics", "merge", "relabel", "router_families"]
