"""What the banks' per-step weight check costs a decode step: ``EngineConfig(check_adapter_weights)``
on and off, side by side in one process.

The engine routes with ``fixed_weights`` (its adapters change only by being loaded again), so
the banks reuse each adapter's slots without checking its tensors' versions and storage at every
site and step. This measures what that saved: 32 requests decoding at once, each with its own
LoRA (r 16, q/k/v/o, random weights) on the random Llama of ``serve_load.py`` (hidden 512, 8
layers), two engines on two copies of the model (check on / off) and the base model, rounds
interleaved; the median decode step of each.

    python benchmarks/adapter_weight_check.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import paradapt as pa
from paradapt.serve.engine import Engine, EngineConfig
from paradapt.serve.sampling import SamplingParams
from paradapt.twin.profile import build_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def adapters(root: Path, n: int) -> None:
    """``n`` random LoRA folders (r 16, q/k/v/o) for the benchmark model."""
    for i in range(n):
        m = build_model(layers=8, hidden=512, seed=0)
        torch.manual_seed(i)
        pa.add_adapter(m, f"a{i}", pa.LoRAConfig(r=16, init="random", targets=TARGETS))
        pa.save_adapter(m, f"a{i}", root / f"a{i}")


def decode_ms(engine: Engine, n: int, adapters_on: bool, gen: torch.Generator, tokens: int) -> float:
    """Mean decode-step time (ms) of ``n`` requests started together, after their prompts."""
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    handles = [
        engine.add_request(
            torch.randint(3, 500, (64,), generator=gen).tolist(), f"a{i}" if adapters_on else None, params
        )
        for i in range(n)
    ]
    while not all(h.tokens for h in handles):
        engine.step()
    t0, steps = time.perf_counter(), 0
    while not all(h.done for h in handles):
        engine.step()
        steps += 1
    for h in handles:
        engine.pop(h.id)
    return 1000 * (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=32, help="requests (and distinct adapters) per step")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapters(root, args.requests)
        config = dict(max_running=args.requests, max_slots=args.requests, max_served=2 * args.requests)
        config |= dict(token_budget=512, num_blocks=args.requests * 12)
        engines = {
            k: Engine(
                build_model(layers=8, hidden=512, seed=0),
                root,
                EngineConfig(**config, check_adapter_weights=k == "checked"),
            )
            for k in ("fixed", "checked")
        }
        gen = torch.Generator().manual_seed(0)
        for e in engines.values():  # warm-up: adapters loaded and banked, kernels chosen
            decode_ms(e, args.requests, True, gen, args.tokens)
        got: dict[str, list[float]] = {"fixed": [], "checked": [], "base": []}
        for _ in range(args.rounds):
            for k, e in engines.items():
                got[k].append(decode_ms(e, args.requests, True, gen, args.tokens))
            got["base"].append(decode_ms(engines["fixed"], args.requests, False, gen, args.tokens))
        for k, v in got.items():
            print(
                f"{k:<8} decode step ms {statistics.median(v):7.2f}  runs {' '.join(f'{x:.1f}' for x in v)}"
            )
        ratio = statistics.median(got["checked"]) / statistics.median(got["fixed"])
        print(f"checked / fixed: {ratio:.3f} (the check's share of a checked step: {1 - 1 / ratio:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
