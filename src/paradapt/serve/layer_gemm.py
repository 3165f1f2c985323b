"""The model's linear layers in serving steps: ``F.linear``, a C++ kernel, or oneDNN prepacked weights.

Why: a decode step multiplies a few to a few dozen rows by every weight of the model, and
``F.linear`` hands each product to MKL's sgemm, which packs the weight into its own panel
layout on every call; with few rows the packing is most of the work. Two products avoid it:

- ``kernel``: ``csrc/few_rows.cpp`` reads each weight row once where it lies (nn.Linear's own
  ``[out, in]`` layout, no copy), keeps a 4 x 3 tile of sums in registers, and asks for the next
  weight rows ahead of use so that memory stays busy. Every output is the same computation
  whatever the number of rows or threads. On a 2-core AMD EPYC (AVX2; ``benchmarks/layer_gemm.py``)
  1.1-2.4x faster than MKL at 1-16 rows over a whole model, about even at 24-32.
- ``packed``: the weight reordered once into oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``) and multiplied by ``_linear_pointwise``, as vLLM's
  CPU backend keeps its linear weights (``dispatch_cpu_unquantized_gemm``). It costs a second
  copy of every packed layer's weight (the original stays: merges, PiSSA and hooks read it). On
  the 2-core AMD EPYC with AVX-512 (Zen 4), one thread, over the random Llama's layers: 1.3-1.6x
  faster than MKL at 4-512 rows, and a 32-request decode step 1.3x faster; on the AVX2 EPYC it
  gained nothing (0.98x per step). oneDNN, like MKL, may pick code paths by row count, so a row's
  last bits can depend on how many rows share its step.

Which is faster depends on the CPU, so ``auto`` measures them when the engine starts, on the
model's own layers taken in order (as a step meets them: more weights than the caches hold, so
each is read from memory; timing one weight over and over instead, cached, flatters MKL), at
the row counts of :data:`CANDIDATE_ROWS`, and keeps per weight shape the fastest product at
each, where it beats ``F.linear`` by :data:`MARGIN`. A step of ``r`` rows takes the choice of
the smallest candidate count >= ``r`` (beyond the largest, the largest's). The packed copies
are made only for shapes that use them. ``kernel`` uses the kernel up to :data:`KERNEL_ROWS`
rows (an error where it cannot be built); ``packed`` packs every layer for every row count
(an error without oneDNN); ``linear`` never uses either.

Like the LM head's product (:mod:`paradapt.serve.lm_head`), the choice is installed only for the
duration of a step (serve/step_forwards.py), as an instance ``forward`` of each plain float32
``nn.Linear`` of the model (the LM head excepted), so the model is unchanged outside the
engine's steps and the hooks that add adapters still run. Steps that need a gradient, or other
dtypes, go to ``F.linear``. A weight changed in place (a new ``_version``) or replaced is packed
again before its next packed product.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..errors import ConfigError
from .core import LAYER_GEMM as MODES
from .step_forwards import installed

MARGIN = 1.05  # auto takes another product only where it is at least this much faster than F.linear
KERNEL_ROWS = 32  # ``kernel`` mode's limit, where it still beat MKL over a whole model measured
# row counts auto measures, in order; a step of r rows takes the choice of the first count >= r
CANDIDATE_ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 512)
KERNEL_TIMED_ROWS = 64  # the kernel is not timed above this (it lost to MKL from ~48 rows everywhere)
# from this many rows auto times one layer per shape instead of a sweep over the model: the
# product is bound by arithmetic there, not by reading the weight, and the sweep would take seconds
ONE_LAYER_ROWS = 128
# auto times the model's layers in order up to this many bytes of weights: more than most CPUs'
# last-level cache (a step streams the weights from memory; a cached weight flatters MKL)
SWEEP_BYTES = 96 << 20
REPEATS = 3  # sweeps per product and row count, interleaved; the best counts
# auto measures only models whose linear layers hold at least this much: a tiny model's step is
# call overhead either way, and skipping keeps a small engine's start instant
LEAST_BYTES = 8 << 20
UNBOUNDED = 1 << 62  # a run's ``most`` meaning every larger row count too
# what auto measured in this process, per (weight shape, torch threads, products it could use):
# every engine of a process (the twin's profile runs many) then makes the same choice, which the
# cost model records
_MEASURED: dict[tuple[tuple[int, int], int, tuple[str, ...]], tuple[Run, ...]] = {}

Run = tuple[int, int, str]  # (fewest rows, most rows, product): a product's row counts for a shape

SOURCE = Path(__file__).with_name("csrc") / "few_rows.cpp"
_EXTENSION = native.Extension("few_rows", SOURCE)


def load() -> ModuleType:
    """The compiled extension (built on first use; raises if it cannot be built)."""
    return _EXTENSION.load()


def unsupported() -> str | None:
    """Why the kernel cannot run on this machine, or None when it can (AVX2 and FMA needed)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"the CPU offers {capability}, the kernel needs AVX2"
    return None


