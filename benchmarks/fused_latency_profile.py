"""Where a fused parallel adapter's batch-1 time goes, on the Llama of ``mixed_batch.py``.

Two tables, both interleaved (methods in a fresh random order every round) with medians:

1. One FFN at batch-1 decode (one token), op by op: gate / up projection, activation, product,
   down projection, and the whole MLP module call (with paradapt's site hooks), for the base FFN
   and the fused one, as now and as before the fix (``fused before``: the split activation
   activating both slices and concatenating them, and the FFN site's hooks still on). The 8
   layers are cycled so every call streams its weights from memory, as in the model.
2. The whole model, one decode step on a 128-token cache (or a 128-token prefill): ``base``;
   ``base copy`` (a deep copy: same weights, fresh memory, the control for where tensors sit);
   ``fused before`` (as above); ``fused`` (as now); ``fused, no paradapt hooks`` (the model's
   root hooks stripped too: what is left of paradapt's hook cost); ``unfused`` (the adapter
   routed as usual).

Times are per call: wall clock and this thread's CPU time. On a shared machine the wall clock
includes time the thread was not running; thread CPU time leaves that out (not memory
contention), so it is the steadier of the two when other processes run.

    python benchmarks/fused_latency_profile.py --ranks 8,16,64 --repeats 60 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mixed_batch as mb  # noqa: E402  (the benchmark's model, cache and adapter configs)

import paradapt as pa  # noqa: E402
from paradapt.bottleneck import _ACTS  # noqa: E402
from paradapt.fusing import SplitActivation  # noqa: E402
from paradapt.state import get_state  # noqa: E402

CACHE_LEN = 128


def concat_forward(split: SplitActivation) -> Callable[[torch.Tensor], torch.Tensor]:
    """The split activation as it was before: activate both slices, concatenate."""
    i = split.width

    def forward(h: torch.Tensor) -> torch.Tensor:
        return torch.cat([split.base_act(h[..., :i]), _ACTS[split.act](h[..., i:])], dim=-1)

    return forward


def as_before(model: nn.Module) -> nn.Module:
    """A copy of a fused model as the fix found it: slice-and-concatenate, FFN site hooks on."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, SplitActivation):
            mod.forward = concat_forward(mod)
    for rec in get_state(m).adapters.values():
        for f in rec.fused.ffns if rec.fused is not None else ():
            if f.unhooked is not None:
                f.unhooked.attach_hooks()
    return m


def without_hooks(model: nn.Module) -> nn.Module:
    """A copy with every forward hook removed (what paradapt's hooks cost when nothing is routed)."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        for d in (
            mod._forward_hooks,
            mod._forward_pre_hooks,
            mod._forward_hooks_with_kwargs,
            mod._forward_hooks_always_called,
            mod._forward_pre_hooks_with_kwargs,
        ):
            d.clear()
    return m


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall s, thread CPU s) of one call."""
    c0, t0 = time.thread_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.thread_time() - c0


def interleave(calls: dict[str, Callable[[], object]], repeats: int, seed: int) -> dict[str, list]:
    """Each call ``repeats`` times, in a fresh random order each round; [(wall, cpu), ...] per name."""
    res: dict[str, list] = {k: [] for k in calls}
    rng = random.Random(seed)
    keys = list(calls)
    with torch.inference_mode():
        for fn in calls.values():
            fn()
            fn()
        gc.collect()
        gc.disable()
        try:
            for _ in range(repeats):
                rng.shuffle(keys)
                for k in keys:
                    res[k].append(timed(calls[k]))
        finally:
            gc.enable()
    return res


def med(xs: list[tuple[float, float]], j: int) -> float:
    return statistics.median(x[j] for x in xs)


