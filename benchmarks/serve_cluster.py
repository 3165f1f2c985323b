"""Scale-out on one machine (issue 18): ``paradapt serve --replicas 2`` against one replica, each
router on the real cluster, the twin's prediction of each run, and a replica killed under load.

All on 127.0.0.1, each replica one torch thread (``--threads-per-replica 1``), the random Llama of
``benchmarks/serve_load.py`` (hidden 512, 8 layers; random weights: speed, routing and
correctness are measured, not quality) and N adapters (default 1,000, LoRA/parallel/series)
under one adapter root. Every configuration is a fresh ``paradapt serve --replicas R`` (its own
local Ray) driven by ``paradapt.bench`` (the project's load client: streaming
``/v1/completions``, Gamma arrivals on time, greedy, ``ignore_eos``), for each popularity
exponent alpha (default 1 and 0.1):

- ``no Ray``: plain ``paradapt serve --threads 1`` (what the twin prices a replica as; against
  ``1 replica`` it prices the Ray path: proxy, ingress, streaming through actors);
- ``1 replica``: ``--replicas 1`` (the same ingress, so the ratio prices the second replica only);
- ``2 x adapter``: two replicas behind paradapt's router (sticky, residency, bounded spill);
- ``2 x multiplex``: the model of Ray Serve's default multiplexing (``--router multiplex``);
- ``2 x random``: random routing, the floor;
- ``kill`` (alpha 1, paradapt's router): SIGKILL replica-0's Ray actor process once
  ``--kill-at`` of the window has passed. Every request must end (served, after a retry if it
  had not started, or a clean error), the replica must come back (``paradapt_replica_up`` 1
  again), and every served answer must equal the same request's answer in the ``2 x adapter``
  run (greedy, so a request served with another adapter's weights would differ).

Per run: throughput as the twin defines it (prompt and output tokens processed within the
window, over the window; the default rate is above two replicas' capacity, so this is what the
cluster can do), its ratio to ``1 replica``, the router's cache-hit rate and the per-replica request split (from one ``/metrics`` scrape:
``paradapt_router_hits_total / paradapt_router_adapter_requests_total``,
``paradapt_router_routed_total``), the per-adapter served fraction by the end of the run (min;
"starved": adapters with requests and none served, the cluster twin's definition) and, with the twin (``--cost``, default the shipped cost
model), the cluster twin's throughput and split for the same workload, router and knobs
(``simulate_cluster``, snapshots every 0.5 s as the ingress polls) and their SMAPE to the
measured ones.

    python benchmarks/serve_cluster.py --out runs/serve_cluster              # about 15 min
    python benchmarks/serve_cluster.py --quick --out /tmp/sc                  # a smoke run, minutes

The timing numbers need a quiet machine: two replicas take both cores of this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402  (the same model and adapter folders as the load benchmark)

from paradapt.cluster.profile import cpu_with_client, served_tokens  # noqa: E402
from paradapt.serve.process import ServerProcess  # noqa: E402
from paradapt.serve.workload import WorkloadSpec  # noqa: E402

#: (label, replicas, router)
CONFIGS = (("no Ray", 0, "none"), ("1 replica", 1, "adapter"), ("2 x adapter", 2, "adapter"),
           ("2 x multiplex", 2, "multiplex"), ("2 x random", 2, "random"))
STATS_PERIOD = 0.5  # seconds: the ingress's report polling (cluster.ray_serve.REPORT_EVERY_S)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="results.json, server logs and the model go here")
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--alphas", default="1,0.1")
    p.add_argument("--rate", type=float, default=10.0, help="requests/s offered (above two replicas' capacity)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    p.add_argument("--grace", type=float, default=150.0, help="seconds after the window before open requests are cut")
    p.add_argument("--input-len", default="32,96")
    p.add_argument("--output-len", default="16,48")
    p.add_argument("--max-served", type=int, default=128, help="each replica's host adapters")
    p.add_argument("--max-slots", type=int, default=16, help="each replica's device adapters")
    p.add_argument("--max-running", type=int, default=32)
    p.add_argument("--kill-at", type=float, default=0.4, help="share of the window after which replica-0 is killed")
    p.add_argument("--only", default="", help="comma-separated config labels (and/or 'kill') to run")
    p.add_argument("--cost", default=None, help="the twin's cost model (default: the shipped one); 'none': no twin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs of each configuration, taking turns")
    p.add_argument("--fit-ray", action="store_true",
                   help="fit the twin's Ray Serve cost on the first '1 replica' run (twin.ray_cost) and predict "
                        "the later runs with it")  # fmt: skip
    p.add_argument(
        "--quick", action="store_true", help="a correctness smoke run: 40 adapters, 10 s of short requests, alpha 1"
    )
    a = p.parse_args(argv)
    a.alphas = [float(x) for x in a.alphas.split(",") if x]
    a.input_len = tuple(int(x) for x in a.input_len.split(","))
    a.output_len = tuple(int(x) for x in a.output_len.split(","))
    a.only = [x.strip() for x in a.only.split(",") if x.strip()]
    if a.quick:  # every request waited for (a busy machine serves slowly; nothing is timed)
        a.adapters, a.duration, a.alphas, a.rate, a.grace = 40, 10.0, [1.0], 4.0, 600.0
        a.input_len, a.output_len, a.max_served, a.max_slots = (16, 48), (8, 16), 12, 4
    return a


def spec_for(a, alpha: float) -> WorkloadSpec:
    return WorkloadSpec(
        num_adapters=a.adapters,
        rate=a.rate,
        duration=a.duration,
        alpha=alpha,
        input_len=a.input_len,
        output_len=a.output_len,
        seed=a.seed,
    )


def flags(a, model: Path, root: Path, replicas: int, router: str) -> list[str]:
    kv = a.max_running * (a.input_len[1] + a.output_len[1] + 16)
    where = ["--threads", "1"] if replicas == 0 else [  # 0: plain paradapt serve, no Ray
        "--replicas", str(replicas), "--threads-per-replica", "1", "--router", router]
    return [
        "--model", str(model), "--adapter-root", str(root), "--served-model-name", serve_load.BASE_NAME,
        *where,
        "--max-served", str(a.max_served), "--max-slots", str(a.max_slots), "--max-running", str(a.max_running),
        "--kv-tokens", str(kv), "--queue-bound", "100000", "--no-access-log",
    ]  # fmt: skip


def scrape(url: str) -> dict:
    """The router's counters and each replica's up flag from one ``/metrics`` scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=60).text
    out: dict = {"routed": {}, "up": {}}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "paradapt_router_routed_total":
                out["routed"][s.labels["replica"]] = int(s.value)
            elif s.name == "paradapt_replica_up":
                out["up"][s.labels["replica"]] = s.value
            elif s.name in ("paradapt_router_hits_total", "paradapt_router_adapter_requests_total",
                            "paradapt_router_retries_total", "paradapt_router_spills_total"):  # fmt: skip
                out[s.name.removeprefix("paradapt_router_").removesuffix("_total")] = int(s.value)
    return out