def unpackable() -> str | None:
    """Why weights cannot be prepacked for oneDNN here, or None when they can."""
    return None if torch.backends.mkldnn.is_available() else "this torch has no oneDNN"


def layers(model: nn.Module) -> list[nn.Linear]:
    """The model's plain float32 CPU ``nn.Linear`` layers with contiguous weights, the LM head
    excepted (serve/lm_head.py has its own product)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for m in model.modules():
        if type(m) is not nn.Linear or m is head:
            continue
        w = m.weight
        if w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous():
            found.append(m)
    return found


def pack(weight: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """``weight`` reordered once for oneDNN's ``_linear_pointwise``; ``rows``: the row count to
    pick the layout for (None, as the layers use: one layout serves every step)."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the weight as :func:`pack` made it."""
    flat = x.reshape(-1, x.shape[-1])
    y = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    return y.reshape(*x.shape[:-1], y.shape[-1])


class LayerProduct:
    """How the served model's linear layers multiply: ``mode`` ``auto`` | ``kernel`` | ``packed`` | ``linear``.

    After :meth:`prepare`, ``plan`` maps each weight shape ``(out, in)`` that takes another
    product than ``F.linear`` for some row counts to its runs ``(fewest, most, product)``
    (``most`` :data:`UNBOUNDED`: every larger count too); rows outside them take ``F.linear``.
    ``reason`` says why no layer uses another product, when none does; ``packed_bytes`` is the
    memory the packed copies take.
    """

    def __init__(self, mode: str = "auto"):
        if mode not in MODES:
            raise ConfigError("layer_gemm", f"must be one of {list(MODES)}, got {mode!r}")
        self.mode = mode
        self.plan: dict[tuple[int, int], tuple[Run, ...]] = {}
        self.reason: str | None = None
        self.packed_bytes = 0
        self._forwards: list[tuple[nn.Linear, object]] = []  # built once, installed for each step
        self._ext: ModuleType | None = None
        self._packed: dict[nn.Linear, tuple[torch.Tensor, tuple[int, int]]] = {}  # layer -> (packed, key)

    @property
    def rows(self) -> int:
        """The most rows any layer multiplies with the kernel (0: none)."""
        return max((hi for runs in self.plan.values() for _, hi, p in runs if p == "kernel"), default=0)

    @property
    def used(self) -> str:
        """``kernel up to N rows`` (the most over the shapes), ``packed from N rows (a M MB copy)``
        (the fewest; ``packed N-K rows`` where it stops), both (``, ``), or ``linear``."""
        parts = [f"kernel up to {self.rows} rows"] if self.rows else []
        packed = [(lo, hi) for runs in self.plan.values() for lo, hi, p in runs if p == "packed"]
        if packed:
            lo, hi = min(r[0] for r in packed), max(r[1] for r in packed)
            where = f"packed from {lo} rows" if hi >= UNBOUNDED else f"packed {lo}-{hi} rows"
            parts.append(f"{where} (a {self.packed_bytes / 1e6:.3g} MB copy)")
        return ", ".join(parts) or "linear"

    @property
    def row_range(self) -> dict[tuple[int, int], tuple[int, int]]:
        """Per shape that takes the kernel, the row counts ``(fewest, most)`` it takes it for
        (its first run)."""
        out = {}
        for shape, runs in self.plan.items():
            kernel = [(lo, hi) for lo, hi, p in runs if p == "kernel"]
            if kernel:
                out[shape] = kernel[0]
        return out

    def prepare(self, model: nn.Module) -> None:
        """Find the layers, build what they may use and (``auto``) measure where each pays."""
        if self.mode == "linear":
            self.reason = "layer_gemm=linear"
            return
        found = layers(model)
        products, why = self._products(found)
        if not products:
            self.reason = why
            return
        shapes = {tuple(m.weight.shape) for m in found}
        if self.mode == "kernel":
            self.plan = dict.fromkeys(shapes, ((1, KERNEL_ROWS, "kernel"),))
        elif self.mode == "packed":
            self.plan = dict.fromkeys(shapes, ((1, UNBOUNDED, "packed"),))
        else:
            self.plan = {s: r for s, r in sorted(self._measured(found, products).items()) if r}
        uses_packed = {s for s, r in self.plan.items() if any(p == "packed" for _, _, p in r)}
        self._packed = {m: v for m, v in self._packed.items() if tuple(m.weight.shape) in uses_packed}
        for m in found:
            if tuple(m.weight.shape) in uses_packed and m not in self._packed:
                self._pack(m)
        self.packed_bytes = sum(m.weight.numel() * m.weight.element_size() for m in self._packed)
        self._forwards = [
            (m, self._forward_of(m, self.plan[tuple(m.weight.shape)]))
            for m in found
            if tuple(m.weight.shape) in self.plan
        ]
        if not self._forwards:
            self.reason = (
                f"{products[0]} was not faster than F.linear on this machine"
                if len(products) == 1
                else f"neither {' nor '.join(products)} was faster than F.linear on this machine"
            )

    def _products(self, found: list[nn.Linear]) -> tuple[tuple[str, ...], str | None]:
        """The products this mode may use for ``found`` here, or none and why."""
        if not found:
            return (), "the model has no plain float32 linear layer"
        if self.mode == "auto" and sum(m.weight.numel() * 4 for m in found) < LEAST_BYTES:
            return (), f"the model's linear layers hold under {LEAST_BYTES >> 20} MB"
        products, why = [], []
        checks = (
            ("kernel", lambda: unsupported() or self._build(), "cannot use the kernel"),
            ("packed", unpackable, "cannot pack the layers"),
        )
        for product, check, refusal in checks:
            if self.mode not in ("auto", product):
                continue
            reason = check()
            if reason is None:
                products.append(product)
            elif self.mode == product:  # asked for by name: an error, not a fallback
                raise ConfigError("layer_gemm", f"{refusal}: {reason}")
            else:
                why.append(reason)
        return tuple(products), "; ".join(why) or None

    def _build(self) -> str | None:
        try:
            self._ext = load()
        except Exception as e:  # no compiler, no ninja: auto falls back to F.linear
            return (
                f"the kernel did not build ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            )
        return None

    def _pack(self, m: nn.Linear) -> torch.Tensor:
        packed = pack(m.weight)
        self._packed[m] = (packed, (m.weight.data_ptr(), m.weight._version))
        return packed

    def _measured(
        self, found: list[nn.Linear], products: tuple[str, ...]
    ) -> dict[tuple[int, int], tuple[Run, ...]]:
        """Per weight shape, its runs (measured once per process, thread count and set of
        products: every engine of the process then makes the same choice)."""
        threads = torch.get_num_threads()
        shapes = {tuple(m.weight.shape) for m in found}
        if any((s, threads, products) not in _MEASURED for s in shapes):
            for s, r in self._measure(found, products).items():
                _MEASURED[(s, threads, products)] = r
        return {s: _MEASURED[(s, threads, products)] for s in shapes}

    def _measure(
        self, found: list[nn.Linear], products: tuple[str, ...]
    ) -> dict[tuple[int, int], tuple[Run, ...]]:
        """Per weight shape, the runs of :func:`runs` over the winners at each candidate row
        count: every product over the model's first ``SWEEP_BYTES`` of layers in order (from
        :data:`ONE_LAYER_ROWS` rows, one layer per shape), sweeps interleaved, best of ``REPEATS``."""
        chosen = sweep_layers(found)
        firsts = list({tuple(m.weight.shape): m for m in chosen}.values())  # one layer per shape
        gen = torch.Generator().manual_seed(0)
        calls = {"linear": F.linear}
        if "kernel" in products:
            calls["kernel"] = lambda x, w: self._ext.few_rows_linear(x, w, None)
        if "packed" in products:
            packs = {id(m.weight): self._pack(m) for m in chosen}
            calls["packed"] = lambda x, w: packed_linear(x, packs[id(w)], None)
        winners: dict[tuple[int, int], list[tuple[int, str]]] = {tuple(m.weight.shape): [] for m in found}
        with torch.no_grad():
            for rows in CANDIDATE_ROWS:
                timed = [p for p in calls if p != "kernel" or rows <= KERNEL_TIMED_ROWS]
                sweep_over = chosen if rows < ONE_LAYER_ROWS else firsts
                xs = {k: torch.randn(rows, k, generator=gen) for k in {m.in_features for m in chosen}}
                for p in timed:  # untimed: oneDNN and MKL build their code per row count
                    sweep(firsts, xs, calls[p])
                spent: dict[str, list[dict]] = {p: [] for p in timed}
                for _ in range(REPEATS):
                    for p in timed:
                        spent[p].append(sweep(sweep_over, xs, calls[p]))
                for s, won in winners.items():
                    best = {p: min(t[s] for t in spent[p]) for p in timed}
                    fastest = min((p for p in timed if p != "linear"), key=best.get, default="linear")
                    won.append((rows, fastest if best["linear"] > MARGIN * best[fastest] else "linear"))
        return {s: runs(won) for s, won in winners.items()}

    def active(self):
        """The layers multiply with their chosen products inside this block (those that use any)."""
        return installed(self._forwards)

    def _forward_of(self, m: nn.Linear, plan: tuple[Run, ...]):
        def forward(x: torch.Tensor) -> torch.Tensor:
            w = m.weight
            if x.dtype is not torch.float32 or torch.is_grad_enabled() or w.dtype is not torch.float32:
                return F.linear(x, w, m.bias)
            rows = x.numel() // w.shape[1] if w.shape[1] else 0
            product = next((p for lo, hi, p in plan if lo <= rows <= hi), "linear")
            if product == "kernel" and w.is_contiguous():
                return self._ext.few_rows_linear(x, w, m.bias)
            if product == "packed" and rows:
                packed, key = self._packed[m]
                if key != (w.data_ptr(), w._version):  # changed in place or replaced: pack again
                    packed = self._pack(m)
                return packed_linear(x, packed, m.bias)
            return F.linear(x, w, m.bias)

        return forward


def runs(winners: list[tuple[int, str]]) -> tuple[Run, ...]:
    """The runs ``(fewest, most, product)`` of the products other than ``linear``, from the winner
    at each candidate row count in increasing order: a candidate's winner takes the row counts
    above the previous candidate up to it, the last one's every larger count too (except the
    kernel: it never runs past a count it was timed at)."""
    out: list[list] = []
    previous = 0
    for i, (rows, product) in enumerate(winners):
        most = UNBOUNDED if i == len(winners) - 1 and product != "kernel" else rows
        if product != "linear":
            if out and out[-1][2] == product and out[-1][1] == previous:
                out[-1][1] = most
            else:
                out.append([previous + 1, most, product])
        previous = rows
    return tuple((lo, hi, p) for lo, hi, p in out)


def sweep_layers(found: list[nn.Linear]) -> list[nn.Linear]:
    """The layers ``auto`` times: the model's own in order, up to :data:`SWEEP_BYTES` of weights
    (at least one of each shape)."""
    chosen, total, seen = [], 0, set()
    for m in found:
        shape = tuple(m.weight.shape)
        if total < SWEEP_BYTES or shape not in seen:
            chosen.append(m)
            total += m.weight.numel() * 4
            seen.add(shape)
    return chosen


def sweep(chosen: list[nn.Linear], xs: dict[int, torch.Tensor], product) -> dict[tuple[int, int], float]:
    """Seconds spent per weight shape by ``product(x, weight)`` over ``chosen`` in order, each
    layer given ``xs[its in_features]``."""
    spent: dict[tuple[int, int], float] = {}
    for m in chosen:
        x, w = xs[m.in_features], m.weight
        t0 = time.perf_counter()
        product(x, w)
        shape = tuple(w.shape)
        spent[shape] = spent.get(shape, 0.0) + time.perf_counter() - t0
    return spent


__all__ = [
    "CANDIDATE_ROWS",
    "KERNEL_ROWS",
    "LayerProduct",
    "MODES",
    "SOURCE",
    "UNBOUNDED",
    "layers",
    "load",
    "pack",
    "packed_linear",
    "runs",
    "sweep",
    "sweep_layers",
    "unpackable",
    "unsupported",
]
