"""The banks' strategies in a decode step with many adapters: the C++ ``kernel`` (csrc/bgmv.cpp)
against ``gather``, ``grouped`` and ``segments``, each pinned for whole decode steps, and the
measured choice (which now has the kernel among its candidates), side by side in one process.
``kernel`` runs as the engine runs it, one fused call per bank and site (``lora_add``: rows in
batch order, the scale between the products inside); ``kernel-2calls`` is the same kernel as two
calls on rows sorted by slot and scattered back, as it ran before the fused call.

32 requests decoding at once, each with its own LoRA (r 16, q/k/v/o, random weights) on the
random Llama of ``serve_load.py`` (hidden 512, 8 layers), one engine, rounds interleaved (the order rotated each round); the
median decode step of each, and of the base model (no adapter) for scale. A per-site product
(32 rows, one token each, 32 slots, 512 -> 16 -> 512) is timed the same way.

    python benchmarks/bank_kernel.py --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from adapter_weight_check import adapters, decode_ms

from paradapt import kernels, native
from paradapt.banks import Bank
from paradapt.serve.engine import Engine, EngineConfig
from paradapt.twin.profile import build_model

PINNED = ("kernel", "kernel-2calls", "gather", "grouped", "segments", None)  # None: the measured choice


@contextlib.contextmanager
def pinned(label: str | None):
    """Force the strategy ``label`` names; ``kernel-2calls``: the kernel without the fused call."""
    if label != "kernel-2calls":
        with kernels.force(label):
            yield
        return
    fused = Bank.add_fused
    Bank.add_fused = lambda self, *args: None
    try:
        with kernels.force("kernel"):
            yield
    finally:
        Bank.add_fused = fused


def per_site_us(strategy: str, n: int, reps: int = 200) -> float:
    """Median microseconds of one site's product for ``n`` one-token rows with distinct slots."""
    g = torch.Generator().manual_seed(0)
    wd, wu = torch.randn(n, 512, 16, generator=g), torch.randn(n, 16, 512, generator=g)
    x, slot = torch.randn(n, 1, 512, generator=g), torch.arange(n)
    counts, present = [1] * n, torch.arange(n)
    offs = torch.arange(1, n + 1, dtype=torch.int32)
    h, scale = torch.randn(n, 1, 512, generator=g), torch.full((n,), 2.0)
    ext = native.BGMV.load()
    fns = {
        "kernel": lambda: ext.lora_add(h, x, wd, wu, slot, scale),
        "kernel-2calls": lambda: h + kernels.kernel(x, wd, wu, slot, lambda a: a * 2.0),
        "gather": lambda: h + kernels.gather(x, wd, wu, slot, lambda a: a * 2.0),
        "grouped": lambda: h + kernels.grouped(x, wd, wu, present, offs, lambda a: a * 2.0),
        "segments": lambda: h + kernels.segments(x, wd, wu, list(range(n)), counts, lambda a: a * 2.0),
    }
    fn = fns[strategy]
    for _ in range(10):
        fn()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        runs.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=32, help="requests (and distinct adapters) per step")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    why = kernels.enable_native()
    if why is not None:
        print(f"the kernel did not build: {why}")
        return 1
    print(f"torch {torch.__version__}, threads 1, {args.requests} requests x {args.tokens} tokens")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapters(root, args.requests)
        config = dict(max_running=args.requests, max_slots=args.requests, max_served=2 * args.requests)
        engine = Engine(
            build_model(layers=8, hidden=512, seed=0),
            root,
            EngineConfig(**config, token_budget=512, num_blocks=args.requests * 12),
        )
        gen = torch.Generator().manual_seed(0)
        decode_ms(engine, args.requests, True, gen, args.tokens)  # warm-up: adapters banked, choices measured
        steps: dict[str, list[float]] = {str(k): [] for k in PINNED} | {"base": []}
        sites: dict[str, list[float]] = {k: [] for k in PINNED if k}
        for r in range(args.rounds):
            for k in PINNED[r % len(PINNED) :] + PINNED[: r % len(PINNED)]:  # each first in turn
                with pinned(k):
                    steps[str(k)].append(decode_ms(engine, args.requests, True, gen, args.tokens))
                if k:
                    sites[k].append(per_site_us(k, args.requests))
            steps["base"].append(decode_ms(engine, args.requests, False, gen, args.tokens))
        print("measured choices:", sorted(set(kernels.choices().values())))
        base = statistics.median(steps["base"])
        kern = statistics.median(steps["kernel"])
        for k, v in steps.items():
            med = statistics.median(v)
            label = "measured" if k == "None" else k
            extra = f"  x base {med / base:.3f}  vs kernel {med / kern:.3f}" if k != "base" else ""
            print(f"decode step {label:<9} {med:7.2f} ms{extra}  runs {' '.join(f'{x:.1f}' for x in v)}")
        for k, v in sites.items():
            print(f"one site    {k:<9} {statistics.median(v):7.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
