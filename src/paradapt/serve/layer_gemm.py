"""The model's linear layers in serving steps with few rows: ``F.linear`` or a C++ kernel.

Why: a decode step at low load (one chat, a few concurrent requests) multiplies 1-16 rows by
every weight of the model. ``F.linear`` hands that to MKL's sgemm, which packs the weight into
its own panel layout on every call; with a handful of rows the packing is most of the work.
``csrc/few_rows.cpp`` reads each weight row once where it lies (nn.Linear's own ``[out, in]``
layout, no copy) and keeps a 4 x 3 tile of sums in registers. Measured on a 2-core AMD EPYC
(AVX2, one thread; ``benchmarks/layer_gemm.py``): the products 1.2-2x faster at 1-8 rows, even
around 16, slower than MKL from about 24 rows, so only steps with few rows take it.

Every output of the kernel is the same computation whatever the number of rows or threads, so
a request's logits do not change with how many others share its step while the kernel runs
them (MKL picks different code paths by row count).

``auto`` measures both products on each distinct weight shape of the model when the engine
starts and keeps the kernel for the row counts (from 1 up) where it is clearly faster;
``kernel`` uses it up to :data:`KERNEL_ROWS` rows (an error where it cannot be built); ``linear``
never uses it. Like the LM head's product (:mod:`paradapt.serve.lm_head`), the kernel is
installed only for the duration of a step (serve/step_forwards.py), as an instance ``forward``
of each plain float32 ``nn.Linear`` of the model (the LM head excepted), so the model is unchanged outside the
engine's steps and the hooks that add adapters still run. Steps that need a gradient, or other
dtypes, go to ``F.linear``.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..errors import ConfigError
from .core import LAYER_GEMM as MODES
from .lm_head import timed
from .step_forwards import installed

MARGIN = 1.05  # auto takes the kernel only where it is at least this much faster: noise must not flip it
KERNEL_ROWS = 16  # ``kernel`` mode's limit, where it still matched MKL on the machine measured
# row counts auto measures, in order; it keeps the kernel up to the last one before it first loses
CANDIDATE_ROWS = (1, 2, 4, 8, 12, 16, 24, 32)
# auto measures only models whose linear layers hold at least this much: a tiny model's step is
# call overhead either way, and skipping keeps a small engine's start instant
LEAST_BYTES = 8 << 20
# what auto measured in this process, per (weight shape, torch threads): every engine of a process
# (the twin's profile runs many) then makes the same choice, which the cost model records
_MEASURED: dict[tuple[tuple[int, int], int], int] = {}

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

    After :meth:`prepare`, ``max_rows`` maps each weight shape ``(out, in)`` that takes the
    kernel to the most rows it takes it for; ``reason`` says why none does, when none does.
    """

    def __init__(self, mode: str = "auto"):
        if mode not in MODES:
            raise ConfigError("layer_gemm", f"must be one of {list(MODES)}, got {mode!r}")
        self.mode = mode
        self.max_rows: dict[tuple[int, int], int] = {}
        self.reason: str | None = None
        self._forwards: list[tuple[nn.Linear, object]] = []  # built once, installed for each step
        self._ext: ModuleType | None = None

    @property
    def rows(self) -> int:
        """The most rows any layer multiplies with the kernel (0: none)."""
        return max(self.max_rows.values(), default=0)

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
            self.max_rows = dict.fromkeys(shapes, KERNEL_ROWS)
        else:
            self.max_rows = {s: n for s in sorted(shapes) if (n := self._measured(s))}
        self._forwards = [
            (m, self._forward_of(m, self.max_rows[tuple(m.weight.shape)]))
            for m in found
            if tuple(m.weight.shape) in self.max_rows
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

    def _measured(self, shape: tuple[int, int]) -> int:
        key = (shape, torch.get_num_threads())
        if key not in _MEASURED:
            _MEASURED[key] = self._measure(shape)
        return _MEASURED[key]

    def _measure(self, shape: tuple[int, int]) -> int:
        """The most rows (0: none) up to which the kernel beats ``F.linear`` by ``MARGIN`` at
        every candidate row count, timed interleaved, best of 3, on a weight of this shape."""
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(shape, generator=gen)
        best = 0
        with torch.no_grad():
            for rows in CANDIDATE_ROWS:
                x = torch.randn(rows, shape[1], generator=gen)
                plain, kernel = [], []
                for _ in range(3):
                    plain.append(timed(lambda x=x: F.linear(x, w)))
                    kernel.append(timed(lambda x=x: self._ext.few_rows_linear(x, w, None)))
                if min(plain) <= MARGIN * min(kernel):
                    break
                best = rows
        return best

    def active(self):
        """The layers multiply with the kernel inside this block (those it is used for)."""
        return installed(self._forwards)

    def _forward_of(self, m: nn.Linear, rows: int):
        def forward(x: torch.Tensor) -> torch.Tensor:
            w = m.weight
            if (
                x.dtype is not torch.float32
                or x.numel() > rows * w.shape[1]
                or torch.is_grad_enabled()
                or w.dtype is not torch.float32
                or not w.is_contiguous()
            ):
                return F.linear(x, w, m.bias)
            return self._ext.few_rows_linear(x, w, m.bias)

        return forward


__all__ = [
    "CANDIDATE_ROWS",
    "KERNEL_ROWS",
    "LayerProduct",
    "MODES",
    "SOURCE",
    "layers",
    "load",
    "unsupported",
]
