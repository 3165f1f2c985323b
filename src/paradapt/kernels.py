"""Batched bottleneck math for mixed batches, and the measured choice between its strategies.

Rows arrive sorted by adapter slot (:class:`~paradapt.banks.Segments`). With
``W_d[g]: [d_in, r]`` and ``W_u[g]: [r, d_out]`` the weights of slot ``g`` the
delta of a row using slot ``g`` is ``s_g * act(x W_d[g] + b_d[g]) W_u[g] + b_u[g]``.
Three ways to compute it for all rows at once:

- ``segments``: one matmul pair per segment on views of the bank (Punica's SGMV
  semantics as a loop; no weight copies, one launch pair per distinct adapter);
- ``grouped``: the same segments in one ``torch.nn.functional.grouped_mm`` call
  per matrix (SGMV proper), after compacting the bank to the slots present;
- ``gather``: gather each row's weights and ``bmm`` (Punica's BGMV; best for
  small decode batches where rows and segments are few);
- ``kernel``: Punica's BGMV without the copies: a C++ kernel (``csrc/bgmv.cpp``) reads each
  row's matrices where the bank holds them (CPU; a candidate once :func:`enable_native` has
  built or loaded it, which the serving engine does at start).

Which one is fastest depends on device, dtype and shape, so it is *measured*:
the first time a shape class is seen every strategy runs and is timed, the
fastest is remembered for that class (see :func:`choices`). :func:`force`
pins one strategy (tests use it to check all three against the reference).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from . import native

STRATEGIES = ("segments", "grouped", "gather", "kernel")

_table: dict[tuple, str] = {}
_timings: dict[tuple, dict[str, float]] = {}
_unsupported: set[tuple] = set()  # (strategy, shape key) that raised once
_forced: list[str] = []
#: Timed calls per strategy when a shape class is first seen, in rounds over the strategies; the
#: fastest call counts. Two back-to-back calls per strategy picked `gather` in one run and
#: `grouped` in the next for the same decode shape on a noisy 2-core VM (2026-12-06).
TIMED_ROUNDS = 3


def _bucket(n: int) -> int:
    """Round up to a power of two, so nearby batch sizes share one measurement."""
    return 1 << max(0, (n - 1).bit_length())


def shape_key(device: torch.device, dtype: torch.dtype, rows: int, tokens: int, groups: int, dims) -> tuple:
    return (device.type, dtype, _bucket(rows), _bucket(tokens), _bucket(groups), *dims)


@contextlib.contextmanager
def force(strategy: str | None) -> Iterator[None]:
    """Use one strategy for every bank inside the block (``None``: measure as usual)."""
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    _forced.append(strategy)
    try:
        yield
    finally:
        _forced.pop()


def forced() -> str | None:
    """The strategy :func:`force` pins now, if any."""
    return _forced[-1] if _forced else None


def choices() -> dict[tuple, str]:
    """The strategy picked per shape class so far: (device, dtype, rows, tokens, groups, dims...)."""
    return dict(_table)


def timings() -> dict[tuple, dict[str, float]]:
    """Seconds each strategy took when its shape class was measured."""
    return {k: dict(v) for k, v in _timings.items()}


_native_error: list[str | None] = []  # the outcome of the first enable_native in this process


def enable_native() -> str | None:
    """Build (first time on a machine, 30-60 s) or load the C++ ``kernel`` strategy, so that banks
    measure it too. Returns ``None``, or why it cannot be had here (no compiler, no ``ninja``);
    a failed build is not retried in this process."""
    if not _native_error:
        try:
            native.BGMV.load()
            _native_error.append(None)
        except Exception as exc:  # noqa: BLE001 - any build failure means: measure the other strategies
            text = str(exc).strip()
            _native_error.append(f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}")
    return _native_error[0]


def native_ready(device: torch.device) -> bool:
    """Whether the ``kernel`` strategy is a candidate on ``device``: a CPU, and the kernel loaded
    (or pinned by :func:`force`, which builds it if need be)."""
    return device.type == "cpu" and (native.BGMV.loaded or forced() == "kernel")


def reset() -> None:
    """Forget all measurements (for benchmarks that want a cold start)."""
    _table.clear()
    _timings.clear()
    _unsupported.clear()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chosen(key: tuple, device: torch.device) -> str | None:
    """The strategy :func:`run` would call for ``key`` without measuring: the pinned one, else
    the one measured for it (None: not measured yet)."""
    pinned = forced()
    if pinned is not None:
        return pinned if pinned != "kernel" or native_ready(device) else "segments"
    return _table.get(key)


def run(
    key: tuple,
    device: torch.device,
    strategies: Callable[[], tuple[str, ...]],
    make: Callable[[str], Callable[[], torch.Tensor]],
) -> torch.Tensor:
    """Run the strategy chosen for ``key`` (``make(name)`` gives its call), measuring each of
    ``strategies()`` the first time. Once a shape class is measured only the chosen call is made
    (it can run: what may run depends only on what the key holds, and a loaded kernel stays): a
    decode step asks this at every site, so a hit costs one lookup."""
    pinned = forced()
    if pinned is not None:  # a strategy that cannot run this shape falls back to segments
        return make(pinned if pinned in strategies() else "segments")()
    pick = _table.get(key)
    if pick is not None:
        return make(pick)()
    usable = {n: make(n) for n in strategies() if (n, key) not in _unsupported}
    outs: dict[str, torch.Tensor] = {}
    for name, fn in list(usable.items()):
        try:
            outs[name] = fn()  # warm-up; also where an unsupported dtype/device shows itself
        except (RuntimeError, NotImplementedError):
            _unsupported.add((name, key))
            del usable[name]
    if not usable:
        raise RuntimeError(f"no batched adapter strategy works for shape class {key}")
    times = {name: float("inf") for name in usable}
    for _ in range(TIMED_ROUNDS):  # rounds over all strategies: a burst of noise hits one round, not one strategy
        for name, fn in usable.items():
            _sync(device)
            t0 = time.perf_counter()
            outs[name] = fn()
            _sync(device)
            times[name] = min(times[name], time.perf_counter() - t0)
    best = min(times, key=times.__getitem__)
    _table[key], _timings[key] = best, times
    return outs[best]


# -- the strategies ----------------------------------------------------------------------
# x: [n, T, d_in] rows sorted by slot; wd: [S, d_in, r]; wu: [S, r, d_out].
# ``post(a)`` adds the down bias, applies the activation and the per-row scale to a: [n, T, r].


def segments(x, wd, wu, slots: list[int], counts: list[int], post) -> torch.Tensor:
    """One matmul pair per segment, on views of the bank."""
    parts_a, start = [], 0
    for g, c in zip(slots, counts, strict=True):
        parts_a.append(torch.matmul(x[start : start + c], wd[g]))
        start += c
    a = post(torch.cat(parts_a) if len(parts_a) > 1 else parts_a[0])
    outs, start = [], 0
    for g, c in zip(slots, counts, strict=True):
        outs.append(torch.matmul(a[start : start + c], wu[g]))
        start += c
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def grouped_ok(x: torch.Tensor, r: int, d_out: int) -> bool:
    """Grouped GEMMs need every row stride to be a multiple of 16 bytes."""
    size = x.element_size()
    return hasattr(F, "grouped_mm") and all(d * size % 16 == 0 for d in (x.shape[-1], r, d_out))


def grouped(x, wd, wu, present: torch.Tensor | None, offs: torch.Tensor, post) -> torch.Tensor:
    """Both matmuls as one grouped GEMM each over the slots present (``present=None``: all)."""
    if present is not None:
        wd, wu = wd.index_select(0, present), wu.index_select(0, present)
    n, t, d = x.shape
    a = F.grouped_mm(x.reshape(n * t, d), wd, offs=offs)
    a = post(a.view(n, t, -1))
    return F.grouped_mm(a.reshape(n * t, -1), wu, offs=offs).view(n, t, -1)


def gather(x, wd, wu, row_slot: torch.Tensor, post) -> torch.Tensor:
    """Each row's own weights, gathered, then two batched matmuls."""
    a = post(torch.bmm(x, wd.index_select(0, row_slot)))
    return torch.bmm(a, wu.index_select(0, row_slot))


def kernel(x, wd, wu, row_slot: torch.Tensor, post) -> torch.Tensor:
    """:func:`gather`'s products, each row's weights read in place by the C++ kernel."""
    ext = native.BGMV.load()
    return ext.expand(post(ext.shrink(x, wd, row_slot)), wu, row_slot)
