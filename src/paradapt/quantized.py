"""A quantised frozen base: the base's ``nn.Linear`` layers in int4, int8 or bf16.

``quantize(model, "int4")`` replaces each of the base's linears (never an adapter's, nor the
LM head unless asked) by a :class:`QuantLinear` on torch's own CPU kernels:

- int4: asymmetric, groups of ``group_size`` (32, 64, 128 or 256) along the input, packed with
  ``aten._convert_weight_to_int4pack_for_cpu`` and multiplied by
  ``aten._weight_int4pack_mm_for_cpu`` (``w = (q - 8) * scale + zero``, scale and zero in bf16);
- int8: symmetric, one scale per output channel, ``torch._weight_int8pack_mm``;
- bf16: the weight in bf16, ``F.linear``.

All three compute in bf16 (these kernels are 10-30x slower with fp32 activations, and the int4
one refuses them): the input is cast to bf16 and the result back to the input's dtype. The
exception: on a CPU without native bf16 (AVX2), int4 layers multiply float32 rows with
paradapt's own kernel on the same packed bytes (``csrc/int4_rows.cpp``, :func:`int4_rows_usable`). The base
is frozen, so backward gives only the input gradient, from a weight dequantised on the fly; the
adapters above and below a quantised layer train as on an fp32 base (QLoRA-style).

A :class:`QuantLinear` subclasses ``nn.Linear`` (``in_features``/``out_features``, the bias) but
has no float ``weight``: reading it raises an error naming the layer, so merge, fuse and PiSSA
(which rewrite the weight) refuse on a quantised base; :func:`dequantize` gives float32
``nn.Linear`` layers back. The module keeps its name in the model, so adapter sites find it
as before; quantising a model that already has adapters moves their hooks to the new layers.

CPU only for now: the int4/int8 kernels here are torch's CPU ones, and a layer on another
device is refused with an error that says so.
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .errors import ConfigError, QuantizationError

PRECISIONS = ("int4", "int8", "bf16")
INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_N_TILE = 16  # the int4 packing needs out_features divisible by this
ATTR = "_paradapt_quantization"  # model.__dict__: what quantize() did, for adapter metadata


class QuantLinear(nn.Linear):
    """A frozen linear whose weight lives in int4, int8 or bf16; computes in bf16.

    Buffers: ``qweight`` (packed int4 ``uint8 [N, K/2]``, ``int8 [N, K]`` or ``bf16 [N, K]``),
    ``scales`` (int4: ``bf16 [K/g, N, 2]`` scale and zero; int8: ``bf16 [N]``). ``bias`` stays a
    (frozen) float Parameter.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        precision: str,
        group_size: int,
        name: str,
        float_dtype: torch.dtype = torch.float32,
    ):
        nn.Module.__init__(self)  # not nn.Linear.__init__: there is no float weight to allocate
        self.in_features, self.out_features = in_features, out_features
        self.float_dtype = float_dtype  # the replaced weight's dtype: what adapters beside it use
        self.precision, self.group_size, self.layer_name = precision, group_size, name
        self.register_parameter("bias", None)
        self._codes: torch.Tensor | None = None  # int4 codes, uint8 [N, K]: read once, for backward
        self._rows_kernel: tuple[str | None, object] = (None, None)  # (INT4_KERNEL, the product or None)

    # -- the float weight does not exist ------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        raise QuantizationError(
            f"layer {self.layer_name} is quantised ({self.precision}) and has no float weight; "
            "call pa.dequantize(model) first"
        )

    @weight.setter
    def weight(self, value) -> None:
        raise QuantizationError(
            f"layer {self.layer_name} is quantised ({self.precision}); its weight is read-only"
        )

    def reference(self) -> torch.Tensor:
        """An empty tensor with the device and float dtype an adapter beside this layer takes."""
        return torch.empty(0, dtype=self.float_dtype, device=self.qweight.device)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.precision == "int4" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, precision={self.precision}{g}"
        )

    # -- compute --------------------------------------------------------------------------------
    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 [M, K] @ W^T`` with ``x2`` in :meth:`input_dtype`: by this layer's kernel, or for
        ``M >= DEQUANT_ROWS`` (a prefill, a training batch) by a GEMM on the weight dequantised
        for this call (:meth:`call_weight`), in bf16 where the CPU multiplies bf16 natively
        (:func:`native_bf16`) and in float32 elsewhere.

        torch's int4/int8 CPU kernels are built for few rows: measured on one 1536 x 576 layer
        (1 thread, 2026-12-06, Intel Xeon with AMX), int4 takes 0.08 ms at M = 1 (fp32: 0.18) but
        6.5 ms at M = 256 and 13.5 ms at M = 512, where dequantising (~2 ms) and a bf16 GEMM
        (1-2 ms) take 3-4 ms. The dequantised weight equals the kernel's exactly in float32 (and
        is rounded to bf16 for a bf16 GEMM), so rows of such a step see weights within one bf16
        rounding of the kernel's. Without native bf16 a bf16 GEMM is widened to float32 piece by
        piece, 8x slower than float32 itself (AMD EPYC, AVX2, 2026-12-07: 240 against 30 ms at
        M = 1024), so the float32 weight is used there, and an int4 layer's few rows go through
        paradapt's own float32 kernel (:func:`int4_rows`).
        """
        if x2.shape[0] == 0:
            return x2.new_zeros(0, self.out_features)
        if x2.shape[0] >= DEQUANT_ROWS and self.precision != "bf16":
            dtype = gemm_dtype()
            w = self.call_weight(dtype)
            if w is not None:
                return F.linear(x2.to(dtype), w)
        if self.precision == "int4":
            product = self._rows_product()
            if product is not None and x2.dtype == torch.float32:
                return product(x2, self.qweight, self.scales, self.group_size, _layout())
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales)
        if self.precision == "int8":
            return torch._weight_int8pack_mm(x2, self.qweight, self.scales)
        return F.linear(x2, self.qweight)

    def input_dtype(self) -> torch.dtype:
        """What :meth:`matmul` takes: float32 for an int4 layer on paradapt's own kernel
        (:func:`int4_rows_usable`), bf16 otherwise (torch's kernels are 10-30x slower with
        float32 activations, and the int4 one refuses them)."""
        return torch.float32 if self._rows_product() is not None else torch.bfloat16

    def _rows_product(self):
        """paradapt's int4 product when this layer uses it, else None; asked once per layer
        (and again when ``INT4_KERNEL`` changes)."""
        if self._rows_kernel[0] != INT4_KERNEL:
            usable = self.precision == "int4" and int4_rows_usable(
                self.qweight, self.in_features, self.out_features
            )
            self._rows_kernel = (INT4_KERNEL, int4_rows().int4_rows_linear if usable else None)
        return self._rows_kernel[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dtype == torch.float32
            and x.is_cpu
            and x.numel() < DEQUANT_ROWS * self.in_features
            and not (x.requires_grad and torch.is_grad_enabled())
            and self.precision == "int4"
        ):  # a decode step's layer: as few dispatched ops as can be (each costs 1-5 us, 210 a step)
            product = self._rows_product()
            if product is not None:  # one call (any leading shape), no reshapes or casts around it
                y = product(x, self.qweight, self.scales, self.group_size, _layout())
            else:  # torch's kernel: to bf16 and back, nothing else
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x.reshape(-1, self.in_features).to(torch.bfloat16),
                    self.qweight,
                    self.group_size,
                    self.scales,
                )
                y = y.view(*x.shape[:-1], self.out_features).float()
            return y if self.bias is None else y + self.bias
        if x.device.type != "cpu":
            raise QuantizationError(
                f"layer {self.layer_name}: quantised layers use torch's CPU kernels only for now "
                f"(got an input on {x.device.type}); pa.dequantize(model) to run elsewhere"
            )
        x2 = x.reshape(-1, self.in_features).to(self.input_dtype()).contiguous()
        if self.precision == "bf16":
            y = F.linear(x2, self.qweight)  # autograd knows its input gradient
        elif x2.requires_grad and torch.is_grad_enabled():
            y = _QuantMatmul.apply(x2, self)
        else:  # nothing to differentiate: skip the autograd.Function's per-call cost (~3 us x 210 a step)
            y = self.matmul(x2)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @torch.no_grad()
    def call_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor | None:
        """The weight in ``dtype`` for one call, not kept; None for an int4 layer whose packing
        is not laid out as :func:`_unpack_int4_fast` reads it (the kernel is used instead)."""
        if self.precision == "int4" and not _packing_readable(self.qweight, self.in_features, self.out_features):
            return None
        return self.dequantized_weight(dtype)

    @torch.no_grad()
    def int4_codes(self) -> torch.Tensor:
        """The int4 codes ``q`` (0..15) as ``uint8 [N, K]``.

        Read straight out of the packing where its layout is known (:func:`_unpack_int4_fast`:
        ~0.5 ms a layer, nothing kept). Elsewhere they are read back through the kernel, a
        ``K x K`` identity product per layer, more than the layer's forward on a training batch;
        backward needs them at every step, so that read is kept (``N x K`` bytes: a quarter of
        the float32 weight). A frozen base never changes them.
        """
        fast = _unpack_int4_fast(self.qweight, self.in_features, self.out_features)
        if fast is not None:
            return fast
        if self._codes is None or self._codes.device != self.qweight.device:
            q = _unpack_int4(self.qweight, self.in_features, self.out_features, self.group_size)
            self._codes = q.to(torch.uint8)
        return self._codes

    @torch.no_grad()
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer multiplies by, ``[N, K]``, exact in ``float32``."""
        if self.precision == "bf16":
            return self.qweight.to(dtype)
        if self.precision == "int8":
            return (self.qweight.float() * self.scales.float()[:, None]).to(dtype)
        if self._rows_product() is not None:  # paradapt's kernel: the same bits, 3x faster
            return (
                int4_rows().int4_dequantize(self.qweight, self.scales, self.group_size, _layout()).to(dtype)
            )
        return _dequantize_int4(self.int4_codes(), self.scales, self.group_size).to(dtype)


