"""``paradapt plan WORKLOAD.yaml``: recommend ``--max-served``/``--max-slots`` for a workload;
with ``--replicas N|auto``, plan a cluster (replica count, knobs, placement) in the cluster twin.

The models and how they are trained live in :mod:`paradapt.twin.configurator`, the search they
learn from in :mod:`paradapt.twin.search`; this module loads or trains them as the flags say,
prints the rules that fired and the recommendation, and with ``--check`` compares it with the
searched optimum in the twin (docs/twin.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..serve.workload import Workload, WorkloadSpec
from ..twin.cluster_plan import MAX_RUNS as CLUSTER_MAX_RUNS
from ..twin.cluster_plan import REFINE_EVALS as CLUSTER_REFINE_EVALS
from ..twin.cluster_plan import plan_cluster
from ..twin.configurator import (
    REFINE_EVALS,
    TARGETS,
    Configurator,
    Recommendation,
    refine,
    shortfall,
    train,
)
from ..twin.features import num_adapters
from ..twin.search import TIE_TOL, config_grid, cost_key, search_in_twin, twin_trial, write_json_atomic
from .common import positive_float, positive_int
from .engine_flags import add_engine_flags, knobs_from_args
from .twin import add_workload_flags, cost_from_flags, describe_workload, workload_from_args

DEFAULT_MODEL = "runs/plan/plan.json"
DEFAULT_TRAIN = 300


def add_parser(sub: Any) -> None:
    """Register ``paradapt plan`` on an argparse subparsers object."""
    p = sub.add_parser(
        "plan",
        help="recommend --max-served/--max-slots for a workload (models trained in the twin)",
        description="Recommend (max_served, max_slots) for WORKLOAD.yaml with interpretable models "
        "(a depth-limited decision tree and a linear model) trained on configurations searched in "
        "the digital twin over many sampled workloads. Prints the tree rules that fired and the "
        "configuration; --check also runs the twin at it and at the searched optimum.",
    )
    p.add_argument(
        "workload",
        metavar="WORKLOAD.yaml|TRACE.jsonl",
        help="the workload (paradapt.serve.workload fields) or a request trace (docs/twin.md)",
    )
    add_workload_flags(p)
    p.add_argument(
        "--cost", metavar="COST.json", help="cost model from `paradapt profile` (default: the twin's)"
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="PLAN.json",
        help=f"fitted models (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--train",
        type=int,
        metavar="N",
        help=f"(re)train on N sampled workloads first and save to --model (default when the "
        f"model file is missing: {DEFAULT_TRAIN})",
    )
    p.add_argument("--predictor", choices=("tree", "linear"), default="tree", help="which model recommends")
    p.add_argument(
        "--refine",
        type=int,
        default=None,
        metavar="N",
        help=f"refine the prediction with up to N twin runs around it (default: {REFINE_EVALS}, "
        f"{CLUSTER_REFINE_EVALS} with --replicas; 0: the model's prediction as is)",
    )
    p.add_argument(
        "--check", action="store_true", help="run the twin at the recommendation and search the optimum"
    )
    p.add_argument("--workers", type=int, default=2, metavar="N", help="search processes (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled training workloads (default: 0)")
    p.add_argument("--max-depth", type=int, default=4, metavar="D", help="decision tree depth (default: 4)")
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="searched workloads cache (default: a cache/ folder next to --model)",
    )
    p.add_argument("--show-model", action="store_true", help="print every tree rule and linear coefficient")
    p.add_argument(
        "--duration",
        type=float,
        default=15.0,
        metavar="S",
        help="arrival window of each training workload (default: 15)",
    )
    add_engine_flags(p)  # the engine knobs the twin runs with (a model is trained for one setting)
    add_cluster_flags(p)
    p.set_defaults(func=run)


def replicas_arg(s: str) -> int | str:
    """An argparse type for ``--replicas``: a positive integer, or ``auto``."""
    if s.strip().lower() == "auto":
        return "auto"
    try:
        return positive_int(s)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (or 'auto')") from None


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """``--replicas`` and what goes with it: the cluster planner (docs/cluster.md)."""
    g = p.add_argument_group(
        "cluster plan",
        "with --replicas, plan a cluster of paradapt serve --replicas in the cluster twin instead: "
        "replica count, each replica's --max-served/--max-slots, and which adapters each replica "
        "holds (no fitted model needed; --model, --train, --check and friends do not apply)",
    )
    g.add_argument(
        "--replicas",
        type=replicas_arg,
        metavar="N|auto",
        help="plan for N replicas, or search the fewest that meet --target-throughput (auto)",
    )
    g.add_argument(
        "--target-throughput",
        type=positive_float,
        metavar="TOK_S",
        help="the offered load to plan for, tokens/s (prompt + output): the workload's traffic is "
        "scaled to it; met when >= 90%% of it is served and no adapter starves",
    )
    g.add_argument(
        "--max-replicas",
        type=positive_int,
        default=64,
        metavar="M",
        help="--replicas auto searches 1..M (default: 64)",
    )
    g.add_argument(
        "--max-runs",
        type=positive_int,
        default=CLUSTER_MAX_RUNS,
        metavar="N",
        help=f"cluster twin runs the plan may spend (default: {CLUSTER_MAX_RUNS}; --refine of them "
        f"refine the knobs, default {CLUSTER_REFINE_EVALS} with --replicas)",
    )
    g.add_argument(
        "--one-machine",
        action="store_true",
        help="the replicas share this machine's cores with Ray's own processes (paradapt serve "
        "--replicas N on one host); needs the cost file's ray section (paradapt profile-ray). "
        "Default: a replica per machine",
    )
    g.add_argument("--json", metavar="FILE", help="also save the cluster plan as JSON")


def run(args: argparse.Namespace) -> int:
    """``paradapt plan``: load or train the models, recommend, optionally check in the twin
    (with ``--replicas``: plan a cluster instead, :func:`run_cluster`)."""
    if args.refine is not None and args.refine < 0:
        raise ConfigError("refine", f"must be 0 or more, got {args.refine}")
    if args.replicas is not None:
        return run_cluster(args)
    for flag in ("target_throughput", "json", "one_machine"):
        if getattr(args, flag) not in (None, False):
            raise ConfigError(flag, f"--{flag.replace('_', '-')} plans a cluster: give --replicas N|auto too")
    if args.refine is None:
        args.refine = REFINE_EVALS
    workload = workload_from_args(args)  # a bad file is a ConfigError naming the field (and line)
    spec = workload.spec if workload.spec is not None else workload
    if args.train is not None and args.train < 2:
        raise ConfigError("train", f"need at least 2 workloads to train on, got {args.train}")
    for name in ("workers", "max_depth"):
        if getattr(args, name) < 1:
            raise ConfigError(name, f"must be at least 1, got {getattr(args, name)}")
    if not args.duration > 0:
        raise ConfigError("duration", f"must be positive, got {args.duration}")
    cost = cost_from_flags(args.cost, None)
    cost_source = args.cost or "the shipped cost model"
    knobs = knobs_from_args(args)
    model_path = Path(args.model)
    if args.train is not None or not model_path.is_file():
        n = args.train if args.train is not None else DEFAULT_TRAIN
        cache = Path(args.cache_dir) if args.cache_dir else model_path.parent / "cache"
        print(f"training on {n} workloads searched in the twin ({args.workers} processes, cache {cache}) ...")

        def progress(done: int, total: int) -> None:
            if done == total or done % max(1, total // 10) == 0:
                print(f"  searched {done}/{total}", file=sys.stderr, flush=True)

        model, _, _ = train(
            cost,
            n,
            seed=args.seed,
            workers=args.workers,
            cache_dir=cache,
            max_depth=args.max_depth,
            progress=progress,
        )
        model.save(model_path)
        print(f"saved {model_path}")
        print(model.describe())
    else:
        model = Configurator.load(model_path)
        check_cost(model, cost, knobs, str(model_path), cost_source)
        if args.show_model:
            print(model.describe())
    _print_heldout(model)
    rec = model.recommend(spec, args.predictor)
    other = model.recommend(spec, "linear" if args.predictor == "tree" else "tree")
    print(f"\nworkload {describe_workload(args.workload, workload)}")
    tree_rec = rec if rec.predictor == "tree" else other
    print("rules that fired (decision tree):")
    for target in TARGETS:
        conds = " and ".join(tree_rec.rules[target]) or "(root)"
        print(
            f"  {target}: {conds}\n    -> log2 {tree_rec.raw[target]:.2f} ({2 ** tree_rec.raw[target]:.1f})"
        )
    print(
        f"predicted ({rec.predictor}, margin {model.margin:+.2f} log2): "
        f"--max-served {rec.max_served} --max-slots {rec.max_slots}"
        f"   [{other.predictor}: --max-served {other.max_served} --max-slots {other.max_slots}]"
    )
    if args.refine > 0:
        rec = _refined(spec, cost, rec, knobs, args.refine)
    print(f"recommended: --max-served {rec.max_served} --max-slots {rec.max_slots}")
    if args.check:
        _print_check(spec, cost, rec, knobs)
    return 0


def run_cluster(args: argparse.Namespace) -> int:
    """``paradapt plan --replicas N|auto``: the cluster planner (:mod:`paradapt.twin.cluster_plan`)."""
    auto = args.replicas == "auto"
    if auto and args.target_throughput is None:
        raise ConfigError(
            "target_throughput",
            "--replicas auto searches the replica count for a target: give --target-throughput TOK_S",
        )
    for flag in ("train", "check"):
        if getattr(args, flag):
            raise ConfigError(
                flag, f"--{flag} is for the single-engine plan; it does not apply with --replicas"
            )
    workload = workload_from_args(args)
    cost = cost_from_flags(args.cost, None)
    refine_evals = CLUSTER_REFINE_EVALS if args.refine is None else args.refine
    plan = plan_cluster(
        workload,
        cost,
        replicas=None if auto else args.replicas,
        target=args.target_throughput,
        max_replicas=args.max_replicas,
        max_runs=args.max_runs,
        refine_evals=refine_evals,
        one_machine=args.one_machine,
        **knobs_from_args(args),
    )
    print(f"workload {describe_workload(args.workload, workload)}")
    print(plan.summary())
    placement = f" --placement {args.json}" if args.json else ""  # the real cluster starts from it
    print(
        f"recommended: paradapt serve --replicas {plan.replicas} --max-served {plan.max_served} "
        f"--max-slots {plan.max_slots}{placement}"
    )
    if not plan.met:
        more = f" up to {plan.max_replicas} replicas" if auto else f" with {plan.replicas} replicas"
        print(f"the target is not met{more}: raise --max-replicas, or plan for less load")
    if args.json:
        write_json_atomic(Path(args.json), plan.to_dict())
        print(f"saved {args.json}")
    return 0


def _refined(
    spec: WorkloadSpec | Workload, cost: Any, rec: Recommendation, knobs: Mapping[str, Any], evals: int
) -> Recommendation:
    """The model's prediction refined by a local search in the twin (configurator.refine)."""
    best, trials = refine(
        (rec.max_served, rec.max_slots),
        config_grid(num_adapters(spec)),
        lambda served, slots: twin_trial(spec, cost, served, slots, knobs=knobs),
        evals,
    )
    start = trials[0]
    gain = best.throughput / start.throughput - 1 if start.throughput > 0 else 0.0
    print(
        f"refined in the twin ({len(trials)} runs around the prediction): ({best.max_served}, {best.max_slots}) "
        f"{best.throughput:,.1f} tokens/s vs {start.throughput:,.1f} at the prediction ({100 * gain:+.1f}%)"
    )
    return Recommendation(best.max_served, best.max_slots, f"{rec.predictor}+twin", rec.raw, rec.rules)


