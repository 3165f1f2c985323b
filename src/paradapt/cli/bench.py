"""``paradapt bench TRACE|SPEC --url URL``: load an OpenAI-compatible server and report what it served.

The client and its metrics live in :mod:`paradapt.bench` (the twin's definitions: the JSON has
the same keys as ``paradapt twin --json``); this module parses the flags, reads the workload
(checked before anything is sent), prints the table and saves ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..errors import ConfigError
from .common import positive_int
from .twin import add_slo_flags, add_workload_flags, describe_workload, workload_from_args


def add_parser(sub) -> None:
    """Register ``paradapt bench`` on the ``paradapt`` subparsers."""
    p = sub.add_parser(
        "bench",
        help="replay a workload or request trace against an OpenAI-compatible server (load client)",
        description="Send WORKLOAD (a YAML spec or a JSONL request trace, docs/twin.md) to URL as "
        "streaming /v1/completions with token-id prompts, max_tokens = output_len and ignore_eos: "
        "open loop (each request at its arrival time) or closed loop (--concurrency N). Prints "
        "request and output throughput, TTFT/TPOT/ITL p50/p90/p99, goodput under the SLOs, "
        "per-adapter served fractions and starvation, and requests refused or failed by status.",
    )
    p.add_argument("workload", metavar="TRACE.jsonl|WORKLOAD.yaml")
    p.add_argument("--url", required=True, help="the server's base URL (http://127.0.0.1:8000)")
    p.add_argument("--concurrency", type=positive_int, metavar="N", help="closed loop: N requests in flight")
    p.add_argument(
        "--base-name", metavar="NAME", help="the base model's served name (default: the first of /v1/models)"
    )
    p.add_argument(
        "--vocab-size",
        type=positive_int,
        default=256,
        metavar="V",
        help="random prompt token ids are drawn below V when the trace has no prompts (default: 256)",
    )
    p.add_argument("--api-key", metavar="KEY", help="sent as a Bearer token")
    p.add_argument(
        "--drain",
        type=float,
        metavar="S",
        help="open loop: cut requests still running S seconds after the window (default: wait for all)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_slo_flags(p)
    add_workload_flags(p)
    p.add_argument(
        "--json", metavar="FILE", help="also save the metrics as JSON (paradapt twin --json's keys)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Read the workload, load the server, print (and optionally save) the metrics."""
    from ..bench import BenchConfig, bench, table

    if args.drain is not None and not (math.isfinite(args.drain) and args.drain >= 0):
        raise ConfigError("drain", f"must be a number of seconds >= 0, got {args.drain}")
    if args.concurrency and args.window is None:
        args.window = 1.0  # closed loop: the window is the run's length, so a trace may have all t = 0
    workload = workload_from_args(args)
    config = BenchConfig(
        url=args.url,
        concurrency=args.concurrency,
        base_name=args.base_name,
        vocab_size=args.vocab_size,
        seed=args.seed,
        api_key=args.api_key,
        drain=args.drain,
        slo_ttft=args.slo_ttft,
        slo_tpot=args.slo_tpot,
        progress=not args.no_progress,
    )
    print(f"bench: {describe_workload(args.workload, workload)} -> {args.url}", flush=True)
    result = bench(workload, config, source=args.workload)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"saved {args.json}")
    return 0
