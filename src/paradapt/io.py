"""Adapter folders on disk: ``adapter_config.json`` + ``adapter.safetensors``; PEFT LoRA both ways.

Writes are atomic: a temporary sibling folder is written and fsynced, then
renamed into place, so a crash never leaves a half-written adapter. Loads
validate the format version, the base model and every tensor's name and shape
*before* touching the model, and name the field or file at fault.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from . import inject
from .checks import is_int
from .config import FORMAT_VERSION, AdapterConfig, LoRAConfig
from .errors import AdapterFileError, ConfigError, IncompatibleAdapterError
from .lifecycle import _add, build_detached, check_name
from .quantized import describe, quantization
from .state import AdapterModule, require_state

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
HASHES_KEY = "sha256"  # adapter_config.json: {weights file: sha256 of its bytes}, checked on load
_OWN_FILES = {CONFIG_FILE, WEIGHTS_FILE, PEFT_WEIGHTS_FILE, "README.md"}


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


def _check_replaceable(path: Path) -> None:
    """Only an adapter folder may be replaced: never a file or a folder holding anything else."""
    if not path.exists():
        return
    if not path.is_dir():
        raise AdapterFileError(path, "exists and is not a folder; refusing to replace it")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in _OWN_FILES)
    if foreign:
        raise AdapterFileError(
            path,
            f"exists and holds files other than an adapter's ({foreign[:3]}{'...' if len(foreign) > 3 else ''}); "
            "refusing to replace it (save to a new folder or remove it first)",
        )


def _write_file(target: Path, content) -> str | None:
    """Write one file (JSON or safetensors); returns the sha256 of a safetensors file's bytes."""
    if target.name.endswith(".json"):
        with open(target, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
    else:
        mode = _umask_mode(target)
        save_file(content, str(target), metadata={"format": "pt"})
        os.chmod(target, mode)
        with open(target, "rb") as f:
            os.fsync(f.fileno())
            return _sha256(f)
    return None


def _sha256(f) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def _umask_mode(target: Path) -> int:
    """The mode any file a program writes at ``target`` gets: ``0o666`` less the user's umask.

    safetensors' ``save_file`` writes a private temporary file (mode 0600) and renames it over
    the target, so a saved adapter would be unreadable to the group and others whatever the
    umask says. Creating the (empty) target first with a plain ``open`` reads the umask's
    effect without changing the process umask (``os.umask`` would, for every thread).
    """
    with open(target, "wb"):
        pass
    return target.stat().st_mode & 0o777


def write_folder_atomically(
    path: str | Path, files: dict[str, object], *, hashes_in: str | None = None
) -> Path:
    """Write ``{filename: dict (json) | tensors dict (safetensors)}`` into ``path`` atomically.

    An existing adapter folder at ``path`` is replaced; on any failure it is left as it was.
    ``hashes_in`` names a JSON file of ``files`` that records the sha256 of every safetensors
    file written (under :data:`HASHES_KEY`), so a reader can tell a corrupted file.
    """
    path = Path(path)
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = None
    tmp.mkdir()
    try:
        hashes = {}
        for fname, content in sorted(files.items(), key=lambda kv: kv[0].endswith(".json")):
            if fname == hashes_in:
                content = {**content, HASHES_KEY: hashes}
            digest = _write_file(tmp / fname, content)
            if digest is not None:
                hashes[fname] = digest
        _fsync_dir(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.rename(old, path)  # put the previous adapter back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
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
    if config.layers is not None and any(i < 0 for i in config.layers):
        # written resolved ([-1] -> [5]): readers need no "from the top", and _check_base
        # already insists on the same number of layers
        config = type(config)(**{**_fields(config), "layers": inject.layer_indices(st, config.layers)})
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
        "base_model": {**rec.base_info, "quantization": quantization(model)},
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors else None,
    }
    return write_folder_atomically(path, {CONFIG_FILE: meta, WEIGHTS_FILE: tensors}, hashes_in=CONFIG_FILE)


def read_config(path: str | Path) -> dict:
    """Parse ``adapter_config.json`` of an adapter folder, naming the file on any problem."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(path, "is not a folder" if path.exists() else "no such adapter folder")
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


def _read_tensors(file: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (never pickle: a weights file holds data, no code),
    checked against the ``sha256`` its config recorded (None: an older folder, not checked),
    every floating tensor finite."""
    if not file.is_file():
        raise AdapterFileError(file, "missing")
    data = file.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise AdapterFileError(
            file,
            f"its content does not match the sha256 recorded in {CONFIG_FILE} (corrupted or changed "
            "after saving); save the adapter again",
        )
    try:
        tensors = dict(sorted(load_safetensors(data).items()))  # in name order, as load_file gives them
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
        raise AdapterFileError(file, f"cannot be read as safetensors ({e})") from None
    check_finite(tensors, file)
    return tensors


def check_finite(tensors: dict[str, torch.Tensor], file: Path | str) -> None:
    """Refuse a weights file with a NaN or infinite value, naming the first such tensor.

    One such adapter in a packed step would turn its requests' hidden states non-finite;
    refused at load, it never gets that far.
    """
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterFileError(file, f"tensor {k!r} has non-finite values (NaN or Inf); refused")


def _recorded_hash(data: dict, fname: str, cfg_file: Path) -> str | None:
    """The sha256 ``adapter_config.json`` records for ``fname`` (None in folders saved before hashes)."""
    hashes = data.get(HASHES_KEY)
    if hashes is None:
        return None
    if not isinstance(hashes, dict) or not isinstance(hashes.get(fname, ""), str):
        raise AdapterFileError(cfg_file, f"'{HASHES_KEY}' must map file names to hex digests")
    return hashes.get(fname)


def _check_base(info: dict, st, cfg_file: Path) -> None:
    """The base model the file records matches this one (architecture family, width, depth)."""
    have = inject.base_info(st)
    for key in ("family", "hidden_size", "num_layers"):
        want = info.get(key)
        if want is not None and have[key] is not None and want != have[key]:
            raise IncompatibleAdapterError(
                f"base_model.{key}",
                f"{cfg_file} was made for a base model with {key}={want} "
                f"({info.get('name_or_path') or info.get('model_type') or 'unknown'}), this model has {have[key]}",
            )
    _warn_precision(info.get("quantization"), st.model, cfg_file)


def _warn_precision(recorded, model, cfg_file: Path) -> None:
    """An adapter made on a base of another precision still loads (the adapter's own weights
    are unchanged), with a warning naming both: its outputs then differ by the quantisation error."""
    if not isinstance(recorded, dict):
        return  # folders saved before precisions were recorded: nothing to compare
    want, have = describe(recorded), describe(quantization(model))
    if want != have:
        warnings.warn(
            f"{cfg_file.parent.name}: adapter made on base weights {want}, loading onto base weights {have} "
            "(it works; outputs differ by the quantisation error)",
            stacklevel=4,
        )


def _check_weights(
    adapter: AdapterModule, tensors: dict[str, torch.Tensor], file: Path, file_keys: dict[str, str]
) -> None:
    """Every tensor the adapter needs is in the file, with its shape, and nothing else.

    ``file_keys`` maps a weight's name here to its name in the file where the two differ (PEFT).
    """
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
                f"weights.{file_keys.get(k, k)}",
                f"{file} has shape {tuple(t.shape)}, this model needs {tuple(expected[k].shape)}",
            )


