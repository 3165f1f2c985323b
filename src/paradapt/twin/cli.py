"""``paradapt profile`` and ``paradapt twin``: the command-line side of the digital twin.

:func:`add_parsers` registers both subcommands on ``paradapt``'s parser. Errors are
:class:`~paradapt.errors.ParadaptError` (one line, exit 2, printed by ``paradapt.cli.main``);
a cost file measured on another machine or model prints one ``paradapt: warning:`` line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

from ..errors import ConfigError


def _positive_int(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def add_parsers(sub) -> None:
    """Register ``profile``, ``twin`` and ``plan`` on the ``paradapt`` subparsers."""
    p = sub.add_parser(
        "profile",
        help="measure the serving engine's cost model on this machine (for paradapt twin)",
        description="Drive the real decoder Engine over a designed grid of step shapes and adapter "
        "mixes, fit step time and adapter load/evict times, print the coefficients and their "
        "held-out error, and save them as JSON with this machine's and model's fingerprint "
        "(docs/twin.md). With no --model: the random Llama-style decoder of "
        "benchmarks/serve_load.py (hidden 512, 8 layers).",
    )
    p.add_argument("--model", metavar="PATH", help="a local Hugging Face decoder folder")
    p.add_argument("--out", default="cost.json", metavar="FILE", help="where to save (default: cost.json)")
    p.add_argument("--kinds", type=_csv(str), default=["lora", "parallel", "series"], help="adapter kinds")
    p.add_argument("--ranks", type=_csv(int), default=[8, 16, 32], help="adapter ranks (default: 8,16,32)")
    p.add_argument("--scenarios", type=_positive_int, default=40, help="step-shape scenarios (default: 40)")
    p.add_argument("--token-budget", type=_positive_int, default=256, help="tokens per step (default: 256)")
    p.add_argument("--max-running", type=_positive_int, default=32, help="requests per step (default: 32)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--layers", type=_positive_int, default=8, help="default model's layers (default: 8)")
    p.add_argument("--hidden", type=_positive_int, default=512, help="default model's width (default: 512)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_profile)

    t = sub.add_parser(
        "twin",
        help="simulate the serving engine on a workload (digital twin)",
        description="Run WORKLOAD.yaml (a paradapt.serve.workload.WorkloadSpec: num_adapters, rate, "
        "duration, alpha, cv, input_len, output_len, ranks, kinds, seed) through the engine's own "
        "scheduler and adapter cache on a simulated clock priced by a cost model (docs/twin.md); "
        "print throughput, TTFT/TPOT, adapter loads, served fractions and starvation.",
    )
    t.add_argument("workload", metavar="WORKLOAD.yaml")
    t.add_argument(
        "--max-served", type=_positive_int, required=True, metavar="S", help="adapters in host memory"
    )
    t.add_argument(
        "--max-slots", type=_positive_int, required=True, metavar="K", help="adapters on the device"
    )
    t.add_argument(
        "--cost",
        metavar="FILE",
        help="cost model from paradapt profile (default: the one shipped, measured "
        "for the default model on the machine that built it)",
    )
    t.add_argument(
        "--model", metavar="PATH", help="check the cost model's fingerprint against this model folder"
    )
    add_engine_knob_args(t)
    t.add_argument("--drain", type=float, default=0.0, metavar="S", help="keep running S s after the window")
    t.add_argument("--json", metavar="FILE", help="also save the metrics as JSON")
    t.set_defaults(func=run_twin)

    from .plan import add_parser as add_plan_parser

    add_plan_parser(sub)  # paradapt plan (twin/plan.py)


def _print_warnings(caught) -> None:
    for w in caught:
        print(f"paradapt: warning: {' '.join(str(w.message).split())}", file=sys.stderr)


def run_profile(args) -> int:
    import torch

    from .profile import build_model, profile

    if args.threads:
        torch.set_num_threads(args.threads)
    from ..serve.malloc import keep_freed_memory

    keep_freed_memory()  # the engine runs as under `paradapt serve`, which sets the same heap thresholds
    if args.model:
        from ..cli import load_model

        _, model = load_model(Path(args.model))
        if not hasattr(model, "init_continuous_batching"):
            raise ConfigError("model", f"{args.model} is not a decoder the serving engine can run")
    else:
        model = build_model(args.layers, args.hidden, args.seed)
    cost = profile(
        model,
        kinds=args.kinds,
        ranks=args.ranks,
        scenarios=args.scenarios,
        token_budget=args.token_budget,
        max_running=min(args.max_running, args.token_budget),
        seed=args.seed,
    )
    print(cost.describe())
    print(f"saved {cost.save(args.out)}")
    return 0


def add_engine_knob_args(p) -> None:
    """The engine knobs (read by :func:`knobs_from_args`); ``serve``, ``twin`` and ``plan`` share them,
    so a configuration the twin recommends is typed into ``paradapt serve`` unchanged."""
    p.add_argument("--token-budget", type=_positive_int, metavar="N", help="tokens per step (default: 256)")
    p.add_argument("--max-running", type=_positive_int, metavar="N", help="requests per step (default: 32)")
    p.add_argument(
        "--kv-tokens", type=_positive_int, metavar="N", help="KV capacity in tokens (default: 4096)"
    )
    p.add_argument(
        "--device-memory-mb",
        type=float,
        metavar="MB",
        help="memory for KV pages plus adapter slots (slots cost KV)",
    )
    p.add_argument(
        "--starvation-after", type=float, metavar="S", help="starvation guard, seconds (default: 30)"
    )
    p.add_argument("--prefetch", type=int, metavar="N", help="queued adapters read ahead (default: 2)")


def knobs_from_args(args) -> dict:
    """EngineConfig knobs from the flags of :func:`add_engine_knob_args` (unset flags: the defaults)."""
    from ..serve.core import EngineConfig

    knobs: dict = {}
    if args.token_budget:
        knobs["token_budget"] = args.token_budget
    if args.max_running:
        knobs["max_running"] = args.max_running
    if args.kv_tokens and args.device_memory_mb is not None:
        raise ConfigError(
            "kv_tokens",
            "give --kv-tokens or --device-memory-mb, not both: with device memory the KV cache gets "
            "what the adapter slots leave",
        )
    if args.kv_tokens:
        knobs["num_blocks"] = math.ceil(args.kv_tokens / EngineConfig.page_size)
    if args.device_memory_mb is not None:
        if args.device_memory_mb <= 0:
            raise ConfigError("device_memory_mb", f"must be positive, got {args.device_memory_mb}")
        knobs["device_memory"] = int(args.device_memory_mb * 2**20)
    if args.starvation_after is not None:
        knobs["starvation_after"] = args.starvation_after
    if args.prefetch is not None:
        knobs["prefetch"] = args.prefetch
    budget = knobs.get("token_budget", 256)
    knobs.setdefault("max_running", min(32, budget))
    return knobs


def load_cost(path: str | None, model: str | None):
    """The cost model to use, warning (one line each) if it was measured elsewhere."""
    from .costmodel import DEFAULT_COST, CostModel, machine_fingerprint, model_fingerprint_of_folder

    if path is None:
        if not DEFAULT_COST.is_file():
            raise ConfigError(
                "cost", "no cost model given and none shipped: run paradapt profile, then --cost FILE"
            )
        path = str(DEFAULT_COST)
    expect = machine_fingerprint()
    expect.pop("torch_threads", None)  # the twin runs no torch: this process's threads say nothing
    if model is not None:
        expect["model_config"] = model_fingerprint_of_folder(model)["model_config"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cost = CostModel.load(path, expect=expect)
    _print_warnings(caught)
    return cost


def run_twin(args) -> int:
    from ..serve.workload import WorkloadSpec
    from .sim import simulate

    spec = WorkloadSpec.from_yaml(args.workload)
    if args.max_slots > args.max_served:
        raise ConfigError("max_slots", f"{args.max_slots} exceeds --max-served {args.max_served}")
    cost = load_cost(args.cost, args.model)
    result = simulate(
        spec,
        cost,
        max_served=args.max_served,
        max_slots=args.max_slots,
        drain=args.drain,
        **knobs_from_args(args),
    )
    print(
        f"twin: {args.workload}: {spec.num_adapters} adapters, {spec.rate:g} req/s for {spec.duration:g} s, "
        f"alpha {spec.alpha:g}; --max-served {args.max_served} --max-slots {args.max_slots}"
    )
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"saved {args.json}")
    return 0