def replica_pid(name: str) -> int | None:
    """The process of the Ray actor serving deployment ``name`` (its title names it)."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    for line in ps.splitlines():
        if "ServeReplica" in line and f":{name}" in line:
            return int(line.split()[0])
    return None


def cpu_per_token(before: dict, after: dict, wall: float, tokens: int) -> dict:
    """Each role's CPU over the load (cores busy on average, and ms per processed token)."""
    roles = sorted(set(before) | set(after))
    used = {r: after.get(r, 0.0) - before.get(r, 0.0) for r in roles}
    return {
        "wall_s": wall,
        "tokens": tokens,
        "seconds": used,
        "cores": {r: used[r] / wall for r in roles},
        "ms_per_token": {r: 1e3 * used[r] / max(1, tokens) for r in roles},
    }


def drive(url: str, workload, a) -> tuple[dict, dict]:
    """The workload through ``paradapt.bench``: (its metrics, each request's outcome)."""
    from paradapt.bench import BenchConfig, result_of, send

    config = BenchConfig(url=url, base_name=serve_load.BASE_NAME, vocab_size=512, seed=a.seed, drain=a.grace,
                         progress=False)  # fmt: skip
    outcomes, duration = send(workload, config, source="serve_cluster")
    return result_of(workload, config, outcomes, duration), outcomes


