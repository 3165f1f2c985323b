"""A GGUF file's 4-bit blocks repacked for torch's int4 kernel, without a float32 detour.

transformers reads a GGUF by dequantising every tensor to float32 (for SmolLM2-135M that peaks
at about 1.15 GB of memory); quantising the result again with ``pa.quantize`` finds a different
grid than the file's. But GGUF's Q4 formats and paradapt's int4 layers describe the same thing,
4-bit codes with one scale and offset per group of 32 inputs, so the codes can be moved across
as they are (ggml's ``block_q4_0``/``block_q4_1``, ggml-common.h):

- Q4_1: 20 bytes per 32 weights: ``d`` and ``m`` (float16), then 16 bytes of codes ``q``
  (byte ``j`` holds weight ``j`` in its low nibble and weight ``j + 16`` in its high one);
  ``w = q * d + m``;
- Q4_0: 18 bytes: ``d``, then the codes; ``w = (q - 8) * d``.

paradapt's int4 layer computes ``w = (q - 8) * scale + zero`` with bf16 scale and zero, so
``scale = d`` and ``zero = m + 8 d`` (Q4_0: ``zero = 0``): the codes are exact and the only
change is rounding ``d`` and ``zero`` to bf16. Tensors of other types (float32 norms, the Q8_0
embedding, any linear not stored as Q4) are dequantised by the ``gguf`` package to float32, as
transformers does; a linear among them is then quantised like :func:`paradapt.quantize` does.

Names and layout follow transformers' own GGUF loader (``get_gguf_hf_weights_map`` and the
architecture's tensor processor), which for Llama also undoes llama.cpp's row permutation of the
query and key weights; a permutation of output rows moves whole rows of blocks, so it applies
to the codes unchanged. A processor that does anything else to a Q4 tensor is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import QuantizationError, one_line
from .quantized import check_layer, quantize_weight
from .quantized_io import WEIGHTS_FILE, int4_tensors, layer_tensors, skeleton, write_info

GROUP = 32  # GGUF's Q4/Q8 blocks: 32 weights


def q4_codes(raw: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``uint8 [N, K]`` (0..15), ``d`` and ``m`` ``float32 [N, K/32]`` of Q4 rows
    ``raw`` (``uint8 [N, bytes]``) so that ``w = q * d + m`` exactly as ggml computes it."""
    head = {"Q4_0": 2, "Q4_1": 4}[kind]
    n, width = raw.shape
    blocks = np.ascontiguousarray(raw).reshape(n, -1, head + 16)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., head:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], -1).reshape(n, -1)
    if kind == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    else:
        m = -8.0 * d
    return torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m)


