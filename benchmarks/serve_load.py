"""Load benchmark for ``paradapt serve``: an S-LoRA-style workload over loopback against the real server.

Side by side, in one run, on a Llama-style decoder built from a config (hidden 512, 8 layers,
stories260K's 512-token tokenizer; random weights: only speed is measured), or on a real model
(``--model smollm2-135m-instruct``, with adapters of random non-zero weights):

- ``base``: every request asks for the base model (no adapters attached);
- ``paradapt a=1`` / ``paradapt a=0.1``: N adapters (default 1,000; LoRA / parallel / series,
  ranks 8/16/32) in a temp root, adapter of each request drawn with popularity exponent alpha;
- ``one-at-a-time a=1``: the same server with ``--max-slots 1`` (every step serves one adapter,
  as naive per-adapter batching does), the alpha-1 workload.

Each configuration is a fresh ``paradapt serve`` subprocess on a free loopback port. Requests
come from ``paradapt.serve.workload`` (Gamma arrivals, seeded) and go out through
``paradapt.bench`` (the load client of ``paradapt bench``) as streaming ``/v1/completions`` with
``ignore_eos`` (each request generates exactly its output length), so TTFT is the first SSE chunk
and TPOT the mean gap after it. A run stops sending at ``--duration`` and stops waiting
``--grace`` seconds later (unfinished requests are cancelled by disconnecting, and count as not
served).

    python benchmarks/serve_load.py --quick                  # < 2 min
    python benchmarks/serve_load.py --rates 0.5,1,2 --duration 60 --adapters 1000

Reported per configuration and rate, with the twin's metric definitions (``paradapt.twin.metrics``):
requests/s and output tokens/s (finished by the window's end, over the window), TTFT and TPOT p50/p90, SLO attainment (the
share of sent requests that completed within both SLOs), the per-adapter served fraction (min over
adapters that got requests; "starved" counts adapters with requests and none served), adapter
loads, and the throughput ratio to ``base`` at the same rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from paradapt.serve.process import ServerProcess, ServerStartError
from paradapt.serve.workload import Workload, WorkloadSpec

TOKENIZER = "models/stories260k-hf"  # under the shared assets
BASE_NAME = "base"


# -- the model and the adapters -------------------------------------------------------------------


def build_model(folder: Path, layers: int, hidden: int, seed: int) -> Path:
    """A random Llama-style decoder from a config, saved with stories260K's tokenizer."""
    from paradapt.loading import find_assets
    from paradapt.twin.profile import build_model as random_llama  # the twin profiles the same model

    assets = find_assets()
    tok_dir = assets / TOKENIZER if assets is not None else Path(TOKENIZER)
    if not (tok_dir / "tokenizer.json").is_file():
        raise SystemExit(f"serve_load: no stories260K tokenizer at {tok_dir} (the shared assets)")
    random_llama(layers, hidden, seed).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, folder / name)
    return folder


def build_adapters(model_dir: Path, root: Path, workload: Workload, seed: int) -> None:
    """One folder per workload adapter, for the model in ``model_dir``: the twin's ``build_adapter_root``
    (weights from a few random templates per (kind, rank), hard-linked).

    The server still reads, validates and attaches every folder separately; only disk space is shared.
    An adapter kind the engine benchmarks do not serve stops the benchmark with its name.
    """
    from paradapt.errors import ConfigError
    from paradapt.loading import load_model
    from paradapt.twin.profile import build_adapter_root

    _, model = load_model(model_dir)
    try:
        build_adapter_root(model, root, workload.adapters, seed)
    except ConfigError as e:
        raise SystemExit(f"serve_load: --kinds: {e}") from None


# -- the server --------------------------------------------------------------------------------------


class Server(ServerProcess):
    """``paradapt serve`` for one configuration, logging to a file; reads its Prometheus metrics."""

    def __init__(self, model: Path | str, root: Path, flags: list[str], log: Path):
        args = ["--model", str(model), "--adapter-root", str(root), "--served-model-name", BASE_NAME]
        super().__init__(args + flags, log=log)

    def wait_ready(self, timeout: float = 300.0) -> None:
        try:
            self.wait_healthy(timeout)
        except ServerStartError as e:
            raise SystemExit(f"serve_load: {e}; see {self.log.name}") from None

    def metric(self, name: str) -> float:
        """Sum of a Prometheus metric's samples (all label sets); NaN if an overloaded server does not
        answer within a minute (the run's other numbers stay valid)."""
        try:
            text = httpx.get(f"{self.url}/metrics", timeout=60).text
        except httpx.HTTPError:
            return float("nan")
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] == name)


# -- the load generator: paradapt's own load client -----------------------------------------------


@dataclass
class Row:
    name: str
    rate: float
    stats: dict = field(default_factory=dict)