def run(a, label: str, replicas: int, router: str, alpha: float, model: Path, root: Path, kill: bool = False) -> dict:
    workload = spec_for(a, alpha).generate()
    tag = label.replace(" ", "") + f"-a{alpha:g}"
    server = ServerProcess(flags(a, model, root, replicas, router), log=a.out / f"server-{tag}.log")
    t0 = time.monotonic()
    killed: dict = {}
    try:
        server.wait_healthy(timeout=300)
        started = time.monotonic() - t0
        if kill:
            threading.Thread(target=_kill_later, args=(a.kill_at * a.duration, killed), daemon=True).start()
        cpu0, w0 = cpu_with_client(server.proc.pid), time.monotonic()
        result, outcomes = drive(server.url, workload, a)
        cpu1, wall = cpu_with_client(server.proc.pid), time.monotonic() - w0
        metrics = scrape(server.url)
        if kill:
            killed["back_s"] = _wait_back(server.url, "replica-0", killed.get("at", time.monotonic()))
            metrics = scrape(server.url)
    finally:
        rc = server.stop()
    row = summarize(label, replicas, router, alpha, result, outcomes, served_by_adapter(workload, outcomes), metrics)
    row.update(start_s=started, exit_status=rc, killed=killed if kill else None,
               cpu=cpu_per_token(cpu0, cpu1, wall, served_tokens(workload, outcomes)))  # fmt: skip
    return row


def _kill_later(after: float, killed: dict) -> None:
    time.sleep(after)
    pid = replica_pid("replica-0")
    if pid is None:
        killed["error"] = "replica-0's process not found"
        return
    os.kill(pid, signal.SIGKILL)
    killed.update(pid=pid, at=time.monotonic(), after_s=after)