@torch.no_grad()
def _copy_weights(adapter: AdapterModule, tensors: dict[str, torch.Tensor]) -> None:
    for k, target in adapter.state_dict().items():
        target.copy_(tensors[k])


@dataclass(frozen=True)
class _Folder:
    """A parsed adapter folder: what to build and the weights to check against it."""

    name: str
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    file: Path
    base: dict
    cfg_file: Path
    file_keys: dict[str, str] = field(default_factory=dict)  # our weight name -> its name in the file


def load_adapter(model, path: str | Path, name: str | None = None, *, trainable: bool = False):
    """Load an adapter folder (paradapt's or PEFT's LoRA layout) onto ``model`` as ``name``.

    Everything is validated before the model changes; on error the model is as before.
    """
    return _add_with_weights(model, _parse(Path(path), name), trainable)


def read_adapter(
    model, path: str | Path, name: str | None = None
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Validate a folder against ``model`` as :func:`load_adapter` does, but leave the model alone.

    Returns the adapter's config and its weights (named as its module's state dict, in the
    dtype it would have on ``model``). A server that wants the built module too, to attach it
    later without building it again, uses :func:`parse_folder` + :func:`build_folder`.
    """
    folder = parse_folder(path, name)
    adapter, _ = build_folder(model, folder)
    return folder.config, {k: v.detach() for k, v in adapter.state_dict().items()}


def parse_folder(path: str | Path, name: str | None = None) -> _Folder:
    """Read and parse an adapter folder (config and tensors) without a model: only file I/O,
    safe to run on another thread (a server reads ahead with it while a step runs)."""
    return _parse(Path(path), name)


def build_folder(model, folder: _Folder) -> tuple[AdapterModule, list]:
    """Check a parsed folder against ``model`` and build it with its weights, unattached:
    ``(adapter, parts)`` for ``lifecycle.attach_built`` (not for PiSSA, whose attach changes the base
    from the adapter's *initial* factors: attach those with :func:`load_adapter`)."""
    try:
        adapter, parts = build_detached(model, folder.name, folder.config, **_file_checks(folder))
    except ConfigError as e:
        raise _naming_file(e, folder.cfg_file) from None
    _copy_weights(adapter, folder.tensors)
    return adapter, parts


def _parse(path: Path, name: str | None) -> _Folder:
    data = read_config(path)
    if "peft_type" in data:
        return _parse_peft(path, name, data)
    return _parse_ours(path, name, data)


def _parse_ours(path: Path, name: str | None, data: dict) -> _Folder:
    cfg_file = path / CONFIG_FILE
    _warn_unknown_keys(data, cfg_file)
    version = data.get("format_version")
    if not is_int(version):
        raise IncompatibleAdapterError("format_version", f"{cfg_file} has no integer format_version")
    if version > FORMAT_VERSION:
        raise IncompatibleAdapterError(
            "format_version",
            f"{cfg_file} is format {version}, written by a newer paradapt; this one reads up to {FORMAT_VERSION}",
        )
    if not isinstance(data.get("config"), dict):
        raise AdapterFileError(cfg_file, "has no 'config' object")
    config = _config_from_file(data["config"], cfg_file)
    base = data.get("base_model") or {}
    if not isinstance(base, dict):
        raise AdapterFileError(cfg_file, f"'base_model' must be an object, got {base!r}")
    name = _name_for(path, name or data.get("name") or None)
    tensors = _read_tensors(path / WEIGHTS_FILE, _recorded_hash(data, WEIGHTS_FILE, cfg_file))
    return _Folder(name, config, tensors, path / WEIGHTS_FILE, base, cfg_file)


def _name_for(path: Path, name: str | None) -> str:
    """The name given (or recorded in the file), else the folder's name."""
    if name is not None:
        check_name(name)
        return name
    try:
        check_name(path.name)
    except ConfigError:
        raise ConfigError(
            "name", f"the folder name {path.name!r} is not a valid adapter name; pass name=... to load it"
        ) from None
    return path.name


_KNOWN_KEYS = {"format_version", "name", "config", "sites", "base_model", "dtype", HASHES_KEY}


def _warn_unknown_keys(data: dict, cfg_file: Path) -> None:
    """Keys a newer paradapt of the same format version may write: ignored, with a warning."""
    unknown = sorted(set(data) - _KNOWN_KEYS)
    if unknown:
        warnings.warn(f"{cfg_file}: ignoring unknown keys {unknown}", stacklevel=3)


def _config_from_file(d: dict, cfg_file: Path) -> AdapterConfig:
    """The adapter config of a file; a bad field is reported with the file it is in."""
    try:
        return AdapterConfig.from_dict(d, source=str(cfg_file))
    except ConfigError as e:
        raise _naming_file(e, cfg_file) from None
    except TypeError as e:
        raise AdapterFileError(cfg_file, f"bad config ({e})") from None


def _naming_file(e: ConfigError, cfg_file: Path) -> ConfigError:
    """``e`` (same type and field) with the config file it came from in its message."""
    if str(cfg_file) in str(e):
        return e
    message = e.message
    return type(e)(e.field, f"{message} (in {cfg_file})")


def _file_checks(f: _Folder) -> dict:
    """How a folder's adapter is built: its base checked first, then every weight it needs
    against the file; the file then sets every weight, so the build skips the random init."""
    return {
        "before": lambda st: _check_base(f.base, st, f.cfg_file),
        "after": lambda built: _check_weights(built, f.tensors, f.file, f.file_keys),
        "initialise": False,
    }


def _add_with_weights(model, f: _Folder, trainable: bool):
    """Build the adapter and check it against the file; only then attach it and copy the weights in.

    Copying after ``attach`` matters for PiSSA: attaching subtracts the principal part the
    adapter was *initialised* with from the base, the file holds the *trained* factors.
    """
    try:
        adapter = _add(
            model,
            f.name,
            f.config,
            trainable=trainable,
            taken_hint="pass name=... to load it under another",
            **_file_checks(f),
        )
    except ConfigError as e:  # e.g. targets that match nothing on this model
        raise _naming_file(e, f.cfg_file) from None
    _copy_weights(adapter, f.tensors)
    return adapter


# -- PEFT LoRA layout -------------------------------------------------------------------------

# Options that change what a PEFT LoRA computes (or the model it sits on), so loading one
# as a plain LoRA would be silently wrong. Options that only choose *where* LoRA goes
# (target_modules, layers_to_transform, exclude_modules) are fine: the tensors say where.
_PEFT_UNSUPPORTED = (
    "use_dora",
    "use_qalora",
    "use_bdlora",
    "lora_bias",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
)
# init_lora_weights values whose saved A, B apply to the unchanged base weight.
_PEFT_PLAIN_INITS = (True, False, None, "gaussian", "eva", "orthogonal")


def _check_peft_config(data: dict, cfg_file: Path) -> None:
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
    init = data.get("init_lora_weights", True)
    if init not in _PEFT_PLAIN_INITS and init != "pissa":
        raise IncompatibleAdapterError(
            "init_lora_weights",
            f"{cfg_file}: init_lora_weights={init!r} changes the base weights in a way paradapt cannot "
            "reproduce; convert it to a plain LoRA first (PEFT's path_initial_model_for_weight_conversion)",
        )


def _peft_modules(raw: dict[str, torch.Tensor], file: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {"lora_A": A, "lora_B": B}}`` from PEFT's flat tensor names."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        mod, _, tail = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not key.startswith(PEFT_PREFIX) or not mod or tail not in ("A.weight", "B.weight"):
            raise IncompatibleAdapterError("weights", f"{file}: unexpected tensor {key!r}")
        modules.setdefault(mod, {})[f"lora_{tail[0]}"] = t
    if not modules:
        raise AdapterFileError(file, "holds no LoRA tensors")
    for mod, parts in modules.items():
        for part in ("lora_A", "lora_B"):
            if part not in parts:
                raise IncompatibleAdapterError(
                    f"weights.{PEFT_PREFIX}{mod}.{part}.weight", f"{file} has no such tensor"
                )
    return modules


def load_peft_adapter(
    model, path: Path, name: str | None = None, *, data: dict | None = None, trainable: bool = False
):
    """Load a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    path = Path(path)
    data = data if data is not None else read_config(path)
    return _add_with_weights(model, _parse_peft(path, name, data), trainable)


def _parse_peft(path: Path, name: str | None, data: dict) -> _Folder:
    cfg_file = path / CONFIG_FILE
    _check_peft_config(data, cfg_file)
    file = path / PEFT_WEIGHTS_FILE
    modules = _peft_modules(_read_tensors(file), file)
    try:
        config = LoRAConfig(
            r=int(data["r"]),
            alpha=float(data.get("lora_alpha", 8)),  # PEFT's default
            targets=sorted(modules),
            dropout=float(data.get("lora_dropout") or 0.0),
            use_rslora=bool(data.get("use_rslora", False)),
            init="pissa" if data.get("init_lora_weights") == "pissa" else "default",
        )
    except KeyError as e:
        raise AdapterFileError(cfg_file, f"bad PEFT LoRA config (no {e} field)") from None
    except (ValueError, TypeError, ConfigError) as e:
        raise AdapterFileError(cfg_file, f"bad PEFT LoRA config ({e})") from None
    tensors, file_keys = {}, {}
    for mod, parts in modules.items():
        slot = f"components.{AdapterModule.slot(mod)}"
        for ours, theirs in (("down", "lora_A"), ("up", "lora_B")):
            tensors[f"{slot}.{ours}.weight"] = parts[theirs]
            file_keys[f"{slot}.{ours}.weight"] = f"{PEFT_PREFIX}{mod}.{theirs}.weight"
    return _Folder(_name_for(path, name), config, tensors, file, {}, cfg_file, file_keys)


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
