"""On paper, with the cluster twin: 100 replicas x 10,000 adapters at skewed popularity (issue 18).

Routes one workload through ``paradapt.twin.simulate_cluster`` (N simulated engines, each the real
scheduler and adapter cache on the cost model's clock, behind the real router objects of
``paradapt.cluster.router``) with each policy, at Zipf exponents 1 and 0.5:

* ``sticky+spill``: ``AdapterRouter``, paradapt's policy (sticky -> residency -> bounded spill
  -> fewest adapters), starting cold;
* ``sticky+spill+plan``: the same router started from the cluster planner's placement
  (``paradapt.twin.cluster_plan.place_adapters``: hot adapters replicated by load, the rest
  spread by expected load; each replica's cache warm with its share);
* ``multiplex``: ``MultiplexRouter``, a model of Ray Serve's default model multiplexing;
* ``random``: ``RandomRouter``, the floor.

Reported per row: cache-hit rate (adapter requests sent to a replica holding the adapter),
load imbalance (max over mean tokens routed per replica), starved adapters (adapters with
requests none of which finished by the end of the drain), the hottest adapter's served
fraction, starvation-free (>= 90 % of the offered tokens served in the window), throughput vs
the offered load, TTFT p50/p90 and the router's spills.

Popularity is Zipf with exponent s (adapter i drawn with weight 1 / (i + 1)**s): s = 1 sends
about 10 % of the traffic to the hottest of 10,000 adapters, s = 0.5 about 0.5 %. (S-LoRA's
power law, the ``alpha`` of paradapt's workload specs, runs the other way: alpha = 1 is uniform.)

Sizing. The twin is pure Python; its cost is about one pass of the engine's planning code per
simulated step per replica, plus a router decision and a walk over the N replicas per request.
The offered load is ``--load`` (0.7) times the cluster's nominal capacity (one replica's
saturated tokens/s with one adapter and the workload's mean lengths, times N): every replica
stays busy without the whole cluster being overloaded by construction. Requests are short
(8-256 prompt, 8-64 output tokens), so a request decodes in a couple of seconds and the window
is many request lifetimes long (with longer outputs the tokens still due after the window would
make every policy look starved). With the shipped cost model (about 1,200 tokens/s nominal per
replica at these lengths) that is about 380 requests/s; ``--duration 30`` gives about 11,000
requests. Measured on a 2 s slice of the same workload (2 of 2 busy cores): 100 simulated
replicas cost about one second of wall time per simulated second, so a run (30 s window, then
the drain, mostly idle) takes about 40 s, and the 8 runs (4 policies x 2 exponents) about 3
minutes in 2 processes, 5-6 on one. Engines: ``--max-served 64 --max-slots 16`` on every
replica; router snapshots refreshed every 0.5 s (the ingress polls its replicas that often).
The drain (half the window, at least 10 s) lets a request that arrived last finish.

    python benchmarks/cluster_twin.py --json runs/cluster_twin.json      # the on-paper report
    python benchmarks/cluster_twin.py --quick                            # smoke: 8 x 400, 5 s window, seconds
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import itertools
import json
import random
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from paradapt.cluster import make_router
from paradapt.files import write_text_atomic
from paradapt.serve.workload import Workload, WorkloadSpec
from paradapt.twin.cluster import simulate_cluster
from paradapt.twin.cluster_plan import adapter_loads, offered_load, place_adapters, replica_capacity
from paradapt.twin.costmodel import load_cost

POLICIES = ("sticky+spill", "sticky+spill+plan", "multiplex", "random")
DRAIN_MIN = 10.0  # seconds after the window: a request that arrived last still finishes (no false starvation)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=100, help="replicas (default 100)")
    p.add_argument("--adapters", type=int, default=10_000, help="adapters (default 10,000)")
    p.add_argument("--zipf", default="1,0.5", help="Zipf exponents, comma-separated (default 1,0.5)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals (default 30)")
    p.add_argument("--load", type=float, default=0.7, help="offered load / nominal capacity (default 0.7)")
    p.add_argument("--max-served", type=int, default=64, help="host adapters per replica (default 64)")
    p.add_argument("--max-slots", type=int, default=16, help="device adapters per replica (default 16)")
    p.add_argument("--stats-period", type=float, default=0.5, help="router snapshot refresh, s (default 0.5)")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"default {','.join(POLICIES)}")
    p.add_argument("--cost", help="cost model JSON from `paradapt profile` (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    p.add_argument("--json", help="write the rows here (atomically)")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 8 replicas x 400 adapters, 5 s, 1 process"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.replicas, args.adapters, args.duration, args.workers = 8, 400, 5.0, 1
    for name in ("replicas", "adapters", "max_served", "max_slots", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not (args.duration > 0 and args.load > 0 and args.stats_period >= 0):
        p.error("--duration and --load must be positive, --stats-period >= 0")
    args.zipf = [float(s) for s in args.zipf.split(",") if s]
    args.policies = [s for s in args.policies.split(",") if s]
    unknown = sorted(set(args.policies) - set(POLICIES))
    if unknown:
        p.error(f"unknown --policies {unknown}; known: {list(POLICIES)}")
    return args


def zipf_workload(args: argparse.Namespace, s: float, rate: float) -> Workload:
    """The workload: arrivals and lengths from a workload spec, adapters drawn Zipf(s)."""
    spec = WorkloadSpec(
        num_adapters=args.adapters,
        rate=rate,
        duration=args.duration,
        input_len=(8, 256),
        output_len=(8, 64),
        seed=args.seed,
    )
    base = spec.generate()
    names = [a.name for a in base.adapters]
    cum = list(itertools.accumulate(1.0 / (i + 1) ** s for i in range(len(names))))
    rng = random.Random(f"{args.seed}:zipf:{s}")
    requests = tuple(
        dataclasses.replace(r, adapter=names[bisect.bisect_left(cum, rng.random() * cum[-1])])
        for r in base.requests
    )
    return Workload(None, base.adapters, requests, base.duration)


def router_for(policy: str, seed: int):
    """Both sticky+spill policies are paradapt's router (the planned one is preplaced later)."""
    return make_router("adapter" if policy.startswith("sticky+spill") else policy, seed)


