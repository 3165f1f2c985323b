"""Prefix caching in the serving engine, on and off, side by side in one process.

The workload is the decoder showcase's: the three shipped chat adapters' first ``--rows``
held-out rows each on SmolLM2-135M-Instruct, through its chat template (~89 tokens a request, of
which the system prompt and the task's instruction, 41-50 tokens, are the same for every row of
a task), interleaved over the three adapters, ``--new`` output tokens each, all queued at once.
Each round builds a fresh engine (an empty cache) with ``prefix_caching`` on, then off, or the
other way round (alternating), and runs the whole queue; it prints each run's seconds, the
prompt tokens the cache served, and the median ratio of the rounds.

    python benchmarks/prefix_cache.py --rows 40 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def workload(rows: int):
    """(prompt ids, adapter) per request, interleaved over the shipped adapters."""
    from transformers import AutoTokenizer

    from paradapt.cli.showcase_chat import MODEL, interleave, load_tasks
    from paradapt.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(MODEL))
    reqs = interleave(load_tasks(rows))
    return [
        (tok.apply_chat_template(t.prompts[i], add_generation_prompt=True)["input_ids"], t.adapter)
        for t, i in reqs
    ]


def run_once(reqs, on: bool, new: int) -> tuple[float, dict]:
    """Seconds to serve every request with a fresh model and engine; its prefix-cache counts."""
    from paradapt.bundled import bundled_root
    from paradapt.cli.showcase_chat import MODEL
    from paradapt.loading import load_model
    from paradapt.serve.engine import Engine, EngineConfig
    from paradapt.serve.sampling import SamplingParams

    _, model = load_model(MODEL)  # the engine puts the adapters on it: one model per engine
    engine = Engine(model, bundled_root(MODEL), EngineConfig(max_running=32, prefix_caching=on))
    for ids, adapter in reqs[:3]:  # load the adapters outside the clock
        engine.add_request(ids, adapter, SamplingParams(max_new_tokens=1))
    engine.run()
    engine.prefix_stats.update(queries=0, hits=0)
    t0 = time.perf_counter()
    for ids, adapter in reqs:
        engine.add_request(ids, adapter, SamplingParams(max_new_tokens=new, ignore_eos=True))
    engine.run()
    return time.perf_counter() - t0, dict(engine.prefix_stats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=40, help="held-out rows per adapter (default 40)")
    ap.add_argument("--new", type=int, default=2, help="output tokens per request (default 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reqs = workload(args.rows)
    mean_len = sum(len(ids) for ids, _ in reqs) / len(reqs)
    print(
        f"{len(reqs)} requests, {mean_len:.1f} prompt tokens on average, {args.new} new each, threads {args.threads}"
    )
    ratios = []
    for k in range(args.repeats):
        times = {}
        for on in (True, False) if k % 2 == 0 else (False, True):
            times[on], stats = run_once(reqs, on, args.new)
            print(
                f"round {k}: prefix caching {'on ' if on else 'off'} {times[on]:7.2f} s  {stats}", flush=True
            )
        ratios.append(times[False] / times[True])
    print(
        f"speed-up with prefix caching (off / on), median of {len(ratios)}: {statistics.median(ratios):.2f}x "
        f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})"
    )


if __name__ == "__main__":
    main()
