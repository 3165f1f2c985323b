"""``paradapt profile``: measure the twin's cost model on this machine, on the real Engine.

The profiler drives the real :class:`~paradapt.serve.engine.Engine` (``Engine.step`` with its
trace on, so sampling and bookkeeping are part of each measured step) over a seeded random
design of step shapes: D decoding requests with context c spread over A adapters of random
kinds and ranks (A = 0: the base model), plus a prompt of P tokens prefilled next to them in
each measured step. Learned mixtures over same-kind adapters (top-1 and dense, random routers)
are among the A, so mixture steps are measured too. The prefill steps that bring the D requests
in are samples too. Every adapter folder is also moved through the four tiers on its own a few
times (load/evict, the ``a + b * bytes`` fits). Step costs are fitted by non-negative least
squares on relative error; the error is reported on held-out scenarios (every fifth), then the
model is refitted on all samples. A default run takes one to three minutes on one CPU thread.

Needs torch (imported here, not by :mod:`paradapt.twin`).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import paradapt as pa

from ..errors import ConfigError
from ..quantized import describe, quantization
from ..serve.cache import Move
from ..serve.core import StepTrace
from ..serve.engine import Engine, EngineConfig, kv_bytes_per_token
from ..serve.layer_gemm import LayerProduct
from ..serve.sampling import SamplingParams
from ..serve.workload import KNOWN_KINDS, AdapterSpec
from ..state import get_state
from .costmodel import (
    BASE_FEATURES,
    MOVE_OPS,
    CostModel,
    MixtureCost,
    errors,
    featurize,
    fit_linear,
    kind_features,
    machine_fingerprint,
    model_fingerprint,
)

#: Every kind the engine serves can be profiled; the default profile measures the three most used.
SERVABLE_KINDS = KNOWN_KINDS
DEFAULT_KINDS = ("lora", "parallel", "series")
TEMPLATES = 4  # distinct random weight sets per (kind, rank); adapter folders hard-link them


# -- the model and its adapters ---------------------------------------------------------------------


MAX_DESIGN_KV = 4096  # KV tokens of a scenario's decoders (decodes x context)


def build_model(layers: int = 8, hidden: int = 512, seed: int = 0) -> torch.nn.Module:
    """The random Llama-style decoder of ``benchmarks/serve_load.py`` (vocab 512), built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg._name_or_path = f"random-llama-h{hidden}-l{layers}"
    return LlamaForCausalLM(cfg).eval()


def adapter_config(kind: str, rank: int):
    """The adapter config of a workload's (kind, rank), as ``benchmarks/serve_load.py`` builds them."""
    if kind == "lora":
        return pa.LoRAConfig(r=rank, alpha=2 * rank)
    if kind == "parallel":
        return pa.ParallelConfig(r=rank, scale=4.0)
    if kind == "series":
        return pa.SeriesConfig(r=rank)
    if kind == "prefix":  # the rank of a prefix is its length (serve/trace.py reads it back so)
        return pa.PrefixConfig(num_virtual_tokens=rank, reparam=False)
    if kind == "mam":
        return pa.MAMConfig(num_virtual_tokens=rank, reparam=False, r=rank)
    if kind == "ia3":
        return pa.IA3Config()
    if kind == "ssf":
        return pa.SSFConfig()
    raise ConfigError("kinds", f"the engine benchmarks serve {list(SERVABLE_KINDS)}, not {kind!r}")