def _wait_back(url: str, name: str, since: float, timeout: float = 240.0) -> float | None:
    """Seconds from the kill until ``/metrics`` says the replica is up again (None: not in time)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if scrape(url)["up"].get(name) == 1.0:
                return time.monotonic() - since
        except httpx.HTTPError:
            pass
        time.sleep(2.0)
    return None


def served_by_adapter(workload, outcomes: dict) -> dict[str, float]:
    """Each adapter's share of its requests served by the end of the run (the cluster twin's
    starvation: an adapter with requests and none served)."""
    sent: dict[str, int] = {}
    ok: dict[str, int] = {}
    for r in workload.requests:
        if r.adapter is not None:
            sent[r.adapter] = sent.get(r.adapter, 0) + 1
            ok[r.adapter] = ok.get(r.adapter, 0) + (outcomes[r.id].status == "ok" if r.id in outcomes else 0)
    return {a: ok[a] / n for a, n in sent.items()}


def summarize(label, replicas, router, alpha, result, outcomes: dict, fractions: dict[str, float], metrics) -> dict:
    adapter_requests = max(1, metrics.get("adapter_requests", 0))
    return {
        "label": label,
        "replicas": replicas,
        "router": router,
        "alpha": alpha,
        "sent": result.extra["sent"],
        "served": result.extra["served"],
        "failed": result.extra["failed"],
        "req_s": result.requests_per_s,
        "tok_s": result.output_throughput,
        "throughput": result.throughput,
        "ttft_p50": result.ttft_p50,
        "tpot_p50": result.tpot_p50,
        "hit_rate": metrics.get("hits", 0) / adapter_requests,
        "routed": metrics["routed"],
        "retries": metrics.get("retries", 0),
        "spills": metrics.get("spills", 0),
        "min_served": min(fractions.values(), default=float("nan")),
        "starved": sum(1 for f in fractions.values() if f == 0),
        "texts": {str(i): o.text for i, o in outcomes.items() if o.status == "ok"},
        "statuses": {str(i): o.status for i, o in outcomes.items()},
    }


def twin(a, row: dict, cost) -> dict:
    """The cluster twin's throughput and request split for ``row``'s workload, router and knobs."""
    from paradapt.cluster import make_router
    from paradapt.twin.cluster import simulate_cluster

    r = simulate_cluster(
        spec_for(a, row["alpha"]),
        cost,
        make_router("adapter" if row["replicas"] == 0 else row["router"], a.seed),
        replicas=max(1, row["replicas"]),
        max_served=a.max_served,
        max_slots=a.max_slots,
        max_running=a.max_running,
        drain=a.grace,
        stats_period=STATS_PERIOD,
        ray=row["replicas"] > 0,  # no Ray: the plain server
    )
    return {"throughput": r.result.throughput, "routed": dict(r.requests), "hit_rate": r.hit_rate,
            "slowdown": r.slowdown}  # fmt: skip


def fit_ray(a, row: dict, cost):
    """The cost model with a ``ray`` section fitted on ``row`` (a saturated ``1 replica`` run)."""
    from dataclasses import replace

    from paradapt.twin.ray_cost import RayRun, fit_ray_cost

    cpu = row["cpu"]
    run = RayRun(throughput=row["throughput"], cpu=cpu["seconds"], wall=cpu["wall_s"], tokens=cpu["tokens"],
                 cores=os.cpu_count() or 1, replicas=row["replicas"])  # fmt: skip
    fitted = fit_ray_cost(cost, run, lambda c: twin(a, row, c)["throughput"])
    return replace(cost, ray=fitted)


def smape(pred: float, real: float) -> float:
    return abs(pred - real) / ((abs(pred) + abs(real)) / 2) if pred or real else 0.0


def check_kill(row: dict, reference: dict) -> dict:
    """Every request ended; every served answer equals the reference run's for the same request."""
    statuses = list(row["statuses"].values())
    unclean = [s for s in statuses if not (s == "ok" or s.isdigit() or s == "stream_error")]
    same = [i for i in row["texts"] if i in reference["texts"]]
    wrong = [i for i in same if row["texts"][i] != reference["texts"][i]]
    return {"ended": not unclean, "unclean": len(unclean), "compared": len(same), "different": len(wrong)}


def line(row: dict, base: float | None) -> str:
    ratio = f"{row['throughput'] / base:.2f}" if base else "-"
    split = "/".join(str(row["routed"].get(f"replica-{i}", 0)) for i in range(row["replicas"]))
    twin_part = ""
    if "twin" in row:
        t = row["twin"]
        twin_part = f"  twin {t['throughput']:.0f} tok/s (SMAPE {100 * row['smape']:.1f} %), split {row['twin_split']}"
    return (
        f"{row['label']:<14} a={row['alpha']:<4g} {row['served']:>4}/{row['sent']:<4} {row['req_s']:>6.2f} req/s "
        f"{row['throughput']:>7.1f} tok/s x1: {ratio:>5}  hit {row['hit_rate']:.2f}  split {split:<9} "
        f"min served {row['min_served']:.2f} starved {row['starved']}{twin_part}"
    )


