"""Where a decode step's attention time goes, and what the CPU attention paths save (issue 17).

The real decoder ``Engine`` in process (no HTTP), ``N`` requests running, every step a pure
decode step (one token per request). The same engine alternates, every ``--steps`` steps, between
three ways its packed forward runs attention, interleaved and repeated (``--rounds``):

* ``plain``: transformers' SDPA function as it is: with a mask (a packed step always has one) it
  repeats the KV heads per query head, and every request's query is scored against the whole
  packed row of every request's keys (block-diagonal mask);
* ``gqa``: ``serve.hf_paged.sdpa_gqa``: the same, reading grouped KV heads in place
  (``enable_gqa``; bit-identical);
* ``lean``: ``serve.hf_paged.lean_decode`` with ``gather_attention`` (the engine's
  ``--decode-attention gather``): each request's keys copied into its own padded row, one
  batched SDPA with grouped heads;
* ``compiled``: ``lean_decode`` with ``paged_attention`` (``--decode-attention compiled``): the
  same arithmetic compiled by inductor to read the keys in their pages, no copy;
* ``kernel``: ``lean_decode`` with ``kernel_attention`` (the engine's default where it builds):
  the C++ kernel of ``serve/csrc/paged_decode.cpp``, each key and value row read once;
* ``kernel-generic``: the same kernel without its vectorised float32 path (keys eight at a time,
  ``exp`` eight at a time): its generic loop, as the kernel was before 2026-12-07 12:50 UTC.

Reported: the median step time per mode and its ratio to ``plain``; the context grows by one token
per step, so the modes' rounds are interleaved. Models: the random Llama of
``benchmarks/serve_load.py`` (hidden 512, 8 layers, 8 heads, no GQA: only ``lean``, ``compiled`` and ``kernel`` can help) and
SmolLM2-135M-Instruct (9 query / 3 KV heads).

    python benchmarks/decode_attention.py                           # both models
    python benchmarks/decode_attention.py --models random --requests 32 --prompt 512
    python benchmarks/decode_attention.py --models random --modes lean,kernel   # a subset; the first the reference
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

import paradapt.serve.runner as runner_mod
from paradapt.serve import decode_kernel, hf_paged, paged_attention
from paradapt.serve.engine import Engine, EngineConfig
from paradapt.serve.sampling import SamplingParams


def _generic(q, k_cache, v_cache, where, valid, scale):
    """The C++ kernel's generic loop (no vectorised float32 path)."""
    return decode_kernel.load().paged_decode_generic(q, k_cache, v_cache, where, valid, float(scale))


MODES = {  # each replaces the Runner's lean_decode(device, attend); the engine's own attend is ignored
    "plain": lambda device, attend=None: contextlib.nullcontext(),
    "gqa": lambda device, attend=None: hf_paged.sdpa_gqa(device),
    "lean": lambda device, attend=None: hf_paged.lean_decode(device, paged_attention.gather_attention),
    "compiled": lambda device, attend=None: hf_paged.lean_decode(device, paged_attention.paged_attention),
    "kernel": lambda device, attend=None: hf_paged.lean_decode(device, paged_attention.kernel_attention),
    "kernel-generic": lambda device, attend=None: hf_paged.lean_decode(device, _generic),
}


def load(name: str):
    if name == "random":
        from paradapt.twin.profile import build_model

        return build_model()
    from paradapt.loading import load_model

    return load_model(name)[1]


def run(name: str, args) -> dict[str, float]:
    """Median decode-step milliseconds per mode on model ``name``."""
    model = load(name)
    vocab = model.config.vocab_size
    modes = {m: MODES[m] for m in args.modes.split(",")}
    tokens = args.requests * (args.prompt + args.steps * len(modes) * (args.rounds + 1) + 8)
    config = EngineConfig(
        max_running=args.requests, token_budget=max(512, args.prompt), num_blocks=tokens // 16 + args.requests
    )
    engine = Engine(model, None, config)
    g = torch.Generator().manual_seed(0)
    new = args.steps * len(modes) * (args.rounds + 1) + 4
    for _ in range(args.requests):
        prompt = torch.randint(3, vocab, (args.prompt,), generator=g).tolist()
        engine.add_request(prompt, None, SamplingParams(max_new_tokens=new, ignore_eos=True))
    while any(r.prefilled < r.prompt_len for r in engine.scheduler.running) or engine.num_waiting:
        engine.step()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for rnd in range(args.rounds + 1):  # round 0 warms every mode up
        for mode, ctx in modes.items():
            runner_mod.lean_decode = ctx
            t0 = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            if rnd:
                times[mode].append((time.perf_counter() - t0) / args.steps * 1e3)
    runner_mod.lean_decode = hf_paged.lean_decode
    return {m: statistics.median(v) for m, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="random,smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per request (the context)")
    ap.add_argument("--steps", type=int, default=4, help="decode steps per mode per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--modes", default=",".join(MODES), help="the modes to compare (the first is the reference)"
    )
    args = ap.parse_args(argv)
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        ap.error(f"unknown modes {sorted(unknown)}; known: {list(MODES)}")
    torch.set_num_threads(args.threads)
    from paradapt.serve.malloc import keep_freed_memory

    keep_freed_memory()  # the heap as `paradapt serve` runs it (serve/malloc.py)
    print(
        f"decode_attention: {args.requests} requests, prompts of {args.prompt} tokens, {args.steps} steps x "
        f"{args.rounds} rounds per mode, interleaved; torch threads {args.threads}"
    )
    first = args.modes.split(",")[0]
    print(f"{'model':<24} {'mode':<20} {'step ms':>8} {'vs ' + first:>8}")
    for name in args.models.split(","):
        med = run(name, args)
        for mode, ms in med.items():
            print(f"{name:<24} {mode:<20} {ms:8.1f} {med[first] / ms:7.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