class _QuantMatmul(torch.autograd.Function):
    """The kernel forward; backward gives the input gradient from the dequantised weight (the
    base is frozen: no weight gradient). The torch kernels have no derivative of their own."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer, ctx.input_dtype = layer, x2.dtype
        return layer.matmul(x2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # bf16 where the CPU multiplies it natively; float32 elsewhere, where a bf16 product of
        # this shape ran 47x slower than float32's (1.2 s against 26 ms for 1024 x 1536 by 1536 x
        # 576 on the AMD EPYC). The gradient goes back in the dtype the input came in.
        dtype = gemm_dtype()
        w = ctx.layer.dequantized_weight(dtype)
        return (grad.to(dtype) @ w).to(ctx.input_dtype), None


def gemm_dtype() -> torch.dtype:
    """The dtype of a quantised layer's GEMMs on a dequantised weight (many-row products, input
    gradients): bf16 where the CPU multiplies it natively, float32 elsewhere (see
    :meth:`QuantLinear.matmul`)."""
    return torch.bfloat16 if native_bf16() else torch.float32


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles or AVX512-BF16), so a bf16
    base model's linear layers run faster than float32 ones: on the AMX machine of 2026-12-06 a
    1024 x 576 by 576 x 1536 product ran 6x faster, and the showcase served 1.8x the requests
    (README). Without those instructions torch widens bf16 to float32 for each product, which
    only adds conversions. Small products gain little either way (bf16 decode at batch 1 measured
    0.86x float32 in benchmarks/RESULTS.md, quantized.py). torch's own probes are private, hence
    the defaults."""
    cpu = torch.cpu
    return bool(
        getattr(cpu, "_is_amx_tile_supported", lambda: False)()
        or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    )


