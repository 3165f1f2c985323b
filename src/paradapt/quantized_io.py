"""A quantised base model on disk: a folder that loads straight into :class:`QuantLinear` layers.

``pa.quantize`` starts from float32 weights. A model that already exists in 4 bits (a GGUF
file's Q4 blocks) should not take that detour at every start: it is converted once into a
folder (see :mod:`paradapt.gguf_weights`) and loaded from it in about a second, with peak
memory near the quantised model's size (the float skeleton is allocated but never written, so
its pages are never touched).

The folder is a Hugging Face folder (``config.json``, the tokenizer) plus:

- ``model.safetensors``: the float tensors by their usual names (embeddings, norms, biases), and
  per quantised layer ``NAME.qcodes`` (int4: the codes as ``uint8 [N, K/2]``, two per byte, the
  even input column in the low nibble) and ``NAME.qscales`` (int4: ``bf16 [K/g, N, 2]``, scale
  and zero as the kernel takes them), or ``NAME.qweight`` (int8 ``[N, K]`` with ``NAME.qscales``
  ``bf16 [N]``; bf16 ``[N, K]``);
- ``quantization.json``: ``{"format": 1, "precision": ..., "group_size": ..., "lm_head": ...,
  "layers": [names]}``.

Int4 codes are stored unpacked rather than in the kernel's blocked layout, which belongs to the
kernel (and may change with torch or the CPU); packing them at load time takes milliseconds.
A folder that is incomplete or inconsistent raises :class:`QuantizationError` naming the file
and tensor, never a half-loaded model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import QuantizationError
from .quantized import PRECISIONS, QuantLinear, int4_linear, int4_scales, record_quantization, replace_module

FORMAT = 1
INFO_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"


# -- int4 codes, two to a byte -------------------------------------------------------------------
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes 0..15 -> ``uint8 [N, K/2]`` (column ``2j`` low nibble, ``2j+1`` high).

    In numpy: torch's uint8 element-wise ops are ~30x slower on this CPU (measured 64 ms vs
    2 ms for one 1536 x 576 layer), which made loading a folder take seconds."""
    c = codes.numpy().astype(np.uint8, copy=False)
    return torch.from_numpy(np.ascontiguousarray(c[:, 0::2] | (c[:, 1::2] << 4)))


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`, as ``int32 [N, K]`` (what the kernel's packing takes)."""
    p = packed.numpy()
    out = np.empty((p.shape[0], p.shape[1] * 2), dtype=np.int32)
    out[:, 0::2] = p & 0x0F
    out[:, 1::2] = p >> 4
    return torch.from_numpy(out)


# -- one layer <-> tensors -----------------------------------------------------------------------
def layer_tensors(name: str, layer: QuantLinear) -> dict[str, torch.Tensor]:
    """The tensors a quantised layer is saved as (its bias is saved with the float tensors)."""
    if layer.precision == "int4":
        scales = layer.scales
        return {f"{name}.qcodes": pack_nibbles(layer.int4_codes()), f"{name}.qscales": scales.contiguous()}
    out = {f"{name}.qweight": layer.qweight.contiguous()}
    if layer.precision == "int8":
        out[f"{name}.qscales"] = layer.scales.contiguous()
    return out


def int4_tensors(name: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> dict[str, torch.Tensor]:
    """What :func:`layer_tensors` writes for an int4 layer, straight from its codes ``[N, K]`` and
    per-group scale and zero ``[N, G]`` (a converter that never builds the layer)."""
    return {f"{name}.qcodes": pack_nibbles(codes), f"{name}.qscales": int4_scales(scale, zero)}


def _need(tensors: Any, key: str, where: str) -> torch.Tensor:
    if key not in tensors.keys():
        raise QuantizationError(f"{where}: tensor {key} is missing")
    return tensors.get_tensor(key)


def layer_from_tensors(
    name: str, lin: nn.Linear, info: dict, tensors: Any, where: str, precision: str | None = None
) -> QuantLinear:
    """The :class:`QuantLinear` for ``name``, shaped like the skeleton's ``lin``; every tensor's
    shape and dtype checked against it (a folder written for another model fails here).
    ``precision``: this layer's, when not the folder's (an LM head quantised apart)."""
    n, k = lin.out_features, lin.in_features
    precision = precision or info["precision"]
    if precision == "int4":
        g = info.get("group_size") or 32
        packed = _need(tensors, f"{name}.qcodes", where)
        sz = _need(tensors, f"{name}.qscales", where)
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (n, k // 2):
            raise QuantizationError(f"{where}: {name}.qcodes is {packed.dtype} {tuple(packed.shape)}, not uint8 {(n, k // 2)}")
        if tuple(sz.shape) != (k // g, n, 2):
            raise QuantizationError(f"{where}: {name}.qscales has shape {tuple(sz.shape)}, not {(k // g, n, 2)}")
        q = int4_linear(name, unpack_nibbles(packed), sz[..., 0].t(), sz[..., 1].t())
    else:
        w = _need(tensors, f"{name}.qweight", where)
        want = torch.int8 if precision == "int8" else torch.bfloat16
        if w.dtype != want or tuple(w.shape) != (n, k):
            raise QuantizationError(f"{where}: {name}.qweight is {w.dtype} {tuple(w.shape)}, not {want} {(n, k)}")
        q = QuantLinear(k, n, precision, 0, name)
        q.register_buffer("qweight", w)
        if precision == "int8":
            s = _need(tensors, f"{name}.qscales", where)
            if tuple(s.shape) != (n,):
                raise QuantizationError(f"{where}: {name}.qscales has shape {tuple(s.shape)}, not {(n,)}")
            q.register_buffer("scales", s.to(torch.bfloat16))
    if lin.bias is not None:
        q.bias = nn.Parameter(torch.empty_like(lin.bias, device="cpu"), requires_grad=False)
    return q


# -- the folder ----------------------------------------------------------------------------------
def read_info(folder: Path) -> dict:
    """``quantization.json``, checked: format, precision, group size and layer list."""
    path = folder / INFO_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QuantizationError(f"{folder.name} has no {INFO_FILE} (not a quantised model folder)") from None
    except (OSError, ValueError) as e:
        raise QuantizationError(f"{folder.name}/{INFO_FILE} is unreadable ({type(e).__name__})") from None
    ok = (
        isinstance(info, dict)
        and info.get("format") == FORMAT
        and info.get("precision") in PRECISIONS
        and isinstance(info.get("layers"), list)
        and all(isinstance(x, str) for x in info["layers"])
        and (info["precision"] != "int4" or isinstance(info.get("group_size"), int))
    )
    if not ok:
        raise QuantizationError(f"{folder.name}/{INFO_FILE} is not a format-{FORMAT} quantisation record")
    return info


def write_info(
    folder: Path, precision: str, layers: list[str], group_size: int | None, lm_head: bool | str = False, **extra
) -> None:
    info = {"format": FORMAT, "precision": precision, "lm_head": lm_head, "layers": layers, **extra}
    if precision == "int4":
        info["group_size"] = group_size
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")


def skeleton(config) -> nn.Module:
    """The model class ``config`` names, built without initialising its weights: the float
    tensors are allocated but never written, so they cost address space, not memory, until the
    loader replaces or fills them. Non-persistent buffers (rotary frequencies) are computed."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_quantized(folder: str | Path) -> nn.Module:
    """The causal LM saved in ``folder`` (see the module docstring), quantised layers in place,
    eval mode. Raises :class:`QuantizationError` naming the file and tensor when anything is
    missing, extra or misshapen; nothing half-loaded is returned."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig

    folder = Path(folder)
    info = read_info(folder)
    where = f"{folder.name}/{WEIGHTS_FILE}"
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        model = skeleton(config)
    except (OSError, ValueError, KeyError) as e:
        raise QuantizationError(f"{folder.name}/config.json does not build a model ({type(e).__name__})") from None
    try:
        with safe_open(folder / WEIGHTS_FILE, framework="pt") as f:
            _fill(model, info, f, where)
    except (OSError, SafetensorError) as e:
        raise QuantizationError(f"{where} is unreadable ({type(e).__name__})") from None
    model.tie_weights()
    record_quantization(model, {k: info[k] for k in ("precision", "group_size", "lm_head") if k in info})
    if isinstance(info.get("lm_head"), str):
        model.config.tie_word_embeddings = False
    return model.eval()


def _fill(model: nn.Module, info: dict, tensors: Any, where: str) -> None:
    """Replace the listed layers and load every float tensor; all checked before returning."""
    layers = info["layers"]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name in layers:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise QuantizationError(f"{where}: layer {name} is not in this model") from None
        if not isinstance(lin, nn.Linear):
            raise QuantizationError(f"{where}: {name} is a {type(lin).__name__}, not a Linear")
        own = info["lm_head"] if isinstance(info.get("lm_head"), str) and lin is head else None
        replace_module(model, name, layer_from_tensors(name, lin, info, tensors, where, own))
    quant_keys = {k for k in tensors.keys() if k.rsplit(".", 1)[-1] in ("qcodes", "qscales", "qweight")}
    floats = {k: tensors.get_tensor(k) for k in tensors.keys() if k not in quant_keys}
    expected = model.state_dict()
    for k, t in floats.items():
        if k not in expected:
            raise QuantizationError(f"{where}: tensor {k} is not in this model")
        if tuple(t.shape) != tuple(expected[k].shape):
            raise QuantizationError(f"{where}: tensor {k} has shape {tuple(t.shape)}, not {tuple(expected[k].shape)}")
    result = model.load_state_dict({k: t.float() for k, t in floats.items()}, strict=False, assign=True)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [k for k in result.missing_keys if k not in tied and not _is_quant_buffer(model, k)]
    if missing:
        raise QuantizationError(f"{where}: tensor {missing[0]} is missing ({len(missing)} in all)")


def _is_quant_buffer(model: nn.Module, key: str) -> bool:
    """``qweight``/``scales`` of a layer already filled by :func:`layer_from_tensors`."""
    owner, _, attr = key.rpartition(".")
    return attr in ("qweight", "scales") and isinstance(model.get_submodule(owner), QuantLinear)


def save_quantized(model: nn.Module, folder: str | Path) -> None:
    """Write a quantised model's weights, config and quantisation record into ``folder`` (an
    existing, empty folder: callers build into a temporary folder and rename it, as
    :mod:`paradapt.model_cache` does). The tokenizer is the caller's to save."""
    from safetensors.torch import save_file

    from .quantized import quantization

    folder = Path(folder)
    info = quantization(model)
    if info["precision"] == "none":
        raise QuantizationError("this model is not quantised; pa.quantize(model, ...) first")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        tensors.update(layer_tensors(name, layer))
    for key, t in model.state_dict().items():
        if not _is_quant_buffer(model, key):
            tensors[key] = t.detach().contiguous()
    _drop_tied(model, tensors)
    model.config.save_pretrained(folder)
    save_file(tensors, folder / WEIGHTS_FILE)
    write_info(folder, info["precision"], [n for n, _ in layers], info.get("group_size"), info.get("lm_head", False))


def _drop_tied(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Tied weights (the LM head sharing the embedding) are saved once, as transformers does;
    a pair the config calls tied but that holds two tensors is saved twice (and loads untied)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for target, source in (getattr(model, "all_tied_weights_keys", {}) or {}).items():
        a, b = params.get(target), params.get(source)
        if a is not None and b is not None and a.data_ptr() == b.data_ptr():
            tensors.pop(target, None)
        else:
            model.config.tie_word_embeddings = False  # what this model does, for the saved config


__all__ = [
    "int4_tensors",
    "load_quantized",
    "pack_nibbles",
    "read_info",
    "save_quantized",
    "skeleton",
    "unpack_nibbles",
    "write_info",
]