def drive(url: str, workload: Workload, base_only: bool, args, seed: int) -> dict:
    """The workload through :func:`paradapt.bench.bench` (the project's one load client: streaming
    ``/v1/completions``, arrivals on time, ``ignore_eos``); its metrics as this table shows them.

    ``base_only`` sends every request to the base model. Requests still open ``--grace`` seconds
    after the window are cut (disconnecting cancels them on the server) and count as not served.
    """
    from paradapt.bench import BenchConfig, bench

    if base_only:
        reqs = tuple(dataclasses.replace(r, adapter=None) for r in workload.requests)
        workload = dataclasses.replace(workload, requests=reqs)
    config = BenchConfig(
        url=url,
        base_name=BASE_NAME,
        vocab_size=args.vocab_size,
        seed=seed,
        drain=args.grace,
        slo_ttft=args.ttft_slo,
        slo_tpot=args.tpot_slo,
        progress=False,
    )
    r = bench(workload, config, source="serve_load")
    fractions = [f for a, f in r.served_fraction.items() if a is not None]
    return {
        "sent": r.extra["sent"],
        "done": r.extra["served"],
        "rejected": sum(r.extra["failed"].values()),
        "req_s": r.requests_per_s,
        "tok_s": r.output_throughput,
        "ttft_p50": r.ttft_p50,
        "ttft_p90": r.ttft_p90,
        "tpot_p50": r.tpot_p50,
        "tpot_p90": r.tpot_p90,
        "slo": r.goodput * r.window / max(1, r.requests),
        "min_served": min(fractions, default=float("nan")),
        "starved": sum(1 for f in fractions if f == 0),
        "wall": r.extra["duration"],
    }