def build_adapter_root(
    model: torch.nn.Module, root: Path, adapters: Sequence[AdapterSpec], seed: int = 0
) -> Path:
    """One folder per adapter under ``root``; weights from a few random templates per (kind, rank),
    hard-linked (the engine still reads, validates and attaches each folder on its own)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tdir = root.parent / f"{root.name}-templates"
    gen = torch.Generator().manual_seed(seed)
    templates: dict[tuple[str, int, int], Path] = {}
    for kind, rank in sorted({(a.kind, a.rank) for a in adapters}):
        for t in range(TEMPLATES):
            name = f"t-{kind}-{rank}-{t}"
            templates[(kind, rank, t)] = tdir / name
            if (tdir / name).is_dir():  # made by an earlier call for the same root
                continue
            pa.add_adapter(model, name, adapter_config(kind, rank))
            with torch.no_grad():  # non-zero weights: a stand-in for training
                for p in model.paradapt[name].parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.02)
            pa.save_adapter(model, name, tdir / name)
            pa.remove_adapter(model, name)
    for i, a in enumerate(adapters):
        dst = root / a.name
        if dst.exists():
            continue
        dst.mkdir()
        for f in templates[(a.kind, a.rank, i % TEMPLATES)].iterdir():
            os.link(f, dst / f.name)
    return root


def build_mixtures(
    model: torch.nn.Module, root: Path, adapters: Sequence[AdapterSpec], seed: int = 0
) -> dict[str, MixtureCost]:
    """Per kind with two adapters or more, two mixture folders under ``root`` over that kind's
    adapters (one per rank, so experts of mixed ranks): a top-1 and a dense gate, random routers.
    Returns each mixture's :class:`MixtureCost` by name."""
    out: dict[str, MixtureCost] = {}
    torch.manual_seed(seed)
    for kind in sorted({a.kind for a in adapters}):
        mine = [a for a in adapters if a.kind == kind]
        first: dict[int, str] = {}
        for a in mine:
            first.setdefault(a.rank, a.name)
        experts = [first[r] for r in sorted(first)] if len(first) > 1 else [a.name for a in mine[:3]]
        if len(experts) < 2:
            continue
        clear_adapters(model)
        for name in experts:
            pa.load_adapter(model, root / name, name=name)
        for top_k in (1, None):
            name = f"mix-{kind}-{'top1' if top_k == 1 else 'dense'}"
            out[name] = MixtureCost(tuple(experts), top_k or len(experts))
            if (root / name).is_dir():
                continue
            pa.add_mixture(model, name, pa.Mixture(experts=experts, top_k=top_k, init="random"))
            pa.save_adapter(model, name, root / name)
        clear_adapters(model)
    return out


def clear_adapters(model: torch.nn.Module) -> None:
    """Detach every adapter (an Engine needs a bare model); mixtures first, their experts after."""
    st = get_state(model)
    records = st.adapters if st is not None else {}
    order = sorted(records, key=lambda n: not isinstance(records[n].config, pa.Mixture))
    for name in order:
        pa.remove_adapter(model, name)


# -- the design ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """D decoding requests of context c over ``adapters`` (empty: base), plus P prompt tokens per step."""

    decodes: int
    context: int
    prefill: int
    adapters: tuple[str, ...]
    steps: int
    extra: tuple[str, ...] = ()  # adapters made resident first (one-token requests), not used after


