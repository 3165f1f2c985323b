"""In-process, deterministic throughput of the decoder Engine: 1,000 adapters vs the base model.

``serve_load.py`` measures the whole server over loopback, where the event loop, the load
generator and the machine's neighbours all move the numbers. This script isolates the engine:
the same random Llama (hidden 512, 8 layers) and the same 1,000-adapter folder mix
(LoRA / parallel / series x ranks 8/16/32, built by ``serve_load.build_adapters``), an
``Engine`` saturated with ``--requests`` requests submitted at once (prompt and output lengths
from the same ranges, ``ignore_eos``), run to completion. Configurations:

- ``base``: every request names the base model, on a model without any adapter;
- ``a1`` / ``a0.1``: each request's adapter drawn with popularity exponent alpha (1 = uniform);
- ``a1-checked`` (any config + ``-checked``): the same with ``EngineConfig(check_adapter_weights=True)``,
  every step checking each served adapter's tensors for in-place edits as the engine did
  before 2026-12-06 (the A/B of that change).

Rounds interleave the configurations (base, a1, a0.1, base, ...) so slow drifts of the machine
hit all of them alike; the report gives each configuration's median generated tokens per second
of wall time and per CPU-second of the process (with ``--threads 1`` the CPU time is the
engine's own work, much less disturbed by neighbours on a shared machine than wall time), and
the ratio of medians to the base. ``--profile a1`` instead runs one configuration once under
cProfile (top functions) and ``torch.profiler`` (top operators).

    python benchmarks/serve_profile.py --threads 1 --requests 96 --rounds 3
    python benchmarks/serve_profile.py --threads 1 --requests 96 --profile a1
    python benchmarks/serve_profile.py --threads 1 --requests 96 --configs base,a1,a1-checked
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve_load  # noqa: E402  (the same model and adapter folders as the load benchmark)

import paradapt as pa  # noqa: E402
from paradapt import kernels  # noqa: E402
from paradapt.loading import load_model  # noqa: E402
from paradapt.serve import Engine, EngineConfig, SamplingParams  # noqa: E402
from paradapt.serve.workload import WorkloadSpec  # noqa: E402
from paradapt.state import get_state  # noqa: E402

ALPHAS = {"base": None, "a1": 1.0, "a0.1": 0.1}
CHECKED = "-checked"  # suffix: the same configuration with the per-step adapter weight check


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/serve_profile"), help="model + adapters (kept)")
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--requests", type=int, default=96, help="requests submitted at once per run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats of every configuration")
    p.add_argument("--configs", default="base,a1,a0.1")
    p.add_argument("--input-len", type=int, nargs=2, default=[8, 128])
    p.add_argument("--output-len", type=int, nargs=2, default=[8, 64])
    p.add_argument("--max-slots", type=int, default=32)
    p.add_argument("--max-running", type=int, default=32)
    p.add_argument("--token-budget", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default=None, help="profile one configuration instead (base, a1, a0.1)")
    p.add_argument("--top", type=int, default=30, help="rows of each profile table")
    return p.parse_args(argv)


def _spec(args, alpha: float) -> WorkloadSpec:
    """The serve_load workload (its adapter mix); only its adapters and lengths are used here."""
    return WorkloadSpec(
        num_adapters=args.adapters,
        rate=1000.0,
        duration=1.0,
        alpha=alpha,
        input_len=tuple(args.input_len),
        output_len=tuple(args.output_len),
        ranks=[8, 16, 32],
        kinds=["lora", "parallel", "series"],
        seed=args.seed,
        max_requests=args.requests,
    )


def prepare(args) -> tuple[Path, Path]:
    """Model and adapter folders exactly as serve_load builds them (reused when present)."""
    model_dir, root = args.work / "model", args.work / "adapters"
    args.work.mkdir(parents=True, exist_ok=True)
    if not (model_dir / "config.json").is_file():
        serve_load.build_model(model_dir, 8, 512, args.seed)
    if not root.is_dir():
        root.mkdir()
        serve_load.build_adapters(model_dir, root, _spec(args, 1.0).generate(), args.seed)
    return model_dir, root


def requests(args, alpha: float | None, rnd: int) -> list[tuple[list[int], str | None, int]]:
    """(prompt, adapter, output length) per request; the same lengths for every configuration."""
    wl = _spec(args, alpha or 1.0).generate()
    rng = random.Random(args.seed * 1000 + rnd)
    out = []
    for r in wl.requests[: args.requests]:
        prompt = [rng.randrange(3, 512) for _ in range(r.prompt_len)]
        out.append((prompt, None if alpha is None else r.adapter, r.output_len))
    if len(out) < args.requests:
        raise SystemExit(f"serve_profile: the workload has only {len(out)} requests")
    return out


def clear_adapters(model) -> None:
    """Back to the bare model, so every run starts cold like a fresh server."""
    st = get_state(model)
    if st is not None:
        for name in list(st.adapters):
            pa.remove_adapter(model, name)


def run_once(args, model, root: Path, config: str, rnd: int) -> dict:
    """One saturated run: all requests at once, stepped to completion."""
    alpha = ALPHAS[config.removesuffix(CHECKED)]
    clear_adapters(model)
    cfg = EngineConfig(
        num_blocks=args.max_running * (args.input_len[1] + args.output_len[1] + 16) // 16,
        token_budget=args.token_budget,
        max_running=args.max_running,
        max_slots=args.max_slots,
        max_served=args.adapters,
        queue_bound=100_000,
        check_adapter_weights=config.endswith(CHECKED),
    )
    engine = Engine(model, root if alpha is not None else None, cfg)
    for prompt, adapter, n in requests(args, alpha, rnd):
        engine.add_request(prompt, adapter, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
    t0, c0 = time.perf_counter(), time.process_time()
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(len(h.tokens) for h in engine.handles.values())
    loads = engine.cache.stats.device_loads
    del engine
    return {
        "tok_s": tokens / wall,
        "cpu_tok_s": tokens / cpu,
        "wall": wall,
        "cpu": cpu,
        "steps": steps,
        "loads": loads,
    }


def measure(args, model, root: Path) -> None:
    configs = args.configs.split(",")
    got: dict[str, list[dict]] = {c: [] for c in configs}
    run_once(args, model, root, configs[-1], 0)  # warm-up: kernel choices, allocator, page tables
    for rnd in range(args.rounds):
        for c in configs:
            r = run_once(args, model, root, c, rnd)
            got[c].append(r)
            print(
                f"round {rnd} {c:<10} {r['tok_s']:8.1f} tok/s wall {r['cpu_tok_s']:8.1f} tok/CPU-s  "
                f"{r['wall']:6.2f} s  {r['steps']:4} steps  loads {r['loads']}  load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    for key, what in (("tok_s", "tok/s (wall)"), ("cpu_tok_s", "tok per CPU-s")):
        base = statistics.median(r[key] for r in got["base"]) if "base" in got else None
        print(f"\n{'config':<10} {'median ' + what:>20} {'runs':>28} {'xbase':>6}")
        for c, rs in got.items():
            med = statistics.median(r[key] for r in rs)
            runs = "/".join(f"{r[key]:.0f}" for r in rs)
            ratio = f"{med / base:.3f}" if base else ""
            print(f"{c:<10} {med:20.1f} {runs:>28} {ratio:>6}")
    print("kernel choices:", {k[2:5]: v for k, v in kernels.choices().items()})


def profile(args, model, root: Path) -> None:
    run_once(args, model, root, args.profile, 0)  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    r = run_once(args, model, root, args.profile, 1)
    prof.disable()
    print(f"{args.profile}: {r['tok_s']:.1f} tok/s, {r['steps']} steps, {r['wall']:.2f} s (under cProfile)")
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(args.top)
        print(s.getvalue())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
        r = run_once(args, model, root, args.profile, 2)
    print(f"{args.profile}: {r['tok_s']:.1f} tok/s under torch.profiler")
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    print("kernel choices:", {k[2:5]: v for k, v in kernels.choices().items()})
    print("kernel timings:", kernels.timings())


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_dir, root = prepare(args)
    _, model = load_model(model_dir)
    print(
        f"serve_profile: {args.adapters} adapters, {args.requests} requests at once, input {args.input_len}, "
        f"output {args.output_len}, max_slots {args.max_slots}, max_running {args.max_running}, "
        f"threads {args.threads}, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if args.profile:
        profile(args, model, root)
    else:
        measure(args, model, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