# -- the run ---------------------------------------------------------------------------------------------


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small and short: finishes in under 2 minutes")
    p.add_argument("--adapters", type=int, default=1000, help="N adapters (default 1000)")
    p.add_argument("--rates", type=_csv(float), default=[1.0], help="request rates to sweep, e.g. 0.5,1,2")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per run")
    p.add_argument("--grace", type=float, default=60.0, help="seconds to wait for stragglers after that")
    p.add_argument("--max-requests", type=int, default=None, help="cap on requests per run")
    p.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of the gaps (1 = Poisson)")
    p.add_argument("--input-len", type=_csv(int), default=[8, 128])
    p.add_argument("--output-len", type=_csv(int), default=[8, 64])
    p.add_argument("--kinds", type=_csv(str), default=["lora", "parallel", "series"])
    p.add_argument("--ranks", type=_csv(int), default=[8, 16, 32])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--max-slots", type=int, default=32, help="adapters per step (paradapt rows)")
    p.add_argument("--max-served", type=int, default=None, help="host copies (default: N)")
    p.add_argument("--max-running", type=int, default=32)
    p.add_argument("--token-budget", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    p.add_argument("--ttft-slo", type=float, default=5.0, help="seconds")
    p.add_argument("--tpot-slo", type=float, default=0.5, help="seconds per output token")
    p.add_argument("--only", type=_csv(str), default=None, help="configs to run (base,a1,a0.1,one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=Path, default=None, help="build the model/adapters here and keep them")
    p.add_argument(
        "--model",
        default=None,
        help="a named model (smollm2-135m-instruct) or a model folder instead of the random Llama "
        "(--layers/--hidden are then ignored; adapters get random non-zero weights for that model)",
    )
    args = p.parse_args(argv)
    args.vocab_size = 512  # random prompt ids: the stories260K tokenizer's, or the named model's (main)
    if args.quick:
        args.adapters, args.rates, args.duration, args.grace = 100, [2.0], 12.0, 15.0
        args.layers, args.input_len, args.output_len = 4, [8, 64], [8, 32]
    return args


CONFIGS = {  # name -> (alpha, base_only, one_slot)
    "base": (1.0, True, False),
    "a1": (1.0, False, False),
    "a0.1": (0.1, False, False),
    "one": (1.0, False, True),
}
LABELS = {"base": "base", "a1": "paradapt a=1", "a0.1": "paradapt a=0.1", "one": "one-at-a-time a=1"}


def spec_for(args, alpha: float, rate: float, traffic: int = 0) -> WorkloadSpec:
    """The workload; ``traffic`` shifts the seed so each rate of a sweep draws fresh requests
    (the adapter folders, built once from ``traffic=0``, keep their kinds and ranks)."""
    return WorkloadSpec(
        num_adapters=args.adapters,
        rate=rate,
        duration=args.duration,
        alpha=alpha,
        cv=args.cv,
        input_len=tuple(args.input_len),
        output_len=tuple(args.output_len),
        ranks=args.ranks,
        kinds=args.kinds,
        seed=args.seed + traffic,
        max_requests=args.max_requests,
    )


def server_flags(args, one_slot: bool) -> list[str]:
    slots = 1 if one_slot else min(args.max_slots, args.adapters)
    flags = ["--max-slots", str(slots), "--max-served", str(args.max_served or args.adapters)]
    flags += ["--max-running", str(args.max_running), "--token-budget", str(args.token_budget)]
    flags += ["--kv-tokens", str(args.max_running * (args.input_len[1] + args.output_len[1] + 16))]
    flags += ["--queue-bound", "100000"]
    return flags + (["--threads", str(args.threads)] if args.threads else [])


def run_config(args, name: str, model_dir: Path, root: Path, work: Path) -> list[Row]:
    alpha, base_only, one_slot = CONFIGS[name]
    server = Server(args.model or model_dir, root, server_flags(args, one_slot), work / f"server-{name}.log")
    rows = []
    try:
        server.wait_ready()
        for i, rate in enumerate(args.rates):
            workload = spec_for(args, alpha, rate, traffic=i).generate()
            loads0 = server.metric("paradapt_adapter_device_loads_total")
            secs0 = sum(server.metric(m) for m in MOVE_SECONDS)
            stats = drive(server.url, workload, base_only, args, args.seed + i)
            stats["loads"] = server.metric("paradapt_adapter_device_loads_total") - loads0
            stats["move_s"] = sum(server.metric(m) for m in MOVE_SECONDS) - secs0
            rows.append(Row(name, rate, stats))
            print(_line(LABELS[name], rate, stats, None), flush=True)
    finally:
        rc = server.stop()
        if rc != 0:
            print(f"  (server exit status {rc}; log {server.log.name})", flush=True)
    return rows


MOVE_SECONDS = [f"paradapt_adapter_{op}_seconds_total" for op in ("load_host", "load_device", "evict_device")]
HEADER = (
    f"{'config':<20}{'rate':>5} {'sent':>5} {'done':>5} {'req/s':>6} {'tok/s':>7} {'xbase':>6} "
    f"{'TTFT p50/p90 s':>15} {'TPOT p50/p90 ms':>16} {'SLO':>5} {'min served':>10} {'starved':>7} {'loads':>6} {'move s':>6}"
)


def _line(label: str, rate: float, s: dict, ratio: float | None) -> str:
    x = "" if ratio is None else f"{ratio:.2f}"
    return (
        f"{label:<20}{rate:>5g} {s['sent']:>5} {s['done']:>5} {s['req_s']:>6.2f} {s['tok_s']:>7.1f} {x:>6} "
        f"{s['ttft_p50']:>7.2f}/{s['ttft_p90']:<7.2f} {1e3 * s['tpot_p50']:>7.0f}/{1e3 * s['tpot_p90']:<8.0f} "
        f"{s['slo']:>5.2f} {s['min_served']:>10.2f} {s['starved']:>7} {s['loads']:>6.0f} {s['move_s']:>6.1f}"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    work = args.keep or Path(tempfile.mkdtemp(prefix="serve_load-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, root = work / "model", work / "adapters"
    if args.model is not None:
        from paradapt.models import resolve_model

        model_dir = resolve_model(args.model)  # a name: converted once and cached
        args.vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    elif not (model_dir / "config.json").is_file():
        build_model(model_dir, args.layers, args.hidden, args.seed)
    if not root.is_dir():
        root.mkdir()
        build_adapters(model_dir, root, spec_for(args, 1.0, 1.0).generate(), args.seed)
    what = args.model or f"Llama hidden {args.hidden}, {args.layers} layers"
    print(
        f"serve_load: {what}; {args.adapters} adapters "
        f"({'/'.join(args.kinds)}, ranks {'/'.join(map(str, args.ranks))}); rates {args.rates}; "
        f"{args.duration:g} s arrivals (+{args.grace:g} s grace), cv {args.cv}, input {args.input_len}, "
        f"output {args.output_len}; SLO TTFT {args.ttft_slo} s, TPOT {args.tpot_slo} s; "
        f"setup {time.monotonic() - t0:.0f} s; cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    print(HEADER, flush=True)
    rows: list[Row] = []
    for name in args.only or list(CONFIGS):
        rows += run_config(args, name, model_dir, root, work)
    base = {r.rate: r.stats["req_s"] for r in rows if r.name == "base"}
    print("\nsummary (xbase: requests/s over base at the same rate)")
    print(HEADER)
    for r in rows:
        ratio = r.stats["req_s"] / base[r.rate] if base.get(r.rate) else None
        print(_line(LABELS[r.name], r.rate, r.stats, ratio))
    print(f"done in {time.monotonic() - t0:.0f} s; load {os.getloadavg()[0]:.1f}; work folder {work}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