def design(
    n: int, adapters: Sequence[AdapterSpec], *, max_running: int, token_budget: int, seed: int
) -> list[Scenario]:
    """``n`` seeded random scenarios covering decode batch, context, prefill size and adapter mix."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        d = rng.choice([1, 2, 4, 8, 12, 16, 24, max_running - 1])
        d = max(1, min(d, max_running - 1))
        c = rng.choice([8, 32, 64, 128, 192, 384, 768])  # contexts as long as served workloads reach
        while d * c > MAX_DESIGN_KV and c > 8:
            c //= 2
        a = min(d, rng.choice([0, 1, 1, 2, 4, 8]))
        p = min(rng.choice([0, 0, 16, 64, 128, 224]), token_budget - d)
        picked = rng.sample(list(adapters), min(len(adapters), a + 12))
        names = tuple(x.name for x in picked[:a])
        extra = tuple(x.name for x in picked[a:])[: rng.choice([0, 0, 4, 12])]
        out.append(Scenario(d, c, max(p, 0), names, steps=4, extra=extra))
    return out


# -- measuring ---------------------------------------------------------------------------------------


@dataclass
class Samples:
    steps: list[tuple[int, StepTrace]]  # (scenario index, trace)
    moves: list[tuple[str, int, float]]  # (op, bytes, seconds)
    submit: list[float]


def run_scenario(
    model, root: Path, sc: Scenario, config: EngineConfig, rng: random.Random, samples: Samples, idx: int
) -> None:
    """Run one scenario on a fresh Engine (trace on) and keep its steps and moves."""
    clear_adapters(model)
    engine = Engine(model, root, config)
    engine.enable_trace()
    vocab = model.config.vocab_size
    limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30

    def add(n_prompt: int, n_new: int, adapter: str | None, min_new: int = 1) -> None:
        # prompt + new tokens stay within the model's positions (the engine refuses more): the new
        # tokens give way down to ``min_new`` (what the scenario needs), then the prompt shrinks
        n_new = max(min(n_new, max(min_new, limit - n_prompt)), 1)
        n_prompt = max(min(n_prompt, limit - n_new), 1)
        prompt = [rng.randrange(3, vocab) for _ in range(n_prompt)]
        t0 = time.perf_counter()
        engine.add_request(prompt, adapter, SamplingParams(max_new_tokens=n_new, ignore_eos=True))
        samples.submit.append(time.perf_counter() - t0)

    for name in sc.extra:
        add(4, 1, name)
    engine.run()  # the extra adapters stay resident (LRU evicts only when the slots are full)
    for i in range(sc.decodes):
        add(
            sc.context,
            sc.steps + 64,
            sc.adapters[i % len(sc.adapters)] if sc.adapters else None,
            sc.steps + 1,
        )
    for _ in range(64):  # prefill the decoders (these steps are samples too)
        if not any(r.in_prefill for r in engine.scheduler.running) and not engine.scheduler.waiting:
            break
        engine.step()
    for j in range(sc.steps):
        if sc.prefill:
            add(sc.prefill, 1, sc.adapters[j % len(sc.adapters)] if sc.adapters else None)
        engine.step()
    for rid in [r.id for r in engine.scheduler.running] + [r.id for r in engine.scheduler.waiting]:
        engine.cancel(rid)
    for t in engine.trace:
        samples.steps.append((idx, t))
        samples.moves.extend((m.op, m.size, m.seconds) for m in t.moves)
    clear_adapters(model)


def measure_moves(model, root: Path, names: Sequence[str], repeats: int, samples: Samples) -> None:
    """Move each adapter disk -> host -> device -> host -> disk on its own, ``repeats`` times."""
    clear_adapters(model)
    engine = Engine(model, root, EngineConfig(max_slots=1, max_served=1))
    store = engine.store
    for _ in range(repeats):
        for name in names:
            size = store.size(name)
            for op in MOVE_OPS:
                t0 = time.perf_counter()
                store(Move(op, name, size))
                samples.moves.append((op, size, time.perf_counter() - t0))
    clear_adapters(model)


def run_workload(
    model,
    root: Path,
    config: EngineConfig,
    kinds: Sequence[str],
    ranks: Sequence[int],
    rate: float,
    seconds: float,
    seed: int,
    samples: Samples,
    idx: int,
) -> dict[str, tuple[str, int]]:
    """Replay a synthetic workload on the real engine (wall clock) and keep its traced steps.

    The designed scenarios cover the shapes; these runs add the shapes serving actually makes
    (a moderate rate, and a saturating one whose steps are full), in their real proportions.
    Their steps are grouped 20 at a time into scenarios for the held-out split.
    """
    from ..serve.workload import WorkloadSpec
    from .replay import RealBackend, replay

    half = (getattr(model.config, "max_position_embeddings", None) or 1024) // 2  # prompt + output fit
    spec = WorkloadSpec(
        num_adapters=24,
        rate=rate,
        duration=seconds,
        alpha=0.5,
        input_len=(min(8, half), min(128, half)),
        output_len=(min(8, half), min(64, half)),
        ranks=list(ranks),
        kinds=list(kinds),
        seed=seed,
        adapter_prefix=f"prof{idx}",
    )
    workload = spec.generate()
    build_adapter_root(model, root, workload.adapters, seed)
    clear_adapters(model)
    clock = RealBackend.make_clock()
    engine = Engine(model, root, config, clock=clock)
    engine.enable_trace()
    replay(workload, RealBackend(engine, clock, vocab=model.config.vocab_size, seed=seed))
    for k, t in enumerate(engine.trace):
        samples.steps.append((idx + k // 20, t))
        samples.moves.extend((m.op, m.size, m.seconds) for m in t.moves)
    clear_adapters(model)
    return {a.name: (a.kind, a.rank) for a in workload.adapters}


# -- fitting -------------------------------------------------------------------------------------------


def fit_steps(
    samples: Samples,
    info: dict[str, tuple[str, int]],
    kinds: Sequence[str],
    packed_prompts: bool = True,
    kernel_rows: int = 0,
) -> tuple[dict[str, float], dict]:
    """Step coefficients (fitted on all samples) and the held-out error (every fifth scenario held
    out); ``packed_prompts`` and ``kernel_rows`` as :func:`~paradapt.twin.costmodel.featurize`."""
    names = (*BASE_FEATURES, *kind_features(kinds))
    X = [
        [featurize(t.shape, info, kinds, packed_prompts, kernel_rows)[n] for n in names]
        for _, t in samples.steps
    ]
    y = [t.seconds for _, t in samples.steps]
    held = [i % 5 == 4 for i, _ in samples.steps]
    tr = [i for i, h in enumerate(held) if not h]
    te = [i for i, h in enumerate(held) if h]
    coef = fit_linear([X[i] for i in tr], [y[i] for i in tr])
    pred = [sum(c * x for c, x in zip(coef, X[i], strict=True)) for i in te]
    held_err = errors(pred, [y[i] for i in te])
    coef = fit_linear(X, y)
    pred_all = [sum(c * x for c, x in zip(coef, row, strict=True)) for row in X]
    fit = {"held_out": held_err, "train": errors(pred_all, y)}
    return dict(zip(names, coef, strict=True)), fit


def fit_moves(samples: Samples) -> dict[str, tuple[float, float]]:
    """``a + b * bytes`` per move op (non-negative; absolute error, the moves are few and similar)."""
    out = {}
    for op in MOVE_OPS:
        rows = [(1.0, float(s)) for o, s, _ in samples.moves if o == op]
        ys = [t for o, _, t in samples.moves if o == op]
        out[op] = tuple(fit_linear(rows, ys, relative=False)) if rows else (0.0, 0.0)
    return out


def fit_sizes(root: Path, adapters: Sequence[AdapterSpec]) -> dict[str, tuple[float, float]]:
    """Bytes of an adapter per kind as ``per_rank * rank + fixed`` (exact: weights grow with the rank)."""
    out = {}
    for kind in sorted({a.kind for a in adapters}):
        pts = {}
        for a in adapters:
            if a.kind == kind:
                pts[a.rank] = sum(
                    f.stat().st_size for f in (root / a.name).iterdir() if f.suffix == ".safetensors"
                )
        ranks = sorted(pts)
        if len(ranks) == 1:
            out[kind] = (pts[ranks[0]] / ranks[0], 0.0)
        else:
            per = (pts[ranks[-1]] - pts[ranks[0]]) / (ranks[-1] - ranks[0])
            out[kind] = (per, pts[ranks[0]] - per * ranks[0])
    return out


# -- the whole profile ---------------------------------------------------------------------------------


def profile(
    model: torch.nn.Module | None = None,
    *,
    kinds: Sequence[str] = DEFAULT_KINDS,
    ranks: Sequence[int] = (8, 16, 32),
    scenarios: int = 40,
    copies: int = 3,
    move_repeats: int = 2,
    token_budget: int = 256,
    max_running: int = 32,
    workload_rates: Sequence[float] = (3.0, 30.0),
    workload_seconds: float = 8.0,
    seed: int = 0,
    mixtures: bool = True,
    log: Callable[[str], None] = print,
) -> CostModel:
    """Measure and fit the cost model of ``model`` (default: :func:`build_model`) on this machine.

    ``mixtures``: also serve learned mixtures over the profiled adapters in the designed
    scenarios (:func:`build_mixtures`), so the mixture terms are measured, not left at 0."""
    for k in kinds:
        if k not in SERVABLE_KINDS:
            raise ConfigError("kinds", f"can profile {list(SERVABLE_KINDS)}, not {k!r}")
    model = build_model() if model is None else model
    clear_adapters(model)
    t_start = time.perf_counter()
    adapters = [AdapterSpec(f"p-{k}-{r}-{i}", k, r) for k in kinds for r in ranks for i in range(copies)]
    info = {a.name: (a.kind, a.rank) for a in adapters}
    work = Path(tempfile.mkdtemp(prefix="paradapt-profile-"))
    try:
        root = build_adapter_root(model, work / "adapters", adapters, seed)
        mix = build_mixtures(model, root, adapters, seed) if mixtures else {}
        info.update(mix)
        pool = [*adapters, *(AdapterSpec(n, "mixture", m.evaluated) for n, m in mix.items())]
        samples = Samples([], [], [])
        config = EngineConfig(
            num_blocks=(MAX_DESIGN_KV + 64 * max_running + token_budget) // 16 + max_running + 8,
            token_budget=token_budget,
            max_running=max_running,
            max_slots=min(20, len(adapters)),
            max_served=len(adapters),
            prefetch=0,
        )
        rng = random.Random(seed)
        runs = design(scenarios + 2, pool, max_running=max_running, token_budget=token_budget, seed=seed)
        log(
            f"profile: {len(runs) - 2} scenarios on {len(adapters)} adapters ({'/'.join(kinds)}, ranks {list(ranks)})"
            + (f" and {len(mix)} mixtures over them" if mix else "")
        )
        warm = Samples([], [], [])
        for i, sc in enumerate(runs):
            run_scenario(model, root, sc, config, rng, warm if i < 2 else samples, i)
        for j, rate in enumerate(workload_rates):
            info.update(
                run_workload(
                    model,
                    root,
                    config,
                    kinds,
                    ranks,
                    rate,
                    workload_seconds,
                    seed + 1 + j,
                    samples,
                    1000 * (j + 1),
                )
            )
        measure_moves(model, root, [a.name for a in adapters], move_repeats, samples)
        # the engine attends per request in every step on the CPU (serve/hf_paged.py, featurize)
        packed = next(model.parameters()).device.type != "cpu"
        # the few-rows kernel's reach, as every engine above chose it (measured once per process)
        layers = LayerProduct(config.layer_gemm)
        layers.prepare(model)
        rows = layers.rows
        step, fit = fit_steps(samples, info, kinds, packed_prompts=packed, kernel_rows=rows)
        fit["packed_prompts"] = packed
        fit["kernel_rows"] = rows
        fit["steps"] = len(samples.steps)
        fit["mixture_steps"] = sum(
            1 for _, t in samples.steps if any(n in mix for n, _ in t.shape.adapter_tokens)
        )
        fit["moves"] = len(samples.moves)
        fit["scheduler_overhead_us"] = round(
            1e6 * sum(t.plan_seconds for _, t in samples.steps) / len(samples.steps), 1
        )
        fit["seconds"] = round(time.perf_counter() - t_start, 1)
        fp = {**machine_fingerprint(), **model_fingerprint(model.config.to_dict())}
        fp["quantization"] = describe(quantization(model))  # an int4 base steps at another speed
        return CostModel(
            step,
            fit_moves(samples),
            fit_sizes(root, adapters),
            kv_bytes_per_token=kv_bytes_per_token(model),
            submit=sorted(samples.submit)[len(samples.submit) // 2] if samples.submit else 0.0,
            fingerprint=fp,
            fit=fit,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
