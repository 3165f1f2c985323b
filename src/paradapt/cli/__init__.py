"""The ``paradapt`` command line: one module per command, over the library.

``paradapt demo``: several adapters of different kinds on one frozen model, one mixed batch of
real sentences (each row its own adapter or the base), checked row by row against single-row
runs, plus the zero-init no-op check (:mod:`.demo`).
``paradapt info``: the version and the adapter kinds (:mod:`.info`).
``paradapt train CONFIG.yaml [--resume [PATH]] [--key value ...]``: train adapters
(docs/training.md); Ctrl-C saves a checkpoint and exits with status 130 (:mod:`.train`).
``paradapt serve [--model PATH] [--adapter-root DIR] [--port P] ...``: the OpenAI-compatible
server (docs/serving.md) over every adapter folder under DIR; SIGTERM drains and exits 0 (:mod:`.serve`).
``paradapt showcase [--train] [--limit N] ...``: serve the SST-2 and AG News adapters, send a mixed
stream over their test sets, print accuracy and throughput vs the base model (exit 1: accuracy
under its floor) (:mod:`.showcase`).
``paradapt profile`` / ``paradapt twin``: measure the engine's cost model, simulate a workload
(:mod:`.twin`); ``paradapt plan``: recommend the adapter knobs of a workload (:mod:`.plan`);
``paradapt workload SPEC.yaml --out TRACE.jsonl``: a synthetic workload as a request trace (:mod:`.workload`);
``paradapt bench TRACE|SPEC --url URL``: load a server with it and report (:mod:`.bench`).

Subcommands register themselves in :func:`build_parser`; the engine flags that serve, twin and
plan share come from :mod:`.engine_flags`. Library errors (``pa.ParadaptError``) print as one
line and exit with status 2; failed demo checks exit with status 1.

This package is a leaf: the library never imports it. Only :func:`main` sets environment
variables (offline Hugging Face, no tokenizer threads), for the command's own process.
"""

from __future__ import annotations

import argparse
import os
import sys

import paradapt as pa

from ..errors import one_line
from . import bench, demo, info, plan, serve, showcase, train, twin, workload

#: Set (unless already set) by :func:`main` before a command runs: a command never reaches the
#: network (models load with ``local_files_only`` anyway) and tokenizers start no thread pool.
COMMAND_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def build_parser() -> argparse.ArgumentParser:
    """``paradapt``'s parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="paradapt", description="Parallel adapters on frozen Hugging Face transformers."
    )
    parser.add_argument("--version", action="version", version=f"paradapt {pa.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_parser(sub)
    info.add_parser(sub)
    train.add_parser(sub)
    serve.add_parser(sub)
    showcase.add_parser(sub)
    twin.add_parsers(sub)  # profile, twin
    twin.add_profile_ray_parser(sub)  # profile-ray
    plan.add_parser(sub)
    workload.add_parser(sub)
    bench.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``paradapt`` command; its exit status (2 for a library error, printed as one line)."""
    for name, value in COMMAND_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:
        if args.command != "train":
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = rest
    try:
        return args.func(args)
    except pa.ParadaptError as e:
        print(f"paradapt: error: {one_line(e)}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
