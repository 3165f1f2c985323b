"""The model's linear layers in serving steps with few rows: ``F.linear`` or a C++ kernel.

Why: a decode step at low load (one chat, a few concurrent requests) multiplies 1-16 rows by
every weight of the model. ``F.linear`` hands that to MKL's sgemm, which packs the weight into
its own panel layout on every call; with a handful of rows the packing is most of the work.
``csrc/few_rows.cpp`` reads each weight row once where it lies (nn.Linear's own ``[out, in]``
layout, no copy), keeps a 4 x 3 tile of sums in registers, and asks for the next weight rows
ahead of use so that memory stays busy. Measured on a 2-core AMD EPYC (AVX2, one thread;
``benchmarks/layer_gemm.py``), over a whole model's layers: the products 1.1-2.4x faster at
1-16 rows, about even at 24-32, slower than MKL from about 48 rows, so only steps with few rows
take it.

Every output of the kernel is the same computation whatever the number of rows or threads, so
a request's logits do not change with how many others share its step while the kernel runs
them (MKL picks different code paths by row count).

``auto`` measures both products when the engine starts, on the model's own layers taken in order
(as a step meets them: more weights than the caches hold, so each is read from memory), and keeps
the kernel, per weight shape, for the first run of row counts where it is clearly faster (timing
one weight over and over instead, cached, favoured MKL from about 12 rows, where over a whole
model the kernel was still 1.2-1.4x faster at 12-16);
``kernel`` uses it up to :data:`KERNEL_ROWS` rows (an error where it cannot be built); ``linear``
never uses it. Like the LM head's product (:mod:`paradapt.serve.lm_head`), the kernel is
installed only for the duration of a step (serve/step_forwards.py), as an instance ``forward``
of each plain float32 ``nn.Linear`` of the model (the LM head excepted), so the model is unchanged outside the
engine's steps and the hooks that add adapters still run. Steps that need a gradient, or other
dtypes, go to ``F.linear``.
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

MARGIN = 1.05  # auto takes the kernel only where it is at least this much faster: noise must not flip it
KERNEL_ROWS = 32  # ``kernel`` mode's limit, where it still beat MKL over a whole model measured
# row counts auto measures, in order; per shape it keeps the first run of them where the kernel wins
CANDIDATE_ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
# auto times the model's layers in order up to this many bytes of weights: more than most CPUs'
# last-level cache (a step streams the weights from memory; a cached weight flatters MKL)
SWEEP_BYTES = 96 << 20
REPEATS = 3  # sweeps per product and row count, interleaved; the best counts
# auto measures only models whose linear layers hold at least this much: a tiny model's step is
# call overhead either way, and skipping keeps a small engine's start instant
LEAST_BYTES = 8 << 20
# what auto measured in this process, per (weight shape, torch threads): every engine of a process
# (the twin's profile runs many) then makes the same choice, which the cost model records
_MEASURED: dict[tuple[tuple[int, int], int], tuple[int, int]] = {}

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


class LayerProduct:
    """How the served model's linear layers multiply few rows: ``mode`` ``auto`` | ``kernel`` | ``linear``.

    After :meth:`prepare`, ``row_range`` maps each weight shape ``(out, in)`` that takes the
    kernel to the row counts ``(fewest, most)`` it takes it for; ``reason`` says why none does,
    when none does.
    """

    def __init__(self, mode: str = "auto"):
        if mode not in MODES:
            raise ConfigError("layer_gemm", f"must be one of {list(MODES)}, got {mode!r}")
        self.mode = mode
        self.row_range: dict[tuple[int, int], tuple[int, int]] = {}
        self.reason: str | None = None
        self._forwards: list[tuple[nn.Linear, object]] = []  # built once, installed for each step
        self._ext: ModuleType | None = None

    @property
    def rows(self) -> int:
        """The most rows any layer multiplies with the kernel (0: none)."""
        return max((hi for _, hi in self.row_range.values()), default=0)

    @property
    def used(self) -> str:
        """``kernel up to N rows`` (the most over the shapes), or ``linear``."""
        return f"kernel up to {self.rows} rows" if self.rows else "linear"

    def prepare(self, model: nn.Module) -> None:
        """Find the layers, build the kernel and (``auto``) measure where it pays."""
        if self.mode == "linear":
            self.reason = "layer_gemm=linear"
            return
        found = layers(model)
        why = unsupported() or (None if found else "the model has no plain float32 linear layer")
        if why is None and self.mode == "auto" and sum(m.weight.numel() * 4 for m in found) < LEAST_BYTES:
            why = f"the model's linear layers hold under {LEAST_BYTES >> 20} MB"
        if why is None:
            why = self._build()
        if why is not None:
            if self.mode == "kernel":
                raise ConfigError("layer_gemm", f"cannot use the kernel: {why}")
            self.reason = why
            return
        shapes = {tuple(m.weight.shape) for m in found}
        if self.mode == "kernel":
            self.row_range = dict.fromkeys(shapes, (1, KERNEL_ROWS))
        else:
            self.row_range = {s: r for s, r in sorted(self._measured(found).items()) if r[1]}
        self._forwards = [
            (m, self._forward_of(m, *self.row_range[tuple(m.weight.shape)]))
            for m in found
            if tuple(m.weight.shape) in self.row_range
        ]
        if not self._forwards:
            self.reason = "the kernel was not faster on this machine"

    def _build(self) -> str | None:
        try:
            self._ext = load()
        except Exception as e:  # no compiler, no ninja: auto falls back to F.linear
            return (
                f"the kernel did not build ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            )
        return None

    def _measured(self, found: list[nn.Linear]) -> dict[tuple[int, int], tuple[int, int]]:
        """Per weight shape, the rows the kernel takes (measured once per process and thread
        count: every engine of the process then makes the same choice)."""
        threads = torch.get_num_threads()
        shapes = {tuple(m.weight.shape) for m in found}
        if any((s, threads) not in _MEASURED for s in shapes):
            for s, r in self._measure(found).items():
                _MEASURED[(s, threads)] = r
        return {s: _MEASURED[(s, threads)] for s in shapes}

    def _measure(self, found: list[nn.Linear]) -> dict[tuple[int, int], tuple[int, int]]:
        """Per weight shape, the row counts ``(fewest, most)`` (``(0, 0)``: none) of the first
        run of candidate row counts where the kernel beats ``F.linear`` by ``MARGIN``: both
        products over the model's first ``SWEEP_BYTES`` of layers, in order, sweeps interleaved,
        the best of ``REPEATS``. A run may start above one row (a weight whose rows are long
        can stream as fast through MKL's one-row product), and ends where the kernel first loses
        after it."""
        chosen = sweep_layers(found)
        best = dict.fromkeys((tuple(m.weight.shape) for m in found), (0, 0))
        alive = set(best)
        previous = 0
        gen = torch.Generator().manual_seed(0)

        def kernel(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return self._ext.few_rows_linear(x, w, None)

        firsts = list({tuple(m.weight.shape): m for m in chosen}.values())  # one layer per shape
        with torch.no_grad():
            for rows in CANDIDATE_ROWS:
                xs = {k: torch.randn(rows, k, generator=gen) for k in {m.in_features for m in chosen}}
                sweep(firsts, xs, F.linear)  # untimed: oneDNN builds its primitive per row count
                plain, ours = [], []
                for _ in range(REPEATS):
                    plain.append(sweep(chosen, xs, F.linear))
                    ours.append(sweep(chosen, xs, kernel))
                for s in list(alive):
                    wins = min(t[s] for t in plain) > MARGIN * min(t[s] for t in ours)
                    if wins:
                        best[s] = (best[s][0] or previous + 1, rows)
                    elif best[s][1]:  # the run is over
                        alive.discard(s)
                if not alive:
                    break
                previous = rows
        return best

    def active(self):
        """The layers multiply with the kernel inside this block (those it is used for)."""
        return installed(self._forwards)

    def _forward_of(self, m: nn.Linear, fewest: int, most: int):
        def forward(x: torch.Tensor) -> torch.Tensor:
            w = m.weight
            if (
                x.dtype is not torch.float32
                or not fewest * w.shape[1] <= x.numel() <= most * w.shape[1]
                or torch.is_grad_enabled()
                or w.dtype is not torch.float32
                or not w.is_contiguous()
            ):
                return F.linear(x, w, m.bias)
            return self._ext.few_rows_linear(x, w, m.bias)

        return forward


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
    "layers",
    "load",
    "sweep",
    "sweep_layers",
    "unsupported",
]
