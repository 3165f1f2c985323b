"""oneDNN's prepacked weights against ``F.linear`` (MKL's sgemm), per product and for the LM head (issue 17).

vLLM's CPU backend keeps its weights prepacked for oneDNN (``torch.ops.mkldnn._reorder_linear_weight``
once, ``_linear_pointwise`` per call); ``F.linear`` packs the weight again on every call. Two parts:

* ``matmul``: one 512 -> 1344 product at 1, 8, 32 and 200 rows, ``F.linear`` against prepacked;
* ``head``: the engine with ``lm_head_gemm="linear"`` against ``"packed"`` (``--head-modes``:
  any of them, ``int8`` and ``auto`` too) on a real model (``--model``, default
  SmolLM2-135M-Instruct, whose 49,152-word head is a large share of a step; ``--quantize`` its
  base), decode steps at 1, 8 and 32 requests, rounds interleaved, greedy tokens compared.

    python benchmarks/linear_backends.py --parts matmul --rounds 6
    python benchmarks/linear_backends.py --parts head --model smollm2-135m-instruct --rounds 8
    python benchmarks/linear_backends.py --parts head --head-modes packed,int8,auto --rounds 8

The model's other layers take prepacked weights through the engine's ``layer_gemm`` (``packed``,
or ``auto`` where a measurement at start finds them faster); ``benchmarks/layer_gemm.py``
compares those products and whole decode steps per mode.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from paradapt.serve.engine import Engine, EngineConfig
from paradapt.serve.sampling import SamplingParams


def part_matmul(rounds: int) -> None:
    w = torch.randn(1344, 512)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 32)
    print("matmul 512 -> 1344, median us per call (F.linear / prepacked, ratio)")
    for rows in (1, 8, 32, 200):
        x = torch.randn(rows, 512)
        calls = {
            "F.linear": lambda x=x: F.linear(x, w),
            "prepacked": lambda x=x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
        }
        err = float((calls["F.linear"]() - calls["prepacked"]()).abs().max())
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(rounds):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                for _ in range(100):
                    fn()
                times[name].append((time.perf_counter() - t0) / 100)
        a, b = (statistics.median(times[k]) for k in calls)
        print(f"  {rows:4d} rows: {1e6 * a:7.1f} / {1e6 * b:7.1f} us  {a / b:.2f}x  (max abs diff {err:.1e})")


def head_engine(model, root: Path, mode: str, requests: int) -> Engine:
    eng = Engine(model, root, EngineConfig(num_blocks=1024, token_budget=512, lm_head_gemm=mode))
    rng = random.Random(0)
    vocab = model.config.vocab_size
    for _ in range(requests):
        prompt = [rng.randrange(3, vocab) for _ in range(64)]
        eng.add_request(prompt, None, SamplingParams(max_new_tokens=400, ignore_eos=True))
    while any(len(h.tokens) == 0 for h in eng.handles.values()):  # past every prompt
        eng.step()
    return eng


def part_head(model_name: str, rounds: int, modes: list[str], quantize: str = "none") -> None:
    from paradapt.loading import load_model

    model = load_model(model_name, quantize=quantize)[1]
    root = Path(tempfile.mkdtemp(prefix="linear_backends-"))
    print(
        f"decode step on {model_name} ({quantize}): LM head {' vs '.join(modes)} (median of rounds of 4 steps)"
    )
    for requests in (1, 8, 32):
        engines = {mode: head_engine(model, root, mode, requests) for mode in modes}
        times: dict[str, list[float]] = {mode: [] for mode in engines}
        for r in range(rounds):
            for mode in list(engines)[:: 1 if r % 2 else -1]:
                t0 = time.perf_counter()
                for _ in range(4):
                    engines[mode].step()
                times[mode].append((time.perf_counter() - t0) / 4)
        first = [h.tokens for h in engines[modes[0]].handles.values()]
        same = all([h.tokens for h in e.handles.values()] == first for e in engines.values())
        base = statistics.median(times[modes[0]])
        cells = [
            f"{mode} ({engines[mode].lm_head_gemm}) {1e3 * statistics.median(times[mode]):.1f} ms "
            f"{base / statistics.median(times[mode]):.2f}x"
            for mode in modes
        ]
        print(f"  {requests:2d} requests: {'; '.join(cells)}; greedy tokens equal: {same}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parts", default="matmul", help="matmul, head")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the model of the head part")
    p.add_argument(
        "--head-modes", default="linear,packed", help="head part: lm_head_gemm modes, the first the baseline"
    )
    p.add_argument("--quantize", default="none", help="head part: the base's precision (none, int4, ...)")
    args = p.parse_args(argv)
    if not torch.backends.mkldnn.is_available():
        print("this torch has no oneDNN (mkldnn); nothing to compare")
        return 1
    torch.set_num_threads(args.threads)
    from paradapt.serve.malloc import keep_freed_memory

    keep_freed_memory()  # as paradapt serve runs
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds")
    parts = args.parts.split(",")
    if "matmul" in parts:
        part_matmul(args.rounds)
    if "head" in parts:
        part_head(args.model, args.rounds, args.head_modes.split(","), args.quantize)
    return 0


if __name__ == "__main__":
    sys.exit(main())
