"""``paradapt workload SPEC.yaml --out trace.jsonl``: a synthetic workload written as a request trace.

The trace (:mod:`paradapt.serve.trace`) holds every request the spec generates, with a header
line giving the window and the adapters' kinds and ranks, so ``paradapt twin trace.jsonl``
gives the spec's own result, and ``paradapt bench trace.jsonl`` replays it against a server.
"""

from __future__ import annotations

import argparse

from ..serve.trace import write_trace
from ..serve.workload import WorkloadSpec


def add_parser(sub) -> None:
    """Register ``paradapt workload`` on the ``paradapt`` subparsers."""
    p = sub.add_parser(
        "workload",
        help="write a synthetic workload (YAML spec) as a request trace (JSONL)",
        description="Generate SPEC.yaml's requests (paradapt.serve.workload.WorkloadSpec fields) and "
        "write them as a JSONL trace, one request a line (docs/twin.md): replay it with paradapt "
        "twin, paradapt plan or paradapt bench.",
    )
    p.add_argument("spec", metavar="SPEC.yaml")
    p.add_argument("--out", required=True, metavar="TRACE.jsonl", help="where to write the trace")
    p.add_argument(
        "--base-name",
        metavar="NAME",
        help="write requests for the base model under this served name (the spec's requests all "
        "name adapters, so this only matters for hand-edited specs)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate and write the trace; print what was written."""
    spec = WorkloadSpec.from_yaml(args.spec)
    workload = spec.generate()
    path = write_trace(args.out, workload, base=args.base_name)
    print(
        f"wrote {path}: {len(workload.requests)} requests over {workload.duration:g} s, "
        f"{len(workload.adapters)} adapters"
    )
    return 0
