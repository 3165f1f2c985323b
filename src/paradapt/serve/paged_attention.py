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
It needs a C++ compiler at run time. :class:`DecodeAttention` picks the implementation
(``auto``: compiled where a warm-up compile succeeds, else the gather; ``compiled``: an error
when it cannot; ``gather``), and its warm-up runs when the engine starts, not on a request.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import ConfigError
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


class DecodeAttention:
    """The decode attention a Runner uses: ``mode`` ``auto`` | ``compiled`` | ``gather``.

    :meth:`warm_up` compiles for the model's shapes before any request (seconds the first time
    in a process; inductor's on-disk cache makes later processes faster). ``auto`` falls back to
    the gather, with one warning, when that fails (no C++ compiler, an unsupported platform).
    """

    def __init__(self, mode: str = "auto"):
        if mode not in MODES:
            raise ConfigError("decode_attention", f"must be one of {list(MODES)}, got {mode!r}")
        self.mode = mode
        self.attend: Attend = gather_attention if mode == "gather" else paged_attention
        self.error: str | None = None  # why ``auto`` fell back to the gather

    @property
    def compiled(self) -> bool:
        return self.attend is paged_attention

    def warm_up(self, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Compile for these shapes now (a no-op for ``gather`` and off the CPU)."""
        if not self.compiled:
            return
        if device.type != "cpu":
            self.attend = gather_attention
            return
        g = torch.Generator().manual_seed(0)
        q = torch.randn(3, heads, dim, generator=g).to(dtype)
        cache = [torch.randn(12, kv_heads, dim, generator=g).to(dtype) for _ in range(2)]
        where = torch.arange(9).view(3, 3)
        valid = torch.ones(3, 3, dtype=torch.bool)
        try:
            with torch.no_grad():
                got = paged_attention(q, *cache, where, valid, dim**-0.5)
            want = gather_attention(q, *cache, where, valid, dim**-0.5)
            if not torch.allclose(got.float(), want.float(), atol=1e-2 if dtype != torch.float32 else 1e-4):
                raise RuntimeError("the compiled decode attention disagrees with the gather + SDPA reference")
        except Exception as e:  # noqa: BLE001 - any compiler failure means: use the gather
            if self.mode == "compiled":
                raise ConfigError("decode_attention", f"the compiled decode attention is unavailable: {e}") from e
            self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(
                f"paradapt: compiled decode attention unavailable ({self.error}); using gather + SDPA",
                stacklevel=2,
            )
            self.attend = gather_attention


__all__ = ["MODES", "DecodeAttention", "gather_attention", "paged_attention"]
