"""``paradapt info``: the version, the adapter kinds, what merges, the architecture families, the
named models ``--model`` takes."""

from __future__ import annotations

import argparse

import torch

import paradapt as pa

from ..config import CONFIG_CLASSES
from ..models import NAMED_MODELS


def add_parser(sub) -> None:
    """Register ``paradapt info`` on the ``paradapt`` subparsers."""
    info = sub.add_parser("info", help="version and adapter kinds")
    info.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``paradapt info``."""
    import transformers

    from ..archmap import FAMILIES

    print(f"paradapt {pa.__version__} (torch {torch.__version__}, transformers {transformers.__version__})")
    print("adapter kinds:")
    for kind, cls in CONFIG_CLASSES.items():
        first = (cls.__doc__ or "").strip().splitlines()[0].replace("``", "")
        print(f"  {kind:<9} {cls.__name__:<15} {first}")
    print("mergeable into the base weights: lora, ia3, ssf")
    print("compositions: Stack, Average, Parallel (and per-row mixing with pa.route)")
    print("learned mixtures: pa.Mixture over adapters, a trained router per site (pa.add_mixture)")
    print(
        "architecture families: " + ", ".join(f.name for f in FAMILIES) + " (others: name modules by pattern)"
    )
    print("named models (--model NAME; docs/serving.md):")
    for name, entry in NAMED_MODELS.items():
        print(f"  {name:<22} {entry.description}")
    return 0
