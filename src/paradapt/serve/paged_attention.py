"""Decode attention over the paged KV cache: each request's single query against its own keys.

A decode step (one new token per request) attends B queries, each over the keys of its own
request, which live in pages scattered through the cache. :func:`gather_attention` copies every
request's keys and values into a padded ``[B, Hkv, L, D]`` block, then runs one batched SDPA.
On a CPU that copy is as expensive as the attention itself: profiled on the random Llama of
``benchmarks/vs_vllm.py`` (32 requests, 8 layers, 1 thread), the two ``index_select`` calls
per layer took 26 % of a decode step and SDPA 16 %.

:func:`paged_attention` does the same arithmetic without the copy: written as broadcast
products and sums over the gathered view, ``torch.compile`` (inductor's C++ backend) turns it
into loops that load each key and value straight from its page (vLLM's CPU backend reads its
pages in place with hand-written kernels; this gets there with the compiler). Measured in
isolation (B=32, 8 heads of 64, 1 thread) it ran 3-7x faster than gather + SDPA at 64-512 keys.

The compiled function is built once per process and specialises per model shape; steps pad
to at least 2 requests and 2 keys (masked), so the sizes 0 and 1 never cost a recompile.

The compiled loops still read each value once per 16-float slice of the head dimension (the
reduction over keys is innermost), and every request up to the batch's longest. A hand-written
C++ kernel (``csrc/paged_decode.cpp``, built by serve/decode_kernel.py) streams each key and
value row once and stops at each request's length: :func:`kernel_attention`, about 2x the
compiled version per attention call and 1.08x per whole decode step on the random Llama
(``benchmarks/decode_attention.py``; in a step the call is bound by reading the cache from DRAM).
Its float32 path (head sizes divisible by 8) sums eight keys' scores and takes eight ``exp`` at
once: a further 1.05-1.08x per decode step.

Both need a C++ compiler at run time (the kernel also ``ninja``). :class:`DecodeAttention`
picks the implementation: ``auto`` takes the first of kernel, compiled, gather whose warm-up
succeeds; ``kernel`` and ``compiled`` are errors when they cannot run; ``gather`` never
compiles. The warm-up runs when the engine starts, not on a request.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import decode_kernel
from .core import DECODE_ATTENTION as MODES

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def gather_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, where: torch.Tensor, valid: torch.Tensor, scale: float
) -> torch.Tensor:
    """``q [B, H, D]`` over the cache rows ``where [B, L]`` (``valid [B, L]`` masks the padding)
    of ``k_cache``/``v_cache [N, Hkv, D]``: copy the rows out, then one batched SDPA. ``[B, H, D]``."""
    b, length = where.shape
    heads_kv, dim = k_cache.shape[1], k_cache.shape[2]
    flat = where.reshape(-1)
    k = k_cache.index_select(0, flat).view(b, length, heads_kv, dim).transpose(1, 2)
    v = v_cache.index_select(0, flat).view(b, length, heads_kv, dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=q.shape[1] != heads_kv
    )
    return out.squeeze(2)


def _in_place(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, where: torch.Tensor, valid: torch.Tensor, scale: float
) -> torch.Tensor:
    """The arithmetic of :func:`gather_attention` as products and sums over the indexed cache,
    so the compiler fuses the indexing into the loops (no ``[B, L, Hkv, D]`` copy is made).
    Grouped heads: query head ``h`` reads KV head ``h // (H / Hkv)``, as SDPA's ``enable_gqa``."""
    b, h, d = q.shape
    heads_kv = k_cache.shape[1]
    qg = q.float().view(b, 1, heads_kv, h // heads_kv, d)
    k = k_cache[where].float()  # [B, L, Hkv, D], a view the compiler reads in place
    v = v_cache[where].float()
    scores = (qg * k[:, :, :, None, :]).sum(-1) * scale  # [B, L, Hkv, G]
    scores = scores.masked_fill(~valid[:, :, None, None], float("-inf"))
    weights = torch.softmax(scores, dim=1)
    out = (weights[..., None] * v[:, :, :, None, :]).sum(1)  # [B, Hkv, G, D]
    return out.reshape(b, h, d).to(q.dtype)


_compiled: Attend | None = None
_compile_lock = threading.Lock()


def _compiled_fn() -> Attend:
    global _compiled
    with _compile_lock:
        if _compiled is None:
            _compiled = torch.compile(_in_place, dynamic=True)
        return _compiled


def _at_least_two(where: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to >= 2 requests and >= 2 keys (masked): the compiled code is traced with symbolic
    sizes, and a size of 1 would be specialised into a second compilation."""
    b, length = where.shape
    if length < 2:
        where = torch.cat([where, where[:, :1]], dim=1)
        valid = torch.cat([valid, torch.zeros_like(valid[:, :1])], dim=1)
    if b < 2:
        where = torch.cat([where, where[:1]], dim=0)
        valid = torch.cat([valid, valid[:1]], dim=0)
    return where, valid


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, where: torch.Tensor, valid: torch.Tensor, scale: float
) -> torch.Tensor:
    """:func:`gather_attention`'s result, computed by the compiled in-place kernel."""
    b = q.shape[0]
    where, valid = _at_least_two(where, valid)
    if where.shape[0] != b:
        q = torch.cat([q, q[:1]], dim=0)
    return _compiled_fn()(q, k_cache, v_cache, where, valid, float(scale))[:b]


def kernel_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, where: torch.Tensor, valid: torch.Tensor, scale: float
) -> torch.Tensor:
    """:func:`gather_attention`'s result, computed by the C++ kernel (serve/decode_kernel.py)."""
    return decode_kernel.load().paged_decode(q, k_cache, v_cache, where, valid, float(scale))


#: each implementation by its mode name, and the order ``auto`` tries them in
IMPLEMENTATIONS: dict[str, Attend] = {
    "kernel": kernel_attention,
    "compiled": paged_attention,
    "gather": gather_attention,
}


class DecodeAttention:
    """The decode attention a Runner uses: ``mode`` ``auto`` | ``kernel`` | ``compiled`` | ``gather``.

    :meth:`warm_up` builds or compiles for the model's shapes before any request (a minute for
    the kernel's first build on a machine, seconds for inductor's first compile in a process;
    both are cached on disk). ``auto`` takes the first of kernel, compiled, gather that works,
    with one warning naming what failed (no C++ compiler, no ``ninja``, another platform).
    """

    def __init__(self, mode: str = "auto"):
        if mode not in MODES:
            raise ConfigError("decode_attention", f"must be one of {list(MODES)}, got {mode!r}")
        self.mode = mode
        self.attend: Attend = IMPLEMENTATIONS.get(mode, kernel_attention)  # auto: the first to try
        self.error: str | None = None  # why ``auto`` did not get the kernel (or the compiled version)

    @property
    def used(self) -> str:
        """The implementation in use: ``kernel``, ``compiled`` or ``gather``."""
        return next(name for name, fn in IMPLEMENTATIONS.items() if fn is self.attend)

    @property
    def compiled(self) -> bool:
        """Whether the cache is read in place (the kernel or the compiled version), not copied."""
        return self.attend is not gather_attention

    def warm_up(self, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Build or compile for these shapes now (``gather`` needs nothing; off the CPU, the gather)."""
        if device.type != "cpu":
            self.attend = gather_attention
            return
        tries = list(IMPLEMENTATIONS) if self.mode == "auto" else [self.mode]
        failures = []
        for name in tries:
            fn = IMPLEMENTATIONS[name]
            try:
                if fn is not gather_attention:
                    _check(fn, heads, kv_heads, dim, dtype)
            except Exception as e:  # noqa: BLE001 - any build or compile failure means: try the next
                if self.mode != "auto":
                    raise ConfigError("decode_attention", f"the {name} decode attention is unavailable: {e}") from e
                failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            self.attend = fn
            break
        if failures:
            self.error = "; ".join(failures)
            warnings.warn(f"paradapt: decode attention {self.used}, the others failed ({self.error})", stacklevel=2)


def _check(fn: Attend, heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> None:
    """Run ``fn`` once on random data with these shapes (building or compiling it) and compare
    with the gather + SDPA reference: a wrong build is as unusable as a missing one."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, heads, dim, generator=g).to(dtype)
    cache = [torch.randn(12, kv_heads, dim, generator=g).to(dtype) for _ in range(2)]
    where = torch.arange(9).view(3, 3)
    valid = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    with torch.no_grad():
        got = fn(q, *cache, where, valid, dim**-0.5)
    want = gather_attention(q, *cache, where, valid, dim**-0.5)
    if not torch.allclose(got.float(), want.float(), atol=1e-2 if dtype != torch.float32 else 1e-4):
        raise RuntimeError("it disagrees with the gather + SDPA reference")


__all__ = ["IMPLEMENTATIONS", "MODES", "DecodeAttention", "gather_attention", "kernel_attention", "paged_attention"]
