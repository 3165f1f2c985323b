"""``paradapt profile`` and ``paradapt twin``: the command-line side of the digital twin.

Errors are :class:`~paradapt.errors.ParadaptError` (one line, exit 2, printed by
``paradapt.cli.main``); a cost file measured on another machine or model prints one
``paradapt: warning:`` line.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from ..errors import ConfigError
from ..models import resolve_model
from .common import QUANTIZE_CHOICES, csv_of, positive_int, print_warnings
from .engine_flags import DEFAULTS, add_engine_flags, knobs_from_args


def add_parsers(sub) -> None:
    """Register ``profile`` and ``twin`` on the ``paradapt`` subparsers."""
    p = sub.add_parser(
        "profile",
        help="measure the serving engine's cost model on this machine (for paradapt twin)",
        description="Drive the real decoder Engine over a designed grid of step shapes and adapter "
        "mixes, fit step time and adapter load/evict times, print the coefficients and their "
        "held-out error, and save them as JSON with this machine's and model's fingerprint "
        "(docs/twin.md). With no --model: the random Llama-style decoder of "
        "benchmarks/serve_load.py (hidden 512, 8 layers).",
    )
    p.add_argument(
        "--model",
        metavar="NAME|PATH",
        help="a named decoder (smollm2-135m-instruct) or a local Hugging Face decoder folder",
    )
    p.add_argument("--out", default="cost.json", metavar="FILE", help="where to save (default: cost.json)")
    p.add_argument(
        "--kinds",
        type=csv_of(str),
        default=None,
        help="adapter kinds (default: lora,parallel,series; also prefix, mam, ia3, ssf)",
    )
    p.add_argument("--ranks", type=csv_of(int), default=None, help="adapter ranks (default: 8,16,32)")
    p.add_argument(
        "--adapter-root",
        metavar="DIR",
        help="profile the kinds and ranks of the adapter folders under DIR (what you will serve) "
        "instead of --kinds/--ranks",
    )
    p.add_argument("--scenarios", type=positive_int, default=40, help="step-shape scenarios (default: 40)")
    p.add_argument(
        "--token-budget",
        type=positive_int,
        default=DEFAULTS.token_budget,
        help=f"tokens per step (default: {DEFAULTS.token_budget})",
    )
    p.add_argument(
        "--max-running",
        type=positive_int,
        default=DEFAULTS.max_running,
        help=f"requests per step (default: {DEFAULTS.max_running})",
    )
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default="none",
        help="profile the base in this precision, as paradapt serve --quantize runs it (default: none)",
    )
    p.add_argument("--layers", type=positive_int, default=8, help="default model's layers (default: 8)")
    p.add_argument("--hidden", type=positive_int, default=512, help="default model's width (default: 512)")
    p.add_argument(
        "--server",
        action="store_true",
        help="then run the model behind the real HTTP app (in this process, on 127.0.0.1) and fit "
        "what the server adds per step, per streamed token and per request (docs/twin.md)",
    )
    p.add_argument(
        "--server-requests",
        type=positive_int,
        default=20,
        metavar="N",
        help="with --server: requests sent at a low rate, mostly alone (default: 20)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_profile)

    t = sub.add_parser(
        "twin",
        help="simulate the serving engine on a workload (digital twin)",
        description="Run WORKLOAD.yaml (a paradapt.serve.workload.WorkloadSpec: num_adapters, rate, "
        "duration, alpha, cv, input_len, output_len, ranks, kinds, seed) or a request trace "
        "(TRACE.jsonl: one request a line, e.g. paradapt serve --request-log) through the engine's own "
        "scheduler and adapter cache on a simulated clock priced by a cost model (docs/twin.md); "
        "print throughput, TTFT/TPOT, adapter loads, served fractions and starvation.",
    )
    t.add_argument("workload", metavar="WORKLOAD.yaml|TRACE.jsonl")
    add_workload_flags(t)
    t.add_argument(
        "--max-served", type=positive_int, required=True, metavar="S", help="adapters in host memory"
    )
    t.add_argument(
        "--max-slots", type=positive_int, required=True, metavar="K", help="adapters on the device"
    )
    t.add_argument(
        "--cost",
        metavar="FILE",
        help="cost model from paradapt profile (default: the one shipped, measured "
        "for the default model on the machine that built it)",
    )
    t.add_argument(
        "--model",
        metavar="NAME|PATH",
        help="check the cost model's fingerprint against this model (a name or a folder)",
    )
    add_engine_flags(t)
    t.add_argument(
        "--no-server",
        action="store_true",
        help="predict the in-process engine: ignore the cost model's HTTP server costs (paradapt profile --server)",
    )
    t.add_argument("--drain", type=float, default=0.0, metavar="S", help="keep running S s after the window")
    add_slo_flags(t)
    t.add_argument("--json", metavar="FILE", help="also save the metrics as JSON")
    t.set_defaults(func=run_twin)


def add_profile_ray_parser(sub) -> None:
    """Register ``paradapt profile-ray`` (the cluster twin's Ray Serve cost)."""
    r = sub.add_parser(
        "profile-ray",
        help="measure what Ray Serve adds to a replica (for paradapt plan --replicas and the cluster twin)",
        description="Start paradapt serve --replicas 1 (a local Ray) with --model, --adapter-root and the "
        "engine flags, replay WORKLOAD (a YAML spec or a trace that saturates one replica) through "
        "paradapt bench, read each process's CPU time, and add a ray section to the cost model of "
        "--cost (from paradapt profile --server): Ray's extra engine time per streamed token in a "
        "replica (fitted so the cluster twin's one-replica throughput equals the measured one), a "
        "busy replica's cores, the CPU per token of Ray's other processes, and this machine's cores "
        "(docs/cluster.md).",
    )
    r.add_argument("workload", metavar="WORKLOAD.yaml|TRACE.jsonl")
    add_workload_flags(r)
    r.add_argument(
        "--model", required=True, metavar="NAME|PATH", help="the decoder to serve (as paradapt serve)"
    )
    r.add_argument(
        "--cost",
        required=True,
        metavar="FILE",
        help="cost model with a server section (paradapt profile --server)",
    )
    r.add_argument("--out", metavar="FILE", help="where to save (default: over --cost)")
    r.add_argument(
        "--max-served", type=positive_int, required=True, metavar="S", help="adapters in host memory"
    )
    r.add_argument(
        "--max-slots", type=positive_int, required=True, metavar="K", help="adapters on the device"
    )
    add_engine_flags(r)
    r.add_argument(
        "--threads-per-replica", type=positive_int, default=1, metavar="T", help="torch threads (default: 1)"
    )
    r.add_argument(
        "--seed", type=int, default=0, help="seed of the random prompts and the router (default: 0)"
    )
    r.set_defaults(func=run_profile_ray)


def run_profile_ray(args: argparse.Namespace) -> int:
    """``paradapt profile-ray``: measure one replica behind Ray Serve, fit, print and save."""
    from ..bench import BenchConfig
    from ..cluster import make_router
    from ..cluster.profile import check_saturated, measure_replica
    from ..twin.cluster import simulate_cluster
    from ..twin.ray_cost import fit_ray_cost
    from .engine_flags import engine_flag_args

    if not args.adapter_root:
        raise ConfigError(
            "adapter_root", "profile-ray serves the workload's adapters: give --adapter-root DIR"
        )
    workload = workload_from_args(args, args.model)
    cost = cost_from_flags(args.cost, resolve_model(args.model))
    if cost.server is None:
        raise ConfigError("cost", f"{args.cost} has no server section: run paradapt profile --server first")
    knobs = knobs_from_args(args)
    serve_args = [
        "--model", args.model, "--adapter-root", args.adapter_root,
        "--threads-per-replica", str(args.threads_per_replica),
        "--max-served", str(args.max_served), "--max-slots", str(args.max_slots), *engine_flag_args(args),
        "--queue-bound", str(max(1, len(workload.requests))), "--no-access-log",
    ]  # fmt: skip
    vocab = model_vocab(args.model)
    config = BenchConfig(url="", vocab_size=vocab, seed=args.seed)
    print(
        f"profile-ray: {describe_workload(args.workload, workload)} -> paradapt serve --replicas 1",
        flush=True,
    )
    run, measured = measure_replica(serve_args, workload, config)
    check_saturated(run, workload)

    def twin(c) -> float:
        router = make_router("adapter", args.seed)
        return simulate_cluster(
            workload, c, router, replicas=1, max_served=args.max_served, max_slots=args.max_slots, **knobs
        ).result.throughput

    cost.ray = fit_ray_cost(cost, run, twin)
    print(f"one replica: {run.throughput:.1f} tokens/s, {measured.finished} of {measured.requests} requests")
    print(cost.ray.describe())
    print(f"saved {cost.save(args.out or args.cost)}")
    return 0


def model_vocab(model: str) -> int:
    """The vocabulary size in a model folder's config.json (random prompts are drawn below it)."""
    try:
        n = json.loads((resolve_model(model) / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        n = None
    return n if isinstance(n, int) and n > 3 else 256


def run_profile(args: argparse.Namespace) -> int:
    """``paradapt profile``: measure, print and save the cost model."""
    import torch

    from ..serve.malloc import keep_freed_memory
    from ..twin.profile import build_model, profile

    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # the engine runs as under `paradapt serve`, which sets the same heap thresholds
    tokenizer = None
    if args.model:
        from ..loading import load_model

        tokenizer, model = load_model(args.model, quantize=args.quantize)
        if not hasattr(model, "init_continuous_batching"):
            raise ConfigError("model", f"{args.model} is not a decoder the serving engine can run")
    else:
        model = build_model(args.layers, args.hidden, args.seed)
        if args.quantize != "none":
            from ..quantized import quantize

            quantize(model, args.quantize)
    kinds, ranks = profile_shapes(args)
    if args.server and tokenizer is None:
        tokenizer = stand_in_tokenizer()  # before the minutes of the in-process profile
    cost = profile(
        model,
        kinds=kinds,
        ranks=ranks,
        scenarios=args.scenarios,
        token_budget=args.token_budget,
        max_running=min(args.max_running, args.token_budget),
        seed=args.seed,
    )
    if args.server:
        cost.server = profile_http(model, tokenizer, cost, kinds, ranks, args)
    print(cost.describe())
    print(f"saved {cost.save(args.out)}")
    return 0


def profile_http(model, tokenizer, cost, kinds: list[str], ranks: list[int], args: argparse.Namespace):
    """``--server``: what ``paradapt serve`` adds, measured on the app it runs (same threads)."""
    from ..twin.server_cost import profile_server
    from .serve import serve_engine

    return profile_server(
        model,
        cost,
        serve_engine,
        tokenizer=tokenizer,
        kinds=kinds,
        ranks=ranks,
        requests=args.server_requests,
        token_budget=args.token_budget,
        max_running=min(args.max_running, args.token_budget),
        seed=args.seed,
    )


def stand_in_tokenizer():
    """The default random model's tokenizer for ``--server``: stories260K's 512 tokens from the
    shared assets, as ``benchmarks/serve_load.py`` serves that model (the server streams text)."""
    from ..loading import find_assets

    assets = find_assets()
    folder = None if assets is None else assets / "models" / "stories260k-hf"
    if folder is None or not (folder / "tokenizer.json").is_file():
        raise ConfigError(
            "server",
            "--server streams text, so it needs a tokenizer: give --model NAME|PATH, or the shared "
            "assets' models/stories260k-hf for the default random model (PARADAPT_ASSETS)",
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def profile_shapes(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """The kinds and ranks to profile: ``--adapter-root``'s folders', else the flags (or defaults)."""
    if args.adapter_root is None:
        return args.kinds or ["lora", "parallel", "series"], args.ranks or [8, 16, 32]
    from ..serve.trace import shapes_in

    if args.kinds or args.ranks:
        raise ConfigError("adapter_root", "give either --adapter-root or --kinds/--ranks, not both")
    root = Path(args.adapter_root).expanduser()
    if not root.is_dir():
        raise ConfigError("adapter_root", f"{args.adapter_root}: not a folder")
    shapes = shapes_in(root).values()
    if not shapes:
        raise ConfigError("adapter_root", f"{args.adapter_root}: no adapter folders")
    return sorted({k for k, _ in shapes}), sorted({r for _, r in shapes})


def cost_from_flags(path: str | None, model: str | None):
    """The cost model of ``--cost`` (None: the one shipped), each mismatch warning as one line."""
    from ..twin.costmodel import load_cost

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cost = load_cost(path, model)
    print_warnings(caught)
    return cost


def run_twin(args: argparse.Namespace) -> int:
    """``paradapt twin``: simulate the workload, print (and optionally save) the metrics."""
    from ..twin.sim import simulate

    workload = workload_from_args(args, args.model)
    if args.max_slots > args.max_served:
        raise ConfigError("max_slots", f"{args.max_slots} exceeds --max-served {args.max_served}")
    cost = cost_from_flags(args.cost, resolve_model(args.model) if args.model else None)
    result = simulate(
        workload,
        cost,
        max_served=args.max_served,
        max_slots=args.max_slots,
        drain=args.drain,
        slo_ttft=args.slo_ttft,
        slo_tpot=args.slo_tpot,
        server=not args.no_server,
        **knobs_from_args(args),
    )
    priced = "; HTTP server priced" if cost.server is not None and not args.no_server else ""
    print(
        f"twin: {describe_workload(args.workload, workload)}; --max-served {args.max_served} "
        f"--max-slots {args.max_slots}{priced}"
    )
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"saved {args.json}")
    return 0


def add_slo_flags(p: argparse.ArgumentParser) -> None:
    """``--slo-ttft``/``--slo-tpot``: the latency targets goodput counts against (twin and bench)."""
    p.add_argument(
        "--slo-ttft", type=float, metavar="S", help="goodput counts requests with TTFT <= S seconds"
    )
    p.add_argument(
        "--slo-tpot", type=float, metavar="S", help="goodput counts requests with TPOT <= S seconds"
    )


def add_workload_flags(p: argparse.ArgumentParser) -> None:
    """Flags that check or complete a workload given as a trace (twin, plan, bench)."""
    p.add_argument(
        "--window",
        type=float,
        metavar="S",
        help="a trace's arrival window in seconds (default: its header's, else its last arrival)",
    )
    p.add_argument(
        "--adapter-root",
        metavar="DIR",
        help="every adapter a request names must be a folder under DIR (checked before anything runs); "
        "a trace's adapters are priced by their folders' kinds and ranks",
    )


def workload_from_args(args: argparse.Namespace, model: str | None = None):
    """The workload of ``args.workload`` (a YAML spec or a trace), checked against ``--adapter-root``
    and, given a ``model`` (name or folder), its context length."""
    from ..serve.trace import load_workload, shapes_in

    if args.window is not None and not args.window > 0:
        raise ConfigError("window", f"must be positive, got {args.window}")
    adapters = None
    if args.adapter_root:
        root = Path(args.adapter_root).expanduser()
        if not root.is_dir():
            raise ConfigError("adapter_root", f"{args.adapter_root}: not a folder")
        adapters = shapes_in(root)  # the names a request may use, and each one's kind and rank
    context = model_context(model) if model else None
    return load_workload(args.workload, adapters=adapters, context=context, window=args.window)


def model_context(model: str) -> int | None:
    """The context length in a model folder's config.json (None when it says none)."""
    path = resolve_model(model) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    n = config.get("max_position_embeddings")
    return n if isinstance(n, int) and n > 0 else None


def describe_workload(source: str, workload) -> str:
    """One line naming a workload: its spec's parameters, or a trace's size."""
    spec = workload.spec
    if spec is not None:
        return f"{source}: {spec.num_adapters} adapters, {spec.rate:g} req/s for {spec.duration:g} s, alpha {spec.alpha:g}"
    n = len(workload.requests)
    return (
        f"{source}: trace of {n} requests, {len(workload.adapters)} adapters, "
        f"{n / workload.duration:.3g} req/s over {workload.duration:g} s"
    )
