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

The packed product is installed only for the duration of a step (:meth:`HeadProduct.active`),
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

from ..errors import ConfigError
from .core import LM_HEAD_GEMM as MODES
from .step_forwards import installed

MARGIN = 1.05  # auto packs only where packed is at least this much faster: noise must not flip it
# auto measures only heads at least this large: a smaller weight stays in cache between MKL's own
# packings (prepacking a 512 x 1344 layer gained nothing, linear_backends.py), and skipping the
# measurement keeps a small model's engine start instant
LEAST_BYTES = 16 << 20


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
    """How the served model's LM head multiplies: ``mode`` ``auto`` | ``packed`` | ``linear``.

    ``rows``: the rows a busy step sends to the head (the engine's ``max_running``), the size the
    weight is packed for and ``auto`` measures at. After :meth:`prepare`, ``min_rows`` is the
    fewest rows that take the packed product (None: never).
    """

    def __init__(self, mode: str = "auto", rows: int = 32):
        if mode not in MODES:
            raise ConfigError("lm_head_gemm", f"must be one of {list(MODES)}, got {mode!r}")
        self.mode = mode
        self.rows = max(2, int(rows))
        self.head: nn.Linear | None = None
        self.min_rows: int | None = None
        self.reason: str | None = None  # why the packed product is not used, when it is not
        self._packed: torch.Tensor | None = None
        self._key: tuple[int, int] | None = None

    @property
    def used(self) -> str:
        """``packed`` (from ``min_rows`` rows on), or ``linear``."""
        return "linear" if self.min_rows is None else f"packed from {self.min_rows} rows"

    def prepare(self, model: nn.Module) -> None:
        """Find the head, pack its weight and (``auto``) measure where packing pays."""
        if self.mode == "linear":
            self.reason = "lm_head_gemm=linear"
            return
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
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
        if self.min_rows is None:  # auto found no gain: do not keep the copy
            self.head, self._packed, self._key = None, None, None
            self.reason = "packed was not faster on this machine"

    def _pack(self) -> None:
        w = self.head.weight
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), self.rows)
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

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(flat, self._packed, self.head.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        head = self.head
        if x.numel() < self.min_rows * x.shape[-1] or torch.is_grad_enabled() or x.dtype != head.weight.dtype:
            return F.linear(x, head.weight, head.bias)
        w = head.weight
        if (w.data_ptr(), w._version) != self._key:  # changed in place or replaced: pack again
            self._pack()
        return self._product(x)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The head multiplies with the packed weight inside this block (when it is used)."""
        if self.min_rows is None:  # also None whenever no head was kept
            yield
            return
        with installed([(self.head, self._forward)]):
            yield


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