#: ``"auto"``: int4 layers on a CPU without native bf16 multiply few float32 rows with
#: paradapt's own kernel (csrc/int4_rows.cpp) where it builds; ``"torch"``: always torch's
#: bf16 kernel (for comparisons).
INT4_KERNEL = "auto"
_build_failed: dict[str, str] = {}  # extension name -> why it did not build, said once per process


def _builds(extension: native.Extension, instead: str) -> bool:
    """Whether ``extension`` is (or can now be) loaded on this x86 CPU with AVX2 or AVX512; a
    failed build (no compiler or ninja) warns once, saying what runs ``instead``, and is not
    tried again in this process."""
    if extension.name in _build_failed or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    if not extension.loaded:
        try:
            extension.load()
        except Exception as e:  # the caller's fallback runs instead
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            _build_failed[extension.name] = why
            warnings.warn(f"paradapt's {extension.name} kernel did not build ({why}); {instead}", stacklevel=3)
            return False
    return True


def int4_rows() -> ModuleType:
    """The compiled float32-row int4 product (built on first use; raises if it cannot be)."""
    return native.INT4_ROWS.load()


def int4_rows_usable(packed: torch.Tensor, k: int, n: int) -> bool:
    """Whether an int4 layer's few rows go through :func:`int4_rows`: ``INT4_KERNEL`` is
    ``"auto"``, the CPU has AVX2 but no native bf16, the packing's layout is known
    (:func:`_packing_readable`) and the kernel builds.

    Why: torch's int4 kernel computes in bf16, which an AVX2 CPU widens piece by piece; there
    int4 decoded only 1.55x float32 at batch 1 and 1.23x at batch 8 (SmolLM2-135M, AMD EPYC,
    2026-12-07). The kernel reads the same packed bytes and multiplies in float32: over the
    model's 210 layers in order, 9.1 against torch's 20.2 ms at one row and 41 against 51 at
    eight (float32 weights: 36 and 43 ms); a decode step 1.71x float32 at batch 1 and 1.10x at 8
    (benchmarks/RESULTS.md, quantized.py).
    """
    if INT4_KERNEL != "auto" or packed.device.type != "cpu" or native_bf16():
        return False
    return _packing_readable(packed, k, n) and _builds(native.INT4_ROWS, "using torch's bf16 one")