def _print_heldout(model: Configurator) -> None:
    for predictor in ("tree", "linear"):
        for suffix, what in (("", ""), ("_refined", ", refined in the twin")):
            h = model.meta.get(f"heldout_{predictor}{suffix}")
            if h:
                print(
                    f"{predictor}{what}: held-out throughput error mean {100 * h['mean_error']:.2f}%, max "
                    f"{100 * h['max_error']:.2f}% over {h['n']} workloads (trained on "
                    f"{model.meta.get('train_workloads')})"
                )


def _print_check(
    spec: WorkloadSpec | Workload, cost: Any, rec: Recommendation, knobs: Mapping[str, Any]
) -> None:
    result = search_in_twin(spec, cost, knobs=knobs)
    at = result.throughput_at(rec.max_served, rec.max_slots)
    best = result.best
    err = shortfall(at, best.throughput)
    print(f"twin check over {len(result.trials)} configurations:")
    print(f"  recommended ({rec.max_served}, {rec.max_slots}): {at:,.1f} tokens/s")
    print(f"  searched optimum ({best.max_served}, {best.max_slots}): {best.throughput:,.1f} tokens/s")
    print(f"  shortfall vs the searched optimum: {100 * err:.2f}%")
    if err > TIE_TOL:  # the models missed this workload: the search's answer is the one to use
        print(
            f"  use the searched optimum instead: --max-served {best.max_served} --max-slots {best.max_slots}"
        )


def check_cost(
    model: Configurator, cost: Any, knobs: Mapping[str, Any], model_source: str, cost_source: str
) -> None:
    """Warn (one line each) when ``model`` was trained on another cost model or other engine knobs."""
    trained = model.meta.get("cost")
    if trained is not None and trained != cost_key(cost):
        print(
            f"paradapt: warning: {model_source} was trained on cost model {trained}, not on {cost_source} "
            f"({cost_key(cost)}); retrain with --train N",
            file=sys.stderr,
        )
    trained_knobs = model.meta.get("knobs")
    if trained_knobs is not None and dict(trained_knobs) != dict(knobs):
        print(
            f"paradapt: warning: {model_source} was trained with engine knobs {trained_knobs}, not {dict(knobs)}; "
            "retrain with --train N",
            file=sys.stderr,
        )
