"""The engine flags ``paradapt serve``, ``twin`` and ``plan`` share, so a configuration the twin
recommends is typed into ``paradapt serve`` unchanged.

Their defaults are :class:`~paradapt.serve.core.EngineConfig`'s own: an unset flag leaves the
field at its default, and the help text quotes that default, so there is one source for each.
"""

from __future__ import annotations

import argparse
import math

from ..errors import ConfigError
from ..serve.core import EngineConfig
from .common import positive_int

DEFAULTS = EngineConfig()


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """``--token-budget``, ``--max-running``, ``--kv-tokens``, ``--device-memory-mb``,
    ``--starvation-after``, ``--prefetch`` (read by :func:`knobs_from_args`)."""
    d = DEFAULTS
    p.add_argument(
        "--token-budget", type=positive_int, metavar="N", help=f"tokens per step (default: {d.token_budget})"
    )
    p.add_argument(
        "--max-running", type=positive_int, metavar="N", help=f"requests per step (default: {d.max_running})"
    )
    p.add_argument(
        "--kv-tokens",
        type=positive_int,
        metavar="N",
        help=f"KV capacity in tokens (default: {d.num_blocks * d.page_size})",
    )
    p.add_argument(
        "--device-memory-mb",
        type=float,
        metavar="MB",
        help="memory for KV pages plus adapter slots (slots cost KV)",
    )
    p.add_argument(
        "--starvation-after",
        type=float,
        metavar="S",
        help=f"starvation guard, seconds (default: {d.starvation_after:g})",
    )
    p.add_argument(
        "--prefetch", type=int, metavar="N", help=f"queued adapters read ahead (default: {d.prefetch})"
    )


def knobs_from_args(args: argparse.Namespace) -> dict:
    """EngineConfig knobs from the flags of :func:`add_engine_flags` (unset flags: the defaults;
    ``max_running`` never above the token budget)."""
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
        knobs["num_blocks"] = math.ceil(args.kv_tokens / DEFAULTS.page_size)
    if args.device_memory_mb is not None:
        if args.device_memory_mb <= 0:
            raise ConfigError("device_memory_mb", f"must be positive, got {args.device_memory_mb}")
        knobs["device_memory"] = int(args.device_memory_mb * 2**20)
    if args.starvation_after is not None:
        knobs["starvation_after"] = args.starvation_after
    if args.prefetch is not None:
        knobs["prefetch"] = args.prefetch
    budget = knobs.get("token_budget", DEFAULTS.token_budget)
    knobs.setdefault("max_running", min(DEFAULTS.max_running, budget))
    return knobs


def engine_flag_args(args: argparse.Namespace) -> list[str]:
    """The flags of :func:`add_engine_flags` that were given, as arguments for ``paradapt serve``
    (a command that starts the server runs it with the knobs its twin is priced with)."""
    out: list[str] = []
    for name in (
        "token_budget",
        "max_running",
        "kv_tokens",
        "device_memory_mb",
        "starvation_after",
        "prefetch",
    ):
        value = getattr(args, name, None)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out