def run_one(job: tuple[argparse.Namespace, float, float, str]) -> dict[str, Any]:
    """One policy on one popularity (top level: process pools pickle it)."""
    args, s, rate, policy = job
    cost = load_cost(args.cost, None)
    workload = zipf_workload(args, s, rate)
    placement = None
    if policy == "sticky+spill+plan":
        placement = place_adapters(adapter_loads(workload), args.replicas).replicas
    t0 = time.perf_counter()
    c = simulate_cluster(
        workload,
        cost,
        router_for(policy, args.seed),
        replicas=args.replicas,
        max_served=args.max_served,
        max_slots=args.max_slots,
        drain=max(DRAIN_MIN, args.duration / 2),
        stats_period=args.stats_period,
        placement=placement,
    )
    r = c.result
    hottest = max(workload.requests_per_adapter().items(), key=lambda kv: kv[1])[0]
    return {
        "zipf": s,
        "policy": policy,
        "replicas": args.replicas,
        "adapters": args.adapters,
        "requests": r.requests,
        "hit_rate": c.hit_rate,
        "imbalance": c.imbalance,
        "starved": len(c.starved),
        "adapters_asked": len({q.adapter for q in workload.requests}),
        "hottest": hottest,
        "hottest_share": workload.requests_per_adapter()[hottest] / len(workload.requests),
        "hottest_served": r.served_fraction.get(hottest, float("nan")),
        "starvation_free": r.starvation_free,
        "throughput": r.throughput,
        "offered": r.ideal_throughput,
        "ttft_p50": r.ttft_p50,
        "ttft_p90": r.ttft_p90,
        "spills": c.router.spills,
        "loads": r.loads,
        "sim_seconds": time.perf_counter() - t0,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| zipf s | policy | hit rate | imbalance (max/mean) | starved adapters | hottest served | "
        "starvation-free | throughput / offered (tok/s) | TTFT p50 / p90 (s) | spills | twin s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['zipf']:g} | {r['policy']} | {r['hit_rate']:.3f} | {r['imbalance']:.2f} | "
            f"{r['starved']} of {r['adapters_asked']} | {r['hottest_served']:.2f} ({100 * r['hottest_share']:.1f}% "
            f"of requests) | {'yes' if r['starvation_free'] else 'no'} | {r['throughput']:,.0f} / {r['offered']:,.0f} | "
            f"{r['ttft_p50']:.2f} / {r['ttft_p90']:.2f} | {r['spills']} | {r['sim_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    cost = load_cost(args.cost, None)
    probe = zipf_workload(args, args.zipf[0], 1.0)  # lengths only: the capacity probe uses their means
    capacity = replica_capacity(probe, cost, {})
    per_request = offered_load(probe) * probe.duration / max(1, len(probe.requests))
    rate = args.load * args.replicas * capacity / per_request
    print(
        f"cluster twin: {args.replicas} replicas x {args.adapters} adapters, {args.duration:g} s at "
        f"{rate:.1f} req/s ({args.load:g} x {args.replicas} x {capacity:.0f} tok/s nominal), "
        f"--max-served {args.max_served} --max-slots {args.max_slots}, stats every {args.stats_period:g} s",
        flush=True,
    )
    jobs = [(args, s, rate, policy) for s in args.zipf for policy in args.policies]
    t0 = time.perf_counter()
    if args.workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            rows = list(pool.map(run_one, jobs))
    else:
        rows = [run_one(j) for j in jobs]
    print(table(rows))
    print(f"{len(rows)} runs in {time.perf_counter() - t0:.0f} s")
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k != "json"}
        payload = {"args": meta, "rate": rate, "replica_capacity": capacity, "rows": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(args.json), json.dumps(payload, indent=2, default=str) + "\n")
        print(f"saved {args.json}")
    return rows


if __name__ == "__main__":
    main()