def median_row(rows: list[dict]) -> dict:
    """The run with the median throughput (the lower middle of an even count)."""
    return sorted(rows, key=lambda r: r["throughput"])[(len(rows) - 1) // 2]


def predict(a, rows: list[dict], cost):
    """The twin for every configuration and alpha run, against the median of its repeats; with
    ``--fit-ray``, Ray's cost is first fitted on the median ``1 replica`` run at the first alpha
    (every other configuration and alpha is then a prediction). Prints a table; returns the cost."""
    if a.fit_ray and cost.ray is None:
        ones = [r for r in rows if r["replicas"] == 1 and r["alpha"] == a.alphas[0]]
        if ones:
            on = median_row(ones)
            cost = fit_ray(a, on, cost)
            on["fitted"] = cost.ray.to_dict()
            print(cost.ray.describe(), flush=True)
    print("| config | alpha | runs | measured tok/s, median [min, max] | twin tok/s | SMAPE | split (median run) "
          "| twin split | twin slowdown |\n|---|--:|--:|--:|--:|--:|---|---|--:|")  # fmt: skip
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["alpha"]), []).append(r)
    for (label, alpha), runs in groups.items():
        mid = median_row(runs)
        t = twin(a, mid, cost)
        for r in runs:
            r["twin"], r["smape"] = t, smape(t["throughput"], r["throughput"])
            r["twin_split"] = "/".join(str(v) for v in t["routed"].values())
        vals = [r["throughput"] for r in runs]
        split = "/".join(str(mid["routed"].get(f"replica-{i}", 0)) for i in range(mid["replicas"])) or "-"
        fitted = " (fitted)" if any("fitted" in r for r in runs) else ""
        print(f"| {label}{fitted} | {alpha:g} | {len(runs)} | {mid['throughput']:.1f} [{min(vals):.1f}, {max(vals):.1f}] "
              f"| {t['throughput']:.1f} | {100 * mid['smape']:.1f} % | {split} | {mid['twin_split']} "
              f"| {t.get('slowdown', 1.0):.2f} |", flush=True)  # fmt: skip
    return cost


def cpu_line(cpu: dict) -> str:
    parts = [f"{r} {cpu['cores'][r]:.2f} cores {cpu['ms_per_token'][r]:.2f} ms/tok" for r in cpu["cores"]]
    return f"{cpu['tokens']} tokens in {cpu['wall_s']:.1f} s: " + ", ".join(parts)


def main(argv=None) -> int:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    model, root = a.out / "model", a.out / "adapters"
    if not (model / "config.json").is_file():
        serve_load.build_model(model, 8, 512, a.seed)
    if not root.is_dir():
        root.mkdir()
        serve_load.build_adapters(model, root, spec_for(a, 1.0).generate(), a.seed)
    cost = None
    if a.cost != "none":
        from paradapt.twin.costmodel import load_cost

        cost = load_cost(a.cost)
    print(f"serve_cluster: {a.adapters} adapters, {a.rate:g} req/s for {a.duration:g} s, input {a.input_len}, "
          f"output {a.output_len}; cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    rows: list[dict] = []
    for alpha in a.alphas:
        for repeat in range(a.repeats):  # the configurations take turns: a drifting machine hits all alike
            for label, replicas, router in CONFIGS:
                if a.only and label not in a.only:
                    continue
                row = run(a, label, replicas, router, alpha, model, root)
                row["repeat"] = repeat
                rows.append(row)
                base = next((r["throughput"] for r in rows[::-1] if r["replicas"] == 1 and r["alpha"] == alpha), None)
                print(line(row, base), flush=True)
                print("    cpu " + cpu_line(row["cpu"]), flush=True)
    if cost is not None:
        cost = predict(a, rows, cost)
    if not a.only or "kill" in a.only:
        reference = next((r for r in rows if r["label"] == "2 x adapter" and r["alpha"] == a.alphas[0]), None)
        row = run(a, "kill", 2, "adapter", a.alphas[0], model, root, kill=True)
        if reference is not None:
            row["check"] = check_kill(row, reference)
        rows.append(row)
        print(line(row, None), flush=True)
        print(f"kill: {json.dumps(row['killed'])}; failed {row['failed']}; retries {row['retries']}; "
              f"check {json.dumps(row.get('check'))}", flush=True)  # fmt: skip
    (a.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}))
    print(f"saved {a.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
