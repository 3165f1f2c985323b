"""How the cost of adding one adapter grows with the number already on the model.

Adds adapters #1..#N one at a time to a tiny 4-layer Llama built from a config
(random weights, nothing downloaded) and times each ``add_adapter`` call:

- paradapt LoRA r=8 (q/v projections, the family default);
- paradapt parallel adapter r=16 (on every FFN block);
- PEFT LoRA r=8 on q_proj/v_proj (``get_peft_model`` for #1, then
  ``PeftModel.add_adapter``), for comparison.

Prints, per method, the mean time of the first and of the last ``--window``
adds and their ratio (1.0 = adding the N-th adapter costs what the first did).

    python benchmarks/add_scaling.py            # N=500
    python benchmarks/add_scaling.py --n 1000 --window 100
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import paradapt as pa  # noqa: E402


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def time_adds(add_one, n: int) -> list[float]:
    """Seconds taken by each of ``add_one(0) .. add_one(n - 1)``."""
    times = []
    gc.collect()
    gc.disable()  # keep collector pauses out of single-call timings
    try:
        for i in range(n):
            t0 = time.perf_counter()
            add_one(i)
            times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times


def run_paradapt(config, n: int) -> list[float]:
    model = tiny_llama()
    return time_adds(lambda i: pa.add_adapter(model, f"a{i}", config), n)


def run_peft(n: int) -> list[float]:
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    holder = {}

    def add_one(i: int) -> None:
        if i == 0:
            holder["peft"] = get_peft_model(model, cfg, adapter_name="a0")
        else:
            holder["peft"].add_adapter(f"a{i}", cfg)

    return time_adds(add_one, n)


def summarise(label: str, times: list[float], window: int) -> dict:
    first = statistics.mean(times[:window])
    last = statistics.mean(times[-window:])
    return {
        "method": label,
        "n": len(times),
        "first_ms": 1e3 * first,
        "last_ms": 1e3 * last,
        "ratio": last / first,
        "total_s": sum(times),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="adapters to add per method (default 500)")
    ap.add_argument("--window", type=int, default=50, help="adds averaged at each end (default 50)")
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison")
    args = ap.parse_args()
    if args.n < 2 * args.window:
        ap.error("--n must be at least twice --window")

    torch.set_num_threads(1)
    rows = []
    runs = [
        ("paradapt LoRA r=8 (q,v)", lambda: run_paradapt(pa.LoRAConfig(r=8), args.n)),
        ("paradapt parallel r=16 (ffn)", lambda: run_paradapt(pa.ParallelConfig(r=16), args.n)),
    ]
    if not args.no_peft:
        import peft

        runs.append((f"PEFT {peft.__version__} LoRA r=8 (q,v)", lambda: run_peft(args.n)))
    for label, fn in runs:
        rows.append(summarise(label, fn(), args.window))

    print(
        f"add_adapter cost vs adapters already present: tiny Llama (4 layers, hidden 64), "
        f"N={args.n}, window={args.window}"
    )
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{os.cpu_count()} CPUs, torch threads 1"
    )
    first_col, last_col = f"first {args.window} (ms/add)", f"last {args.window} (ms/add)"
    head = f"{'method':<34} {first_col:>20} {last_col:>19} {'ratio last/first':>17} {'total (s)':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['method']:<34} {r['first_ms']:>20.3f} {r['last_ms']:>19.3f} {r['ratio']:>17.2f} {r['total_s']:>10.2f}"
        )


if __name__ == "__main__":
    main()
