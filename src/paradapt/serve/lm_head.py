"""The LM head's matrix product in serving steps: ``F.linear`` or a weight prepacked for oneDNN.

Why: on a CPU a decode step of a small model with a large vocabulary spends a big share of its
time in one product, the LM head's ``[rows, hidden] x [vocab, hidden]^T`` (SmolLM2-135M: 49,152 x
576, 113 MB of float32 read every step). ``F.linear`` hands it to MKL's sgemm, which packs that
weight again on every call; at 2-32 rows that repacking is most of the product's time. vLLM's
CPU backend keeps its linear weights prepacked for oneDNN once at load
(``dispatch_cpu_unquantized_gemm``); torch exposes the same through
``torch.ops.mkldnn._reorder_linear_weight`` and ``_linear_pointwise``. Measured on a 2-core AMD
EPYC (AVX2, one thread): the head's product 1.5-2.0x faster at 2-64 rows and unchanged at 1 row
(``benchmarks/linear_backends.py --model smollm2-135m-instruct``); the other layers' weights are
small enough for MKL's own packing to stay in cache, and prepacking them gained nothing there.

The cost is memory: the packed copy is a second copy of the head's weight (the original stays:
a tied head is also the input embedding). ``auto`` therefore measures the two products on the
model's own weight when the engine starts (heads of 16 MB and more) and keeps the packed copy
only for the row counts where it is clearly faster; ``linear`` never packs; ``packed`` always does (where it can).

A head whose float32 weights lie exactly on an int8 grid with one scale per 32 inputs (a GGUF
file's Q8_0 head, as SmolLM2's: :func:`paradapt.quantized.int8_grid` finds it from the weights)
is the same weight in a quarter of the bytes. ``auto`` then also keeps that int8 form (28 MB for
SmolLM2) and multiplies few rows with paradapt's int8 kernel (``csrc/int8_rows.cpp``) up to the
row count where a measurement at start finds it faster: on the 2-core AMD EPYC (Zen 4), 2.7 ms at
one row against 7.7 packed and 9.5 ms for ``F.linear``. The logits differ from ``F.linear``'s by
the order of the sums only, like any other product. ``int8`` uses it at every row count.

The product is installed only for the duration of a step (:meth:`HeadProduct.active`),
as an instance ``forward`` of the head module, so the model is unchanged outside the engine's
steps and hooks on the head still run. A weight changed in place (a new ``_version``) or replaced
is packed again before its next use.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import quantized
from ..errors import ConfigError
from .core import LM_HEAD_GEMM as MODES
from .layer_gemm import pack, packed_linear
from .step_forwards import installed

MARGIN = 1.05  # auto packs only where packed is at least this much faster: noise must not flip it
# auto measures only heads at least this large: a smaller weight stays in cache between MKL's own
# packings (prepacking a 512 x 1344 layer gained nothing, linear_backends.py), and skipping the
# measurement keeps a small model's engine start instant
LEAST_BYTES = 16 << 20
INT8_SAMPLES = (1, 2, 4, 8, 16, 32, 64)  # row counts auto times the int8 product at (up to ``rows``)


def packable(head: nn.Module | None) -> str | None:
    """Why ``head`` cannot be prepacked, or None when it can."""
    if type(head) is not nn.Linear:
        return "the LM head is not a plain nn.Linear"
    w = head.weight
    if w.device.type != "cpu":
        return f"the LM head is on {w.device.type}"
    if w.dtype not in (torch.float32, torch.bfloat16):
        return f"the LM head is {w.dtype}"
    if not torch.backends.mkldnn.is_available():
        return "this torch has no oneDNN"
    return None


class HeadProduct:
    """How the served model's LM head multiplies: ``mode`` ``auto`` | ``packed`` | ``int8`` | ``linear``.

    ``rows``: the rows a busy step sends to the head (the engine's ``max_running``), the size the
    weight is packed for and ``auto`` measures up to. After :meth:`prepare`, ``int8_rows`` is the
    most rows that take the int8 product (0: never) and ``min_rows`` the fewest rows that take
    the packed product (None: never); rows between take ``F.linear``.
    """

    def __init__(self, mode: str = "auto", rows: int = 32):
        if mode not in MODES:
            raise ConfigError("lm_head_gemm", f"must be one of {list(MODES)}, got {mode!r}")
        self.mode = mode
        self.rows = max(2, int(rows))
        self.head: nn.Linear | None = None
        self.min_rows: int | None = None
        self.int8_rows = 0
        self.reason: str | None = None  # why neither faster product is used, when none is
        self._packed: torch.Tensor | None = None
        self._int8: tuple[torch.Tensor, torch.Tensor] | None = None  # (q, scales) on the head's grid
        self._key: tuple[int, int] | None = None

    @property
    def used(self) -> str:
        """``int8 up to N rows``, ``packed from N rows``, both (``, ``), or ``linear``."""
        parts = []
        if self.int8_rows:
            parts.append(
                "int8 at every row count"
                if self.int8_rows >= INT8_ALWAYS
                else f"int8 up to {self.int8_rows} rows"
            )
        if self.min_rows is not None:
            parts.append(f"packed from {max(self.min_rows, self.int8_rows + 1)} rows")
        return ", ".join(parts) or "linear"

    def prepare(self, model: nn.Module) -> None:
        """Find the head, make its faster forms and (``auto``) measure where each pays."""
        if self.mode == "linear":
            self.reason = "lm_head_gemm=linear"
            return
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if self.mode == "int8":
            return self._prepare_int8(head)
        why = packable(head)
        if why is not None:
            if self.mode == "packed":
                raise ConfigError("lm_head_gemm", f"cannot pack the LM head: {why}")
            self.reason = why
            return
        if self.mode == "auto" and head.weight.numel() * head.weight.element_size() < LEAST_BYTES:
            self.reason = f"the LM head is under {LEAST_BYTES >> 20} MB"
            return
        self.head = head
        self._pack()
        self.min_rows = 1 if self.mode == "packed" else self._measure()
        if self.mode == "auto":
            self._int8 = _int8_form(head)
            self.int8_rows = self._measure_int8() if self._int8 is not None else 0
            if not self.int8_rows:
                self._int8 = None
            if self.min_rows is not None and self.int8_rows >= self.rows:
                self.min_rows = None  # int8 takes every row count a step sends: no packed copy
        if self.min_rows is None:  # no gain from packing: do not keep the copy
            self._packed = None
            self.reason = None if self.int8_rows else "packed was not faster on this machine"
        if self.min_rows is None and not self.int8_rows:
            self.head, self._key = None, None

    def _prepare_int8(self, head: nn.Module | None) -> None:
        if type(head) is not nn.Linear:
            why = "the LM head is not a plain nn.Linear"
        elif head.weight.device.type != "cpu" or head.weight.dtype != torch.float32:
            why = f"the LM head is {head.weight.dtype} on {head.weight.device.type}, not float32 on the CPU"
        else:
            why = None
        if why is None:
            self._int8 = _int8_form(head)
            if self._int8 is None:
                why = "its weights are not on an int8 grid of groups of 32 (a GGUF Q8_0 head)"
                why = why if quantized.int8_rows_usable() else "paradapt's int8 kernel does not run here"
        if why is not None:
            raise ConfigError("lm_head_gemm", f"cannot multiply the LM head in int8: {why}")
        self.head, self.int8_rows = head, INT8_ALWAYS
        self._key = (head.weight.data_ptr(), head.weight._version)

    def _pack(self) -> None:
        w = self.head.weight
        self._packed = pack(w, self.rows)
        self._key = (w.data_ptr(), w._version)

    def _measure(self) -> int | None:
        """The fewest rows (1 or 2) from which packed beats ``F.linear`` by ``MARGIN`` on this
        weight, timed interleaved, best of 3; None if it does not at ``rows`` rows."""
        w = self.head.weight
        gen = torch.Generator().manual_seed(0)
        wins = {}
        for rows in (1, self.rows):
            x = torch.randn(rows, w.shape[1], generator=gen).to(w.dtype)
            plain, packed = [], []
            with torch.no_grad():
                for _ in range(3):
                    plain.append(timed(lambda x=x: F.linear(x, w, self.head.bias)))
                    packed.append(timed(lambda x=x: self._product(x)))
            wins[rows] = min(plain) > MARGIN * min(packed)
        if not wins[self.rows]:
            return None
        return 1 if wins[1] else 2

    def _measure_int8(self) -> int:
        """The most rows (one of ``INT8_SAMPLES``) up to which the int8 product beats what would
        multiply them otherwise (packed or ``F.linear``) by ``MARGIN`` at every sample, timed
        interleaved, best of 3; 0 if it does not at one row."""
        w = self.head.weight
        gen = torch.Generator().manual_seed(1)
        best, samples = 0, [r for r in INT8_SAMPLES if r <= self.rows]
        for rows in samples:
            x = torch.randn(rows, w.shape[1], generator=gen)
            other = self._other(rows)
            theirs, ours = [], []
            with torch.no_grad():
                for _ in range(3):
                    theirs.append(timed(lambda x=x, other=other: other(x)))
                    ours.append(timed(lambda x=x: self._int8_product(x)))
            if min(theirs) <= MARGIN * min(ours):
                break
            best = rows
        return self.rows if best == samples[-1] else best  # faster at every sample: every row count

    def _other(self, rows: int):
        """What multiplies ``rows`` rows when the int8 product does not."""
        if self.min_rows is not None and rows >= self.min_rows:
            return self._product
        return lambda x: F.linear(x, self.head.weight, self.head.bias)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self._packed, self.head.bias)

    def _int8_product(self, x: torch.Tensor) -> torch.Tensor:
        y = quantized.int8_rows().int8_rows_linear(x, *self._int8)
        return y if self.head.bias is None else y + self.head.bias

    def _refresh(self) -> None:
        """The weight changed in place or was replaced: pack it again, find its grid again."""
        if self._packed is not None:
            self._pack()
        if self._int8 is not None:
            self._int8 = _int8_form(self.head)
            if self._int8 is None:  # off the grid now: F.linear (or packed) from here on
                self.int8_rows = 0
        w = self.head.weight
        self._key = (w.data_ptr(), w._version)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        head = self.head
        if torch.is_grad_enabled() or x.dtype != head.weight.dtype:
            return F.linear(x, head.weight, head.bias)
        w = head.weight
        if (w.data_ptr(), w._version) != self._key:
            self._refresh()
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if 0 < rows <= self.int8_rows:
            return self._int8_product(x)
        if self.min_rows is not None and rows >= self.min_rows:
            return self._product(x)
        return F.linear(x, head.weight, head.bias)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The head multiplies with its faster forms inside this block (when any is used)."""
        if self.head is None:
            yield
            return
        with installed([(self.head, self._forward)]):
            yield


INT8_ALWAYS = 1 << 62  # int8_rows meaning every row count (mode int8)


def _int8_form(head: nn.Linear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The head's weight as int8 and group scales, when it lies on such a grid and the kernel runs."""
    w = head.weight
    if w.dtype != torch.float32 or w.device.type != "cpu" or not quantized.int8_rows_usable():
        return None
    return quantized.int8_grid(w.detach())


def timed(fn, least: float = 0.002) -> float:
    """Seconds per call of ``fn``, over as many calls as take ``least`` seconds (after one
    untimed call: oneDNN builds its primitive for a new row count on the first)."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        spent = time.perf_counter() - t0
        if spent >= least:
            return spent / calls
