"""What Ray Serve adds to a replica, fitted from one measured ``paradapt serve --replicas 1`` run.

The twin prices a replica as the plain server (``CostModel.server``), which is too fast behind
Ray Serve: every streamed token also crosses the replica actor's streaming generator (Ray's
threads serialise and send it, holding the replica process's GIL), the ingress and Ray's proxy,
and on one machine those processes and the other replicas share the cores. Measured on a
2-core Zen 4 VM: one replica served 0.76x the plain server, and the twin priced two replicas
14-29 % high (``benchmarks/RESULTS.md``, ``serve_cluster.py``).

:func:`fit_ray_cost` turns one saturated one-replica run into a
:class:`~paradapt.twin.costmodel.RayCost`:

* ``replica_cpu`` and ``outside_cpu`` come straight from the processes' CPU time over the run
  (``/proc``, by role: the replica's actor process, everything else in the server's process
  tree, the load client): a busy replica's cores, and the rest per processed token;
* ``token``, the replica's extra engine time per streamed token, is the one number the CPU time
  does not give (time lost waiting for the GIL is not CPU time): the value at which the cluster
  twin's one-replica throughput equals the measured one (bisection; the twin's throughput falls
  as ``token`` grows). It also absorbs whatever the plain server's cost misses on that workload,
  so it is fitted on the workload the cluster serves (``fit.twin_without``: the twin before).

Two replicas, other popularity skews and other routers are then predictions
(``benchmarks/serve_cluster.py --fit-ray``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from ..errors import ConfigError
from .cluster import crossing
from .costmodel import CostModel, RayCost

#: CPU roles: each replica's actor process is named by its deployment ("replica-0"), the
#: ingress by "ingress"; "client" is the load client; everything else is "ray".
REPLICA_PREFIX = "replica-"


@dataclass(frozen=True)
class RayRun:
    """One measured run behind Ray Serve: its throughput (the twin's definition: prompt and
    output tokens processed in the window, over the window), the CPU seconds each role used
    while it ran, its wall seconds and the tokens it processed in them, and the machine's cores."""

    throughput: float
    cpu: Mapping[str, float]
    wall: float
    tokens: int
    cores: int
    replicas: int = 1

    def __post_init__(self) -> None:
        for name in ("throughput", "wall"):
            v = getattr(self, name)
            if not v > 0:
                raise ConfigError(name, f"must be > 0, got {v!r}")
        if self.tokens < 1:
            raise ConfigError("tokens", f"must be >= 1, got {self.tokens!r}")
        if self.cores < 1:
            raise ConfigError("cores", f"must be >= 1, got {self.cores!r}")
        if not any(r.startswith(REPLICA_PREFIX) for r in self.cpu):
            raise ConfigError("cpu", f"names no replica process (a role starting {REPLICA_PREFIX!r})")

    def replica_seconds(self) -> float:
        return sum(v for r, v in self.cpu.items() if r.startswith(REPLICA_PREFIX))

    def outside_seconds(self) -> float:
        return sum(v for r, v in self.cpu.items() if not r.startswith(REPLICA_PREFIX))


def fit_ray_cost(
    cost: CostModel,
    run: RayRun,
    twin: Callable[[CostModel], float],
    *,
    tries: int = 24,
) -> RayCost:
    """A :class:`RayCost` for ``run`` (saturated: its replicas busy the whole time).

    ``twin(cost)`` predicts the run's throughput with a cost model (the caller's
    :func:`~paradapt.twin.cluster.simulate_cluster` on the run's workload, router and knobs);
    ``token`` is bisected until it matches ``run.throughput``.
    """
    if cost.server is None:
        raise ConfigError(
            "cost", "has no server section: run paradapt profile --server first (Ray adds to it)"
        )
    base = RayCost(
        replica_cpu=run.replica_seconds() / run.replicas / run.wall,
        outside_cpu=run.outside_seconds() / run.tokens,
        cores=run.cores,
    )

    tried: dict[float, float] = {}

    def predict(token: float) -> float:
        if token not in tried:
            tried[token] = twin(replace(cost, ray=replace(base, token=token)))
        return tried[token]

    without = predict(0.0)
    if without > run.throughput:
        crossing(predict, run.throughput, 0.0, 1e-4, tries=tries, limit=1.0)
    # the twin's throughput moves in steps (whole tokens in the window): the closest try wins
    token = min(tried, key=lambda t: (abs(tried[t] - run.throughput), t))
    fit = {
        "measured": round(run.throughput, 2),
        "twin_without": round(without, 2),
        "twin": round(tried[token], 2),
        "replicas": run.replicas,
        "wall_s": round(run.wall, 2),
        "tokens": run.tokens,
    }
    return replace(base, token=token, fit=fit)