def int8_rows() -> ModuleType:
    """The compiled float32-row int8 product with group scales (csrc/int8_rows.cpp; built on
    first use; raises if it cannot be)."""
    return native.INT8_ROWS.load()


def int8_rows_usable() -> bool:
    """Whether :func:`int8_rows` runs here: an x86 CPU with AVX2 (or AVX512) where the kernel
    builds. A failed build warns once; callers then keep their float product."""
    return _builds(native.INT8_ROWS, "the LM head keeps its float product")


#: GGUF's Q8_0 blocks: one float16 scale per 32 weights
INT8_GRID_GROUP = 32


@torch.no_grad()
def int8_grid(
    weight: torch.Tensor, group_size: int = INT8_GRID_GROUP
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(q, scales)``, ``int8 [N, K]`` and ``float32 [N, K / group_size]``, with
    ``float(q) * scale`` equal to ``weight`` bit for bit, when the float32 ``weight`` lies on
    such a grid; else None.

    Why: a GGUF file's Q8_0 tensors (SmolLM2's tied embedding and LM head) are stored as
    ``d * q``, ``q`` in -127..127 and ``d`` one float16 per 32 weights, and the float32 model
    holds exactly those products. The grid is found again from the weights alone: each block's
    largest magnitude is ``127 d`` (Q8_0 scales a block by its largest element), so
    ``amax / 127`` gives ``d`` back exactly and ``weight / d`` the integers. Multiplying by
    ``q`` and ``d`` is then the same weight in a quarter of the bytes (serve/lm_head.py). Any
    weight off such a grid (a float model's, a bf16 one's) gives None after the first block of
    rows that disagrees.
    """
    if (
        weight.dtype != torch.float32
        or weight.dim() != 2
        or weight.shape[1] % group_size
        or weight.shape[1] == 0
    ):
        return None
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, k // group_size, dtype=torch.float32)
    for i in range(0, n, 4096):  # in blocks of rows: a weight off the grid is rejected early
        wg = weight[i : i + 4096].reshape(-1, k // group_size, group_size)
        d = wg.abs().amax(-1) / 127.0
        codes = torch.where(d[..., None] > 0, wg / d[..., None], 0.0).round_()
        if not bool(torch.isfinite(codes).all()) or bool((codes.abs() > 127).any()):
            return None
        if not torch.equal(codes * d[..., None], wg):
            return None
        q[i : i + 4096] = codes.reshape(-1, k).to(torch.int8)
        scales[i : i + 4096] = d
    return q, scales


def _dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(q - 8) * scale + zero`` in float32, ``[N, K]``: what the kernel multiplies by."""
    n, k = codes.shape
    scale = scales[..., 0].float().t().unsqueeze(-1)  # [N, K/g, 1]
    offset = scales[..., 1].float().t().unsqueeze(-1) - 8.0 * scale
    return (codes.view(n, k // group_size, group_size).float() * scale + offset).reshape(n, k)


#: Rows from which :meth:`QuantLinear.matmul` dequantises to bf16 instead of calling the kernel
#: (the measured crossover on one SmolLM2 layer: int4 3.4 ms vs 3.3 ms at M = 128).
DEQUANT_ROWS = 128
_LAYOUT_BLOCKS = (64, 32)  # the CPU packing's block of output rows: 64 in AVX512 builds of torch 2.13, 32 in AVX2 ones
_layout_block: int | None = None  # measured once per process: a block size, or 0 (unknown layout)


def _unpack_int4_fast(packed: torch.Tensor, k: int, n: int) -> torch.Tensor | None:
    """The codes ``uint8 [N, K]`` read straight out of the CPU packing, or None where
    :func:`_packing_readable` says it cannot be (callers then use :func:`_unpack_int4`)."""
    return _read_blocks(packed, k, n, _layout()) if _packing_readable(packed, k, n) else None


def _layout() -> int:
    """The packing's block of output rows on this CPU (0: a layout not known here). Blocks of
    ``B`` rows, each ``[K, B/2]`` bytes whose low nibble is row ``j`` and high nibble row
    ``B/2 + j`` of the block: the kernel's layout, which depends on the instruction set torch's
    CPU code was dispatched to, so it is checked once per process against a packed probe."""
    global _layout_block
    if _layout_block is None:
        rows = 2 * max(_LAYOUT_BLOCKS)
        probe = torch.randint(0, 16, (rows, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
        found = [
            b
            for b in _LAYOUT_BLOCKS
            if tuple(packed.shape) == (rows, 32) and torch.equal(_read_blocks(packed, 64, rows, b), probe.to(torch.uint8))
        ]
        _layout_block = found[0] if found else 0
    return _layout_block


def _packing_readable(packed: torch.Tensor, k: int, n: int) -> bool:
    """Is ``packed`` laid out as :func:`_layout` found, in whole blocks?"""
    block = _layout()
    return bool(block) and n % block == 0 and packed.dtype == torch.uint8 and tuple(packed.shape) == (n, k // 2)


def _read_blocks(packed: torch.Tensor, k: int, n: int, block: int) -> torch.Tensor:
    v = packed.view(n // block, k, block // 2)
    return torch.stack([v & 0x0F, v >> 4], 1).transpose(2, 3).reshape(n, k)


@torch.no_grad()
def _unpack_int4(packed: torch.Tensor, k: int, n: int, group_size: int) -> torch.Tensor:
    """The int4 codes ``q`` (0..15) as float32 ``[N, K]``, read back through the kernel itself.

    The CPU packing's layout is the kernel's business, so instead of assuming it this multiplies
    the identity with scale 1 and zero 8, which gives ``q`` exactly (small integers in bf16).
    """
    ones = torch.ones(k // group_size, n, 1, dtype=torch.bfloat16)
    sz = torch.cat([ones, ones * 8], -1).contiguous()
    out = torch.empty(n, k, dtype=torch.float32)
    eye = torch.eye(k, dtype=torch.bfloat16)
    step = 1024
    for i in range(0, k, step):
        out[:, i : i + step] = torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye[i : i + step], packed, group_size, sz
        ).t()
    return out


# -- building one layer -----------------------------------------------------------------------
def check_layer(name: str, lin: nn.Linear, precision: str, group_size: int) -> None:
    """Raise before anything is replaced if ``lin`` cannot take ``precision``."""
    if lin.weight.device.type != "cpu":
        raise QuantizationError(
            f"layer {name} is on {lin.weight.device.type}: quantisation uses torch's CPU kernels only for now; "
            "quantise on the CPU (a CUDA path is not implemented)"
        )
    if precision == "int4":
        if lin.in_features % group_size:
            raise QuantizationError(
                f"layer {name}: in_features={lin.in_features} is not a multiple of group_size={group_size} "
                "(int4 quantises groups of the input dimension)"
            )
        if lin.out_features % INT4_N_TILE:
            raise QuantizationError(
                f"layer {name}: out_features={lin.out_features} is not a multiple of {INT4_N_TILE}, "
                "which torch's CPU int4 packing needs"
            )


@torch.no_grad()
def int4_linear(
    name: str,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    float_dtype: torch.dtype = torch.float32,
) -> QuantLinear:
    """An int4 :class:`QuantLinear` from its codes ``q`` (0..15, ``[N, K]``) and one scale and
    zero per group of inputs (``[N, K / group_size]``): ``w = (q - 8) * scale + zero``.

    Scale and zero are stored in bf16 (the kernel's format). Used by :func:`quantize` and by
    loaders that already hold codes on a 4-bit grid (a GGUF file's Q4 blocks, a saved folder).
    """
    n, k = codes.shape
    if scale.shape != zero.shape or scale.dim() != 2 or scale.shape[0] != n or k % scale.shape[1]:
        raise QuantizationError(
            f"layer {name}: codes {tuple(codes.shape)} do not fit scales {tuple(scale.shape)} "
            f"and zeros {tuple(zero.shape)}"
        )
    g = k // scale.shape[1]
    if g not in INT4_GROUP_SIZES or n % INT4_N_TILE:
        raise QuantizationError(
            f"layer {name}: int4 needs groups of {INT4_GROUP_SIZES} inputs and out_features divisible "
            f"by {INT4_N_TILE} (got groups of {g}, out_features={n})"
        )
    q = QuantLinear(k, n, "int4", g, name, float_dtype)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    q.register_buffer("qweight", packed)
    q.register_buffer("scales", int4_scales(scale, zero))
    return q


def int4_scales(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Per-group scale and zero ``[N, K/g]`` as the int4 kernel takes them: ``bf16 [K/g, N, 2]``."""
    return torch.stack([scale.float().t(), zero.float().t()], -1).to(torch.bfloat16).contiguous()


@torch.no_grad()
def quantize_weight(name: str, weight: torch.Tensor, precision: str, group_size: int) -> QuantLinear:
    """A bias-free :class:`QuantLinear` from a bare ``[N, K]`` weight (checked as a layer named
    ``name``): for weights that are not an ``nn.Linear`` of the model (a GGUF tensor, LoftQ's
    reference of what the base will store)."""
    shell = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    shell.weight = nn.Parameter(weight.float(), requires_grad=False)
    check_layer(name, shell, precision, group_size)
    return quantize_layer(name, shell, precision, group_size)


@torch.no_grad()
def quantize_layer(name: str, lin: nn.Linear, precision: str, group_size: int) -> QuantLinear:
    w = lin.weight.detach().float()
    n, k = w.shape
    if precision == "int4":
        wg = w.reshape(n, k // group_size, group_size)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.bfloat16).float()
        zero = (lo + 8.0 * scale).to(torch.bfloat16).float()  # w = (q - 8) * scale + zero
        codes = ((wg - zero[..., None]) / scale[..., None] + 8.0).round().clamp(0, 15).to(torch.int32)
        q = int4_linear(name, codes.reshape(n, k), scale, zero, lin.weight.dtype)
    else:
        q = QuantLinear(k, n, precision, group_size, name, lin.weight.dtype)
    if precision == "bf16":
        q.register_buffer("qweight", w.to(torch.bfloat16))
    elif precision == "int8":
        scale = (w.abs().amax(1) / 127.0).clamp(min=1e-12).to(torch.bfloat16)
        codes = (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        q.register_buffer("qweight", codes)
        q.register_buffer("scales", scale)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    q.train(lin.training)
    return q


@torch.no_grad()
def _dequantize_layer(q: QuantLinear) -> nn.Linear:
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
    lin.weight = nn.Parameter(q.dequantized_weight(torch.float32), requires_grad=False)
    if q.bias is not None:
        lin.bias = nn.Parameter(q.bias.detach().float().clone(), requires_grad=False)
    lin.train(q.training)
    return lin


# -- the model --------------------------------------------------------------------------------
def _targets(model: nn.Module, include_lm_head: bool) -> list[tuple[str, nn.Linear]]:
    """The base's plain linears: not an adapter's (under ``model.paradapt``), not the LM head
    unless asked, not one already quantised."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = []
    for name, m in model.named_modules():
        if name == "paradapt" or name.startswith("paradapt."):
            continue
        if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear):
            if m is head and not include_lm_head:
                continue
            out.append((name, m))
    return out


def _check_state(model: nn.Module) -> None:
    """Adapters whose weights live inside the base (merged, fused, PiSSA) must come out first."""
    from .state import get_state

    st = get_state(model)
    if st is None:
        return
    for name, rec in st.adapters.items():
        if rec.merged or rec.fused is not None:
            raise QuantizationError(
                f"adapter {name!r} is {'fused' if rec.fused is not None else 'merged'} into the base weights; "
                "unmerge/unfuse it before quantising"
            )
        if getattr(rec.config, "init", None) == "pissa":
            raise QuantizationError(
                f"adapter {name!r} is a PiSSA adapter (the base holds its residual weights); "
                "save and remove it before quantising"
            )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where module ``name`` is, moving any adapter site's hooks onto it."""
    from .state import get_state

    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    st = get_state(model)
    if st is not None:
        st.replace_module(name, old, new)


def quantize(
    model: nn.Module, precision: str = "int4", group_size: int | None = None, *, include_lm_head: bool = False
) -> nn.Module:
    """Replace the base's ``nn.Linear`` layers by :class:`QuantLinear` in ``precision`` (in place).

    ``precision``: ``"int4"`` (groups of ``group_size``, default 32), ``"int8"`` (per output
    channel) or ``"bf16"``. Adapters are never quantised; the LM head only with
    ``include_lm_head=True``. Every layer is checked before any is replaced: a bad precision,
    group size or layer shape raises with the model unchanged. Adapters may be added before or
    after; their weights keep their dtype. Returns the model.
    """
    if precision not in PRECISIONS:
        raise ConfigError("precision", f"{precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "int4":
        group_size = 32 if group_size is None else group_size
        if group_size not in INT4_GROUP_SIZES:
            raise ConfigError(
                "group_size",
                f"{group_size!r} is not supported by the int4 kernel (one of {INT4_GROUP_SIZES})",
            )
    elif group_size is not None:
        raise ConfigError(
            "group_size", f"applies to int4 only ({precision} has one scale per output channel)"
        )
    done = quantization(model)
    if done["precision"] != "none":
        raise QuantizationError(
            f"this model is already quantised ({done['precision']}); pa.dequantize(model) before quantising again"
        )
    _check_state(model)
    targets = _targets(model, include_lm_head)
    if not targets:
        raise QuantizationError(f"{type(model).__name__} has no nn.Linear layer to quantise")
    for name, lin in targets:
        check_layer(name, lin, precision, group_size or 0)
    new = [(name, quantize_layer(name, lin, precision, group_size or 0)) for name, lin in targets]
    for name, q in new:
        replace_module(model, name, q)
    _own_float_weights(model)
    info = {"precision": precision, "lm_head": include_lm_head}
    if precision == "int4":
        info["group_size"] = group_size
    record_quantization(model, info)
    return model


def quantize_lm_head(model: nn.Module, precision: str) -> nn.Module:
    """The LM head of a quantised model in ``precision`` too (in place; the model's other
    layers as they are). Returns the model.

    At batch 1 a small model's float32 head is a large share of what a decode step reads:
    SmolLM2's tied 49,152 x 576 head is 113 MB, twice its 30 int4 layers together, and takes
    9.5 ms of a ~40 ms int4 step (measured, 1 thread). In int8 (one scale per output row) it
    takes 5.6 ms with teacher-forced top-1 agreement 98.3 % and KL 0.0027 against float32 on
    the held-out chat texts of benchmarks/quantized.py; in int4 (groups of 32) 1.8 ms but
    agreement falls to 85 % (KL 0.059): the head's rows are the vocabulary's logits, whose
    small differences decide the token. A head tied to the input embedding is untied (the
    embedding stays float for the lookup; ``config.tie_word_embeddings`` becomes False).
    """
    info = quantization(model)
    if info["precision"] == "none":
        raise QuantizationError("quantise the model first (pa.quantize), then its LM head")
    if info.get("lm_head"):
        raise QuantizationError(f"the LM head is already quantised ({info['lm_head']})")
    if precision not in PRECISIONS:
        raise ConfigError("lm_head", f"{precision!r} is not one of {', '.join(PRECISIONS)}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    name = next((n for n, m in model.named_modules() if m is head), None)
    if name is None or type(head) is not nn.Linear:
        raise QuantizationError(f"{type(model).__name__} has no float nn.Linear LM head to quantise")
    group = 32 if precision == "int4" else 0
    check_layer(name, head, precision, group)
    replace_module(model, name, quantize_layer(name, head, precision, group))
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    record_quantization(model, {**info, "lm_head": precision})
    return model


@torch.no_grad()
def _own_float_weights(model: nn.Module) -> None:
    """Copy the base's remaining float parameters (embeddings, norms, biases) into memory of
    their own.

    A model loaded from safetensors reads its tensors out of one memory map of the file, and the
    map lives as long as any tensor in it. Quantising read every page of the linears, so while
    the embedding keeps the map alive those pages stay counted in the process's memory: an int4
    server measured 1151 MB against the fp32 server's 698 MB (benchmarks/quantized.py's smoke
    run). Copies cost the float part once (the embedding: 113 MB on SmolLM2) and free the map.
    """
    for name, param in model.named_parameters():
        if name == "paradapt" or name.startswith("paradapt."):
            continue
        param.data = param.data.clone()


def dequantize(model: nn.Module) -> nn.Module:
    """Every :class:`QuantLinear` back to a float32 ``nn.Linear`` holding the dequantised weight
    (in place; the quantisation error stays). Returns the model."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name, q in found:
        replace_module(model, name, _dequantize_layer(q))
    model.__dict__.pop(ATTR, None)
    return model


def quantization(model: nn.Module) -> dict:
    """What :func:`quantize` did to ``model``: ``{"precision": "int4", "group_size": 32,
    "lm_head": False}``, or ``{"precision": "none"}``. Recorded in saved adapters' metadata."""
    info = model.__dict__.get(ATTR)
    return dict(info) if info else {"precision": "none"}


def record_quantization(model: nn.Module, info: dict) -> None:
    """Say what was quantised (what :func:`quantization` then returns): for loaders that build a
    quantised model without :func:`quantize` (from a GGUF file or a saved folder)."""
    model.__dict__[ATTR] = dict(info)


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantLinear)


def describe(info: dict) -> str:
    """One word for a quantisation record: ``int4-g32``, ``int8``, ``bf16`` or ``none``, with
    ``+head`` (the LM head in the same precision) or ``+head-int8`` (quantised apart)."""
    p = info.get("precision", "none") if isinstance(info, dict) else "none"
    word = f"{p}-g{info['group_size']}" if p == "int4" and "group_size" in info else str(p)
    head = info.get("lm_head") if isinstance(info, dict) else None
    if isinstance(head, str):
        return f"{word}+head-{head}"
    return f"{word}+head" if head is True else word
