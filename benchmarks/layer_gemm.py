"""The model's linear layers: the few-rows C++ kernel and oneDNN prepacked weights against ``F.linear`` (issue 17).

``paradapt.serve.layer_gemm`` (the engine's ``layer_gemm``) multiplies a step's rows by each
plain float32 ``nn.Linear`` with ``csrc/few_rows.cpp`` or with a weight prepacked for oneDNN,
each where a measurement at engine start finds it faster than MKL's sgemm. Two parts:

* ``products``: per weight shape of the model, ``F.linear`` against the kernel (1-64 rows) and
  against the packed weight (1-512 rows), timed over all of the model's linear layers in order
  (as a step meets them: the weights stream from memory; the sweeps ``auto`` decides with),
  median of 7 interleaved sweeps; ratios > 1 mean the other product is faster;
* ``steps``: one engine per ``--modes`` entry on the same model (default ``linear``, ``kernel``,
  ``packed``, ``auto``), with 1, 4, 8, 16 and 32 base-model requests decoding at once; rounds
  rotate the order; the median decode step of each, its ratio to the first mode's, and whether
  its greedy tokens equal the first mode's.

    python benchmarks/layer_gemm.py --model random --rounds 8
    python benchmarks/layer_gemm.py --model smollm2-135m-instruct --rounds 8

A third part, ``overhead``, puts a number on what is left at few rows: the same random Llama
(8 layers, 8 and 32 requests) at hidden 512 and at hidden 64, where the arithmetic is
negligible, so the hidden-64 step is mostly per-operation cost (module calls, dispatch, the
continuous-batching inputs), rounds alternating.

    python benchmarks/layer_gemm.py --parts overhead --rounds 8
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

from paradapt.serve import layer_gemm
from paradapt.serve.engine import Engine, EngineConfig
from paradapt.serve.sampling import SamplingParams
from paradapt.twin.profile import build_model

ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 512)


def load(name: str) -> torch.nn.Module:
    if name == "random":
        return build_model(layers=8, hidden=512, seed=0)  # serve_load.py's and vs_vllm.py's model
    from paradapt.loading import load_model

    return load_model(name)[1]


def part_products(model: torch.nn.Module, repeats: int = 7) -> None:
    """Per weight shape, F.linear's time over the model's layers in order / the kernel's and /
    the packed weight's (the sweeps auto measures with: the weights stream from memory as in a
    step), median of ``repeats`` interleaved sweeps."""
    ext = layer_gemm.load()
    found = layer_gemm.layers(model)
    packs = {id(m.weight): layer_gemm.pack(m.weight) for m in found}
    others = {
        "kernel": lambda x, w: ext.few_rows_linear(x, w, None),
        "packed": lambda x, w: layer_gemm.packed_linear(x, packs[id(w)], None),
    }
    shapes = sorted({tuple(m.weight.shape) for m in found})
    mb = sum(m.weight.numel() * 4 for m in found) / 1e6
    print(
        f"products over the model's {len(found)} linear layers ({mb:.0f} MB), F.linear / other (> 1: the other is faster)"
    )
    print("  product  out x in     " + " ".join(f"{r:>6d}" for r in ROWS))
    gen = torch.Generator().manual_seed(0)
    ratios = {(p, s): [] for p in others for s in shapes}
    with torch.no_grad():
        for rows in ROWS:
            xs = {k: torch.randn(rows, k, generator=gen) for k in {m.in_features for m in found}}
            timed = [p for p in others if p != "kernel" or rows <= layer_gemm.KERNEL_TIMED_ROWS]
            spent = {p: [] for p in ["linear", *timed]}
            for _ in range(repeats):
                spent["linear"].append(layer_gemm.sweep(found, xs, F.linear))
                for p in timed:
                    spent[p].append(layer_gemm.sweep(found, xs, others[p]))
            for p in others:
                for s in shapes:
                    ratio = (
                        statistics.median(t[s] for t in spent["linear"])
                        / statistics.median(t[s] for t in spent[p])
                        if p in spent
                        else float("nan")
                    )
                    ratios[(p, s)].append(ratio)
    for (p, s), r in ratios.items():
        print(f"  {p:<8} {s[0]:>4d} x {s[1]:<5d} " + " ".join(f"{v:6.2f}" for v in r))


def engine(model, root: Path, mode: str, requests: int, tokens: int) -> Engine:
    config = EngineConfig(num_blocks=1024, token_budget=512, max_running=32, layer_gemm=mode)
    eng = Engine(model, root, config)
    rng = random.Random(0)
    vocab = model.config.vocab_size
    for _ in range(requests):
        prompt = [rng.randrange(3, vocab) for _ in range(64)]
        eng.add_request(prompt, None, SamplingParams(max_new_tokens=tokens, ignore_eos=True))
    while any(len(h.tokens) == 0 for h in eng.handles.values()):  # past every prompt
        eng.step()
    return eng


def compare(engines: dict[str, Engine], rounds: int, steps: int) -> dict[str, tuple[float, bool]]:
    """Per engine, its median step time (rounds rotate the order) and whether its greedy tokens
    equal the first engine's."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(steps):
                engines[name].step()
            times[name].append((time.perf_counter() - t0) / steps)
    first = [h.tokens for h in engines[names[0]].handles.values()]
    return {
        name: (statistics.median(times[name]), [h.tokens for h in e.handles.values()] == first)
        for name, e in engines.items()
    }