def ffn_table(models: dict[str, nn.Module], repeats: int, seed: int) -> None:
    """Per-op thread CPU time of one FFN at decode: base, fused, fused before."""
    x = torch.randn(1, 1, models["base"].config.hidden_size, generator=torch.Generator().manual_seed(seed))
    mlps = {k: [layer.mlp for layer in m.model.layers] for k, m in models.items()}
    n = len(mlps["base"])

    def ops(mlp: nn.Module) -> dict[str, Callable[[], object]]:
        g = mlp.gate_proj(x)
        u = mlp.up_proj(x)
        a = mlp.act_fn(g)
        p = a * u
        return {
            "gate proj": lambda: mlp.gate_proj(x),
            "up proj": lambda: mlp.up_proj(x),
            "act": lambda: mlp.act_fn(g),
            "mul": lambda: a * u,
            "down proj": lambda: mlp.down_proj(p),
            "whole MLP call": lambda: mlp(x),
        }

    rows: dict[str, dict[str, list]] = {}
    labels = list(models)
    rng = random.Random(seed)
    with torch.inference_mode():
        for rep in range(repeats + n):
            i = rep % n
            rng.shuffle(labels)
            for label in labels:
                for op, fn in ops(mlps[label][i]).items():
                    t = timed(fn)
                    if rep >= n:  # the first pass over the layers is warm-up
                        rows.setdefault(op, {}).setdefault(label, []).append(t)
    print("| op (one FFN, decode) | base us | fused us | fused - base | fused before us | before - base |")
    print("|---|--:|--:|--:|--:|--:|")
    for op, r in rows.items():
        b, f, c = (1e6 * med(r[k], 1) for k in ("base", "fused", "fused before"))
        print(f"| {op} | {b:.1f} | {f:.1f} | {f - b:+.1f} | {c:.1f} | {c - b:+.1f} |")


def model_table(
    base: nn.Module, fused: nn.Module, before: nn.Module, unfused: nn.Module, args, r: int
) -> None:
    cache = mb.build_cache(base, 1, CACHE_LEN, args.seed + 6, "cpu")
    length = 1 if args.phase == "decode" else CACHE_LEN
    inp = mb.random_inputs(base, 1, length, args.seed + 5, "cpu")
    models = {
        "base": base,
        "base copy": copy.deepcopy(base),
        "fused before": before,
        "fused": fused,
        "fused, no paradapt hooks": without_hooks(fused),
        "unfused": unfused,
    }

    def call(m: nn.Module) -> Callable[[], object]:
        if args.phase == "prefill":
            return lambda: m(**inp, logits_to_keep=1)

        def step():
            out = m(**inp, past_key_values=cache, use_cache=True, logits_to_keep=1)
            mb.crop_to(cache, CACHE_LEN)
            return out

        return step

    res = interleave({k: call(m) for k, m in models.items()}, args.repeats, args.seed)
    bw, bc = med(res["base"], 0), med(res["base"], 1)
    print(f"\n| {args.phase} r={r} | wall ms | x base | thread CPU ms | x base |")
    print("|---|--:|--:|--:|--:|")
    for k, v in res.items():
        w, c = med(v, 0), med(v, 1)
        print(f"| {k} | {1e3 * w:.2f} | {w / bw:.3f} | {1e3 * c:.2f} | {c / bc:.3f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=mb.csv_list(int), default=[8, 16, 64])
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--phase", choices=["decode", "prefill"], default="decode")
    ap.add_argument("--no-ffn-table", action="store_true", help="only the whole-model table")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, desc = mb.build_model("llama", False, args.seed, torch.device("cpu"), torch.float32)
    print(f"- {desc}; torch threads {torch.get_num_threads()}; repeats {args.repeats} (medians)")
    print(f"- command: python {' '.join(sys.argv)}")
    for r in args.ranks:
        torch.manual_seed(args.seed + 200 + r)
        unfused = mb.twin(base)
        pa.add_adapter(unfused, "par", mb.adapter_config("parallel", r))
        pa.set_active(unfused, "par")
        fused = copy.deepcopy(base)
        pa.add_adapter(fused, "par", mb.adapter_config("parallel", r))
        fused.paradapt["par"].load_state_dict(unfused.paradapt["par"].state_dict())
        pa.fuse(fused, "par")
        before = as_before(fused)
        print(f"\n### r = {r}\n")
        if not args.no_ffn_table:
            ffn_table({"base": base, "fused": fused, "fused before": before}, args.repeats * 4, args.seed)
        model_table(base, fused, before, unfused, args, r)
        del unfused, fused, before
        gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
