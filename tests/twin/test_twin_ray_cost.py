"""The twin behind Ray Serve: the ``ray`` cost section, shared cores in the cluster twin, and
fitting Ray's per-token cost from one measured one-replica run (paradapt.twin.ray_cost)."""

from __future__ import annotations

import pytest
from test_twin import COST  # the twin tests' cost model (these workloads use its LoRA terms only)

from paradapt.cluster import AdapterRouter
from paradapt.errors import ConfigError
from paradapt.serve.workload import WorkloadSpec
from paradapt.twin.cluster import simulate_cluster
from paradapt.twin.costmodel import CostModel, RayCost, ServerCost
from paradapt.twin.ray_cost import RayRun, fit_ray_cost

KNOBS = dict(page_size=4, num_blocks=60, token_budget=16, max_running=6, starvation_after=0.05, prefetch=2)
# Saturating: more tokens arrive than one replica processes, so throughput is the cluster's.
SPEC = WorkloadSpec(
    num_adapters=8, rate=60.0, duration=3.0, alpha=0.5, input_len=(2, 20), output_len=(4, 12), seed=2
)
SERVER = ServerCost(step=0.001, token=0.0005, requests=10)


def with_costs(server: ServerCost | None = SERVER, ray: RayCost | None = None) -> CostModel:
    d = COST.to_dict()
    if server is not None:
        d["server"] = server.to_dict()
    if ray is not None:
        d["ray"] = ray.to_dict()
    return CostModel.from_dict(d)


def run(cost: CostModel, *, replicas: int = 1, router=None, **kw):
    return simulate_cluster(
        SPEC,
        cost,
        router or AdapterRouter(),
        replicas=replicas,
        max_served=4,
        max_slots=2,
        drain=30.0,
        **KNOBS,
        **kw,
    )


def test_the_ray_section_round_trips_and_is_validated(tmp_path):
    ray = RayCost(token=0.0008, replica_cpu=0.9, outside_cpu=0.001, cores=2, fit={"measured": 529.3})
    cost = with_costs(ray=ray)
    back = CostModel.load(cost.save(tmp_path / "c.json"))
    assert back.ray == ray and back.server == cost.server
    assert "Ray Serve" in back.describe() and "800.0 us" in back.describe()
    assert "ray" not in with_costs().to_dict()  # absent unless fitted: older files keep their hash
    for field, bad in (("token", -1.0), ("replica_cpu", float("nan")), ("outside_cpu", "x")):
        with pytest.raises(ConfigError, match=f"ray.{field}"):
            RayCost(**{field: bad})
    with pytest.raises(ConfigError, match="ray.cores"):
        RayCost(cores=0)
    assert RayCost(replica_cpu=0.5, outside_cpu=0.002).demand(2.0, 100.0) == pytest.approx(1.2)


def test_rays_token_cost_slows_a_replica_and_is_off_without_ray_or_the_server():
    plain = run(with_costs())
    ray = with_costs(ray=RayCost(token=0.002, cores=64))
    behind = run(ray)
    assert behind.result.throughput < plain.result.throughput
    assert behind.result.tpot_p50 > plain.result.tpot_p50  # every decode step streams tokens
    assert run(ray, ray=False).result.row() == plain.result.row()  # ray=False: the plain server
    assert run(ray, server=False).result.row() == run(with_costs(), server=False).result.row()
    assert behind.slowdown == 1.0  # 64 cores: nothing shared


def test_replicas_sharing_too_few_cores_slow_down_until_their_demand_fits():
    roomy = with_costs(ray=RayCost(replica_cpu=1.0, outside_cpu=0.0, cores=2))
    tight = with_costs(ray=RayCost(replica_cpu=1.0, outside_cpu=0.01, cores=2))
    free = run(roomy, replicas=2)
    assert free.slowdown == 1.0  # two busy replicas on two cores, nothing else: they fit
    router = AdapterRouter()
    shared = run(tight, replicas=2, router=router)
    assert shared.slowdown > 1.0
    assert shared.result.throughput < free.result.throughput
    # at the slowdown found, the demand just fits the two cores (the bisection's last step)
    assert 2.0 * 0.97 <= shared.cores_used <= 2.0
    assert free.cores_used <= 2.0
    # the caller's router saw exactly one run: the tries ran on copies
    assert router.stats.requests == shared.result.requests
    alone = run(tight, replicas=2, shared=False)
    assert alone.slowdown == 1.0 and alone.result.throughput > shared.result.throughput
    assert alone.cores_used > 2.0


def test_fitting_recovers_the_token_cost_that_produced_a_run():
    truth = RayCost(token=0.0015, replica_cpu=0.9, outside_cpu=0.0, cores=64)
    measured = run(with_costs(ray=truth)).result.throughput
    cpu = {"replica-0": 0.9 * 10.0, "ingress": 2.0, "ray": 1.0, "client": 0.5}
    r = RayRun(throughput=measured, cpu=cpu, wall=10.0, tokens=1000, cores=64)
    fitted = fit_ray_cost(with_costs(), r, lambda c: run(c).result.throughput)
    assert fitted.token == pytest.approx(truth.token, rel=0.05)
    assert fitted.replica_cpu == pytest.approx(0.9)
    assert fitted.outside_cpu == pytest.approx(3.5 / 1000)
    assert fitted.cores == 64
    assert fitted.fit["twin"] == pytest.approx(measured, rel=0.01)
    assert fitted.fit["twin_without"] > measured


def test_a_run_faster_than_the_plain_twin_fits_no_token_cost():
    fast = run(with_costs()).result.throughput * 1.2
    r = RayRun(throughput=fast, cpu={"replica-0": 5.0}, wall=10.0, tokens=1000, cores=2)
    assert fit_ray_cost(with_costs(), r, lambda c: run(c).result.throughput).token == 0.0


def test_bad_fit_inputs_are_config_errors():
    good = dict(throughput=100.0, cpu={"replica-0": 5.0}, wall=10.0, tokens=1000, cores=2)
    for field, bad in (
        ("throughput", 0.0),
        ("wall", -1.0),
        ("tokens", 0),
        ("cores", 0),
        ("cpu", {"ray": 1.0}),
    ):
        with pytest.raises(ConfigError, match=field):
            RayRun(**{**good, field: bad})
    with pytest.raises(ConfigError, match="server"):
        fit_ray_cost(with_costs(server=None), RayRun(**good), lambda c: 1.0)
