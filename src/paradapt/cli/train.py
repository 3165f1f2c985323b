"""``paradapt train CONFIG.yaml [--resume [PATH]] [--key value ...]``: train adapters
(docs/training.md); Ctrl-C saves a checkpoint and exits with status 130.

Unknown ``--key value`` pairs are config overrides (``paradapt.cli.main`` hands them over as
``args.overrides``).
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .common import one_line_warning


def add_parser(sub) -> None:
    """Register ``paradapt train`` on the ``paradapt`` subparsers."""
    train = sub.add_parser(
        "train",
        help="train adapters from a YAML config",
        description="Train one or many adapters on a frozen model as CONFIG.yaml describes "
        "(docs/training.md). Any config key can be overridden: --train.lr 3e-4 --adapters.0.config.r 16.",
        allow_abbrev=False,
    )
    train.add_argument("config", metavar="CONFIG.yaml", help="the training config")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint in output_dir, or from the given checkpoint folder",
    )
    train.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run's files in output_dir"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=run, overrides=[])


def run(args: argparse.Namespace) -> int:
    """``paradapt train``: 0 when done, 130 when interrupted (a checkpoint saved if a step finished)."""
    from ..train import config as train_config
    from ..train import run as train_run

    overrides = train_config.parse_overrides(args.overrides)
    try:
        with warnings.catch_warnings():  # restores showwarning afterwards
            warnings.showwarning = one_line_warning
            result = train_run.train(
                args.config,
                resume=args.resume,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                **overrides,
            )
    except train_run.Interrupted as e:
        if e.checkpoint is not None:
            print(
                f"paradapt: interrupted at step {e.step}; checkpoint saved to {e.checkpoint}\n"
                f"resume with: paradapt train {args.config} --resume",
                file=sys.stderr,
            )
        return 130
    except KeyboardInterrupt:  # before the first step: nothing to save
        print("paradapt: interrupted before training started", file=sys.stderr)
        return 130
    if result.checkpoint is None:  # not rank 0 of a distributed run
        return 0
    print(f"trained {result.steps} steps; output in {result.output_dir}")
    used_by = {e: m for m, experts in result.experts.items() for e in experts}
    for name, path in result.adapters.items():
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.get(name, {}).items())
        if name in used_by and not metrics:
            metrics = f"expert of mixture {used_by[name]}"
        print(f"  {name}: {metrics or 'no eval data'}; adapter {path}")
    if result.curves is not None:
        print(f"curves: {result.curves}")
    return 0