def part_steps(model: torch.nn.Module, rounds: int, steps: int, modes: list[str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="layer_gemm-"))
    print(
        f"decode step, base model (median of {rounds} rounds of {steps} steps); x: {modes[0]}'s time / the mode's"
    )
    for requests in (1, 4, 8, 16, 32):
        engines = {mode: engine(model, root, mode, requests, rounds * steps + 8) for mode in modes}
        if requests == 1:
            for mode, e in engines.items():
                print(f"  {mode} uses: {e.layer_gemm}")
        got = compare(engines, rounds, steps)
        base = got[modes[0]][0]
        cells = ", ".join(
            f"{m} {1e3 * t:6.1f} ms {base / t:.2f}x{'' if same else ' (tokens differ)'}"
            for m, (t, same) in got.items()
        )
        print(f"  {requests:2d} requests: {cells}")


def part_overhead(rounds: int, steps: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="layer_gemm-"))
    models = {h: build_model(layers=8, hidden=h, seed=0) for h in (512, 64)}
    print(f"decode step, base model, hidden 512 vs 64 (8 layers; median of {rounds} rounds of {steps} steps)")
    for requests in (8, 32):
        engines = {h: engine(m, root, "auto", requests, rounds * steps + 8) for h, m in models.items()}
        got = compare(engines, rounds, steps)
        a, b = got[512][0], got[64][0]
        print(
            f"  {requests:2d} requests: hidden 512 {1e3 * a:6.1f} ms, hidden 64 {1e3 * b:6.1f} ms ({b / a:.0%})"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random", help="random (hidden 512, 8 layers) or a bundled model name")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="decode steps per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parts", default="products,steps")
    p.add_argument(
        "--modes",
        default="linear,kernel,packed,auto",
        help="the steps part's engines (layer_gemm), the first the reference",
    )
    args = p.parse_args(argv)
    why = layer_gemm.unsupported()
    if why:
        print(f"the kernel cannot run here: {why}")
        return 1
    torch.set_num_threads(args.threads)
    from paradapt.serve.malloc import keep_freed_memory

    keep_freed_memory()  # as paradapt serve runs
    model = load(args.model)
    print(f"torch {torch.__version__}, {args.threads} thread(s), model {args.model}")
    if "products" in args.parts:
        part_products(model)
    if "overhead" in args.parts:
        part_overhead(args.rounds, args.steps)
    if "steps" in args.parts:
        part_steps(model, args.rounds, args.steps, args.modes.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