def kernel_scales(d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale``, ``zero`` for ``w = (q - 8) * scale + zero`` from ggml's ``w = q * d + m``."""
    return d, m + 8.0 * d


def row_order(processor, name: str, n: int) -> np.ndarray | None:
    """How transformers' processor reorders the rows of tensor ``name`` (None: not at all).

    The processor is run on the row numbers; anything but a permutation of them cannot be
    applied to packed blocks, and is refused."""
    probe = np.arange(n, dtype=np.float64).reshape(n, 1)
    out = processor.process(weights=probe, name=name).weights
    rows = np.asarray(out).reshape(-1)
    if rows.shape != (n,) or not np.array_equal(np.sort(rows), probe[:, 0]):
        raise QuantizationError(
            f"GGUF tensor {name}: transformers' loader transforms it in a way that cannot be "
            "applied to 4-bit blocks; load it in float32 (--quantize none) instead"
        )
    rows = rows.astype(np.int64)
    return None if np.array_equal(rows, np.arange(n)) else rows


def _float_tensor(tensor, processor) -> np.ndarray:
    from gguf import dequantize

    try:
        weights = dequantize(tensor.data, tensor.tensor_type)
    except (NotImplementedError, ValueError, KeyError) as e:
        raise QuantizationError(
            f"GGUF tensor {tensor.name}: type {tensor.tensor_type.name} cannot be read ({one_line(e)})"
        ) from None
    return processor.process(weights=weights, name=tensor.name).weights


def gguf_tensors(path: Path, model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], dict[str, int]]:
    """The tensors of a quantised folder for ``model`` (a skeleton of the file's architecture):
    Q4 linears repacked, everything else float32 (a float linear quantised to int4 groups of 32).
    Returns the tensors, the quantised layers' names, and how many tensors of each GGUF type."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise QuantizationError(f"{path.name} is not a readable GGUF file ({one_line(e)})") from None
    processor, names = processor_and_names(reader, model)
    linears = {f"{n}.weight": (n, m) for n, m in model.named_modules() if type(m) is nn.Linear}
    head = model.get_output_embeddings()
    tensors: dict[str, torch.Tensor] = {}
    layers: list[str] = []
    kinds: dict[str, int] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        kinds[kind] = kinds.get(kind, 0) + 1
        hf = names.get(tensor.name)
        if hf is None:
            continue
        target = linears.get(hf)
        if target is not None and target[1] is head:
            target = None  # the LM head stays float (pa.quantize's default)
        if target is not None and kind in ("Q4_0", "Q4_1"):
            name, lin = target
            tensors.update(_repacked(tensor, kind, name, lin, processor))
            layers.append(name)
            continue
        weights = torch.from_numpy(np.array(_float_tensor(tensor, processor), dtype=np.float32))
        if target is not None:
            name, lin = target
            tensors.update(_requantized(name, lin, weights))
            layers.append(name)
        else:
            tensors[hf] = weights
    return tensors, layers, kinds


def processor_and_names(reader, model: nn.Module):
    """transformers' tensor processor for the file's architecture and its GGUF -> HF name map."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    arch = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    return processor, get_gguf_hf_weights_map(model, processor)


def _repacked(tensor, kind: str, name: str, lin: nn.Linear, processor) -> dict[str, torch.Tensor]:
    raw = np.asarray(tensor.data)
    codes, d, m = q4_codes(raw, kind)
    if tuple(codes.shape) != (lin.out_features, lin.in_features):
        raise QuantizationError(
            f"GGUF tensor {tensor.name}: shape {tuple(codes.shape)} does not fit layer {name} "
            f"({lin.out_features} x {lin.in_features})"
        )
    rows = row_order(processor, tensor.name, codes.shape[0])
    if rows is not None:
        idx = torch.from_numpy(rows)
        codes, d, m = codes[idx], d[idx], m[idx]
    check_layer(name, lin, "int4", GROUP)
    scale, zero = kernel_scales(d, m)
    return int4_tensors(name, codes, scale, zero)


def _requantized(name: str, lin: nn.Linear, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """A linear the file keeps in another type: quantised from its float32 weights."""
    if tuple(weights.shape) != (lin.out_features, lin.in_features):
        raise QuantizationError(
            f"a GGUF tensor of shape {tuple(weights.shape)} does not fit layer {name} "
            f"({lin.out_features} x {lin.in_features})"
        )
    return layer_tensors(name, quantize_weight(name, weights, "int4", GROUP))


def convert_gguf_int4(gguf: Path, out: Path) -> None:
    """Write ``gguf`` into ``out`` (an empty folder) as a quantised folder
    (:mod:`paradapt.quantized_io`): config, tokenizer with its chat template, int4 layers in
    groups of 32 repacked from the file's Q4 blocks, other tensors in float32."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        why = one_line(e).replace(str(gguf), gguf.name)
        raise QuantizationError(f"{gguf.name} is not a GGUF file transformers can read: {why}") from None
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    model = skeleton(config)
    config.architectures = [type(model).__name__]
    tensors, layers, kinds = gguf_tensors(gguf, model)
    if not layers:
        raise QuantizationError(f"{gguf.name} has no linear layer this model can quantise")
    for key in getattr(model, "all_tied_weights_keys", {}) or {}:
        tensors.pop(key, None)
    config.save_pretrained(out)
    tok.save_pretrained(out)
    save_file(tensors, out / WEIGHTS_FILE)
    write_info(out, "int4", layers, GROUP, source={"file": gguf.name, "tensor_types": kinds})


__all__ = ["GROUP", "convert_gguf_int4", "gguf_tensors", "kernel_scales", "processor_and_names", "q4_codes", "row_order"]
