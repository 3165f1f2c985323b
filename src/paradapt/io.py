"""Adapter folders on disk: ``adapter_config.json`` + ``adapter.safetensors``; PEFT LoRA both ways.

Writes are atomic: a temporary sibling folder is written and fsynced, then
renamed into place, so a crash never leaves a half-written adapter. Loads
validate the format version, the base model and every tensor's name and shape
*before* touching the model, and name the field or file at fault.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import inject
from .api import check_name
from .config import FORMAT_VERSION, AdapterConfig, LoRAConfig
from .errors import AdapterExistsError, AdapterFileError, ConfigError, IncompatibleAdapterError
from .state import AdapterModule, get_state, require_state

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# -- atomic folder writes -------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_folder_atomically(path: str | Path, files: dict[str, object]) -> Path:
    """Write ``{filename: dict (json) | tensors dict (safetensors)}`` into ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for fname, content in files.items():
            target = tmp / fname
            if fname.endswith(".json"):
                with open(target, "w", encoding="utf-8") as f:
                    json.dump(content, f, indent=2, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                save_file(content, str(target), metadata={"format": "pt"})
                with open(target, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# -- paradapt format --------------------------------------------------------------------


def _export_tensors(st, name: str, fold_prefix: bool) -> tuple[dict[str, torch.Tensor], AdapterConfig]:
    """The adapter's tensors in inference form (prefix folded, PiSSA turned into a plain LoRA delta)."""
    rec = st.record(name)
    adapter: AdapterModule = st.container[name]
    config = rec.config
    tensors = {k: v.detach() for k, v in adapter.state_dict().items()}
    pissa_ranks = set()
    for key in rec.sites:
        comp = st.sites[key].components[name]
        slot = f"components.{AdapterModule.slot(key)}"
        if fold_prefix and getattr(comp, "encoder", None) is not None:
            k, v = comp.encoder.layer_kv(comp.layer_index)
            tensors[f"{slot}.key"], tensors[f"{slot}.value"] = k.detach(), v.detach()
        if getattr(comp, "pissa_down0", None) is not None:
            # W_res + s B A  ==  W + s [B, -B0] [A; A0]: a plain rank-2r LoRA on the original weight.
            tensors[f"{slot}.down.weight"] = torch.cat([comp.down.weight, comp.pissa_down0], 0).detach()
            tensors[f"{slot}.up.weight"] = torch.cat([comp.up.weight, -comp.pissa_up0], 1).detach()
            pissa_ranks.add(comp.r)
    if fold_prefix and getattr(config, "reparam", False):
        tensors = {k: v for k, v in tensors.items() if not k.startswith("prefix_encoder.")}
        config = type(config)(**{**_fields(config), "reparam": False})
    if pissa_ranks:
        r2 = 2 * pissa_ranks.pop()
        s = config.scaling
        alpha = s * (r2**0.5) if config.use_rslora else s * r2
        config = LoRAConfig(**{**_fields(config), "r": r2, "alpha": alpha, "init": "default"})
    return {k: v.contiguous().cpu() for k, v in tensors.items()}, config


def _fields(config: AdapterConfig) -> dict:
    d = config.to_dict()
    d.pop("kind")
    return d


def save_adapter(model, name: str, path: str | Path, *, fold_prefix: bool = True) -> Path:
    """Write adapter ``name`` to the folder ``path`` (atomically; an existing folder is replaced)."""
    st = require_state(model)
    rec = st.record(name)
    tensors, config = _export_tensors(st, name, fold_prefix)
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "config": config.to_dict(),
        "sites": list(rec.sites),
        "base_model": rec.base_info,
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors else None,
    }
    return write_folder_atomically(path, {CONFIG_FILE: meta, WEIGHTS_FILE: tensors})


def read_config(path: str | Path) -> dict:
    """Parse ``adapter_config.json`` of an adapter folder, naming the file on any problem."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(path, "no such adapter folder")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise AdapterFileError(
            cfg_file, "missing (an adapter folder holds adapter_config.json and its weights)"
        )
    try:
        with open(cfg_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(cfg_file, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise AdapterFileError(cfg_file, "must hold a JSON object")
    return data


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise AdapterFileError(file, "missing")
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
        raise AdapterFileError(file, f"cannot be read as safetensors ({e})") from None


def _check_base(info: dict, st, cfg_file: Path) -> None:
    have = inject.base_info(st)
    for key in ("hidden_size", "num_layers"):
        want = info.get(key)
        if want is not None and want != have[key]:
            raise IncompatibleAdapterError(
                f"base_model.{key}",
                f"{cfg_file} was made for a base model with {key}={want} "
                f"({info.get('name_or_path') or info.get('model_type') or 'unknown'}), this model has {have[key]}",
            )


def _load_weights_into(adapter: AdapterModule, tensors: dict[str, torch.Tensor], file: Path) -> None:
    expected = adapter.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise IncompatibleAdapterError(
            "weights",
            f"{file} does not fit this model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}",
        )
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise IncompatibleAdapterError(
                f"weights.{k}",
                f"{file} has shape {tuple(t.shape)}, this model needs {tuple(expected[k].shape)}",
            )
    with torch.no_grad():
        for k, target in expected.items():
            target.copy_(tensors[k])


def load_adapter(model, path: str | Path, name: str | None = None, *, trainable: bool = False):
    """Load an adapter folder (paradapt's or PEFT's LoRA layout) onto ``model`` as ``name``.

    Everything is validated before the model changes; on error the model is as before.
    """
    path = Path(path)
    data = read_config(path)
    if "peft_type" in data:
        return load_peft_adapter(model, path, name, data=data, trainable=trainable)
    cfg_file = path / CONFIG_FILE
    version = data.get("format_version")
    if not isinstance(version, int):
        raise IncompatibleAdapterError("format_version", f"{cfg_file} has no integer format_version")
    if version > FORMAT_VERSION:
        raise IncompatibleAdapterError(
            "format_version",
            f"{cfg_file} is format {version}, written by a newer paradapt; this one reads up to {FORMAT_VERSION}",
        )
    if not isinstance(data.get("config"), dict):
        raise AdapterFileError(cfg_file, "has no 'config' object")
    try:
        config = AdapterConfig.from_dict(data["config"], source=str(cfg_file))
    except TypeError as e:
        raise AdapterFileError(cfg_file, f"bad config ({e})") from None
    name = name or data.get("name") or path.name
    check_name(name)
    tensors = _read_tensors(path / WEIGHTS_FILE)
    return _add_with_weights(
        model, name, config, tensors, path / WEIGHTS_FILE, data.get("base_model") or {}, cfg_file, trainable
    )


def _add_with_weights(model, name, config, tensors, file, base, cfg_file, trainable):
    """Build the adapter, check it against the file, load, and only then attach."""
    fresh = get_state(model) is None
    st = get_state(model, create=True)
    try:
        if name in st.adapters:
            raise AdapterExistsError(f"an adapter named {name!r} is already on this model")
        _check_base(base, st, cfg_file)
        adapter, parts = inject.build(st, name, config)
        _load_weights_into(adapter, tensors, file)
    except Exception:
        if fresh:
            from .api import _drop_state

            _drop_state(model, st)
        raise
    if fresh:
        from .api import _freeze

        st.frozen = _freeze(st)
    inject.attach(st, name, config, adapter, parts, trainable)
    return adapter


# -- PEFT LoRA layout -------------------------------------------------------------------------

_PEFT_UNSUPPORTED = (
    "use_dora",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "use_qalora",
)


def load_peft_adapter(
    model, path: Path, name: str | None = None, *, data: dict | None = None, trainable: bool = False
):
    """Load a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    data = data if data is not None else read_config(path)
    if data.get("peft_type") != "LORA":
        raise IncompatibleAdapterError(
            "peft_type", f"{cfg_file}: only PEFT LoRA folders load, got {data.get('peft_type')!r}"
        )
    for key in _PEFT_UNSUPPORTED:
        if data.get(key):
            raise IncompatibleAdapterError(
                key, f"{cfg_file}: PEFT option {key}={data[key]!r} is not supported"
            )
    if data.get("bias", "none") != "none":
        raise IncompatibleAdapterError(
            "bias", f"{cfg_file}: PEFT bias={data['bias']!r} is not supported (only 'none')"
        )
    raw = _read_tensors(path / PEFT_WEIGHTS_FILE)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        if not key.startswith(PEFT_PREFIX) or not (
            key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight")
        ):
            raise IncompatibleAdapterError(
                "weights", f"{path / PEFT_WEIGHTS_FILE}: unexpected tensor {key!r}"
            )
        mod, part = key[len(PEFT_PREFIX) :].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        modules.setdefault(mod, {})[part] = t
    try:
        config = LoRAConfig(
            r=int(data["r"]),
            alpha=float(data.get("lora_alpha", data["r"])),
            targets=sorted(modules),
            dropout=float(data.get("lora_dropout") or 0.0),
            use_rslora=bool(data.get("use_rslora", False)),
        )
    except (KeyError, ValueError, TypeError, ConfigError) as e:
        raise AdapterFileError(cfg_file, f"bad PEFT LoRA config ({e})") from None
    tensors = {}
    for mod, parts in modules.items():
        slot = f"components.{AdapterModule.slot(mod)}"
        tensors[f"{slot}.down.weight"] = parts["lora_A"]
        tensors[f"{slot}.up.weight"] = parts["lora_B"]
    name = name or path.name
    check_name(name)
    return _add_with_weights(model, name, config, tensors, path / PEFT_WEIGHTS_FILE, {}, cfg_file, trainable)


def save_peft_adapter(model, name: str, path: str | Path) -> Path:
    """Export a LoRA adapter in PEFT's layout, loadable by ``peft.PeftModel.from_pretrained``."""
    st = require_state(model)
    rec = st.record(name)
    if rec.config.kind != "lora":
        raise ConfigError(
            "kind", f"only LoRA adapters export to PEFT's layout; {name!r} is {rec.config.kind}"
        )
    tensors, config = _export_tensors(st, name, fold_prefix=True)
    out = {}
    fan_in_fan_out = False
    for key in rec.sites:
        slot = f"components.{AdapterModule.slot(key)}"
        out[f"{PEFT_PREFIX}{key}.lora_A.weight"] = tensors[f"{slot}.down.weight"]
        out[f"{PEFT_PREFIX}{key}.lora_B.weight"] = tensors[f"{slot}.up.weight"]
        fan_in_fan_out |= type(st.modules[key]).__name__ == "Conv1D"
    meta = {
        "peft_type": "LORA",
        "task_type": None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": sorted(rec.sites),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": rec.base_info.get("name_or_path") or None,
    }
    return write_folder_atomically(path, {CONFIG_FILE: meta, PEFT_WEIGHTS_FILE: out})
