"""The training config: a YAML file checked by a pydantic schema, plus ``--key value`` overrides.

Every section forbids unknown keys, and an unknown key fails with a did-you-mean that names
the key and its section (``train.lrr: unknown key in train; did you mean 'lr'?``), before
any model is loaded. The adapter options (``adapters.N.config``) are checked against the
kind's config class and the data options (``adapters.N.data``) against :class:`DataSpec`,
with the same kind of message.

Overrides are dotted keys into the raw mapping (``train.lr``, ``adapters.0.config.r``) with
values parsed as YAML scalars, applied before validation so they are checked like the file.
Paths in the config are relative to the config file's folder; ``${assets}`` expands to the
shared assets folder (``$PARADAPT_ASSETS``, else ``shared/assets`` found walking up).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from ..checks import is_int
from ..config import CONFIG_CLASSES, FILE_KINDS, AdapterConfig, Mixture
from ..errors import ConfigError
from .data import DataSpec
from .loop import TrainArgs

Kind = Literal[tuple(CONFIG_CLASSES)]  # the adapter kinds, from the one registry (pydantic checks them)
EntryKind = Literal[tuple(FILE_KINDS)]  # an entry may also be a mixture over experts
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenizeSection(_Section):
    """How text becomes tokens (shared by every adapter of the run)."""

    max_length: int | None = Field(None, ge=2, description="longer sequences are truncated (one warning)")
    packing: bool = Field(True, description="LM data: concatenate documents into full blocks")
    add_eos: bool = Field(True, description="LM/completion data: end each document with EOS")


def _micro_batches(cls: type, value: Any) -> Any:
    """One clear message instead of pydantic's per-union-member errors."""
    if value == "auto" and isinstance(value, str):
        return value
    if is_int(value) and value >= 1:
        return value
    raise ValueError(f"must be 'auto' or an integer >= 1, got {value!r}")


def _train_section() -> type[_Section]:
    """The ``train:`` schema, built from :class:`TrainArgs` so each option is declared once.

    Each dataclass field gives its type, default, description and bounds (``metadata``);
    ``output_dir`` is the config's top-level key, so the section leaves it out.
    """
    hints = typing.get_type_hints(TrainArgs)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(TrainArgs):
        if f.name == "output_dir":
            continue
        meta = f.metadata
        fields[f.name] = (
            hints[f.name],
            Field(f.default, description=meta.get("help") or None, **meta.get("bounds", {})),
        )
    return create_model(
        "TrainSection",
        __base__=_Section,
        __module__=__name__,
        __doc__="The loop settings: the fields of :class:`paradapt.train.loop.TrainArgs` except ``output_dir``.",
        __validators__={"_micro_batches": field_validator("micro_batches", mode="before")(_micro_batches)},
        **fields,
    )


TrainSection = _train_section()


class ExpertEntry(_Section):
    """One expert of a mixture: an existing adapter folder (``path``, loaded frozen unless the
    mixture's ``train_experts`` is true) or a new adapter (``kind`` and ``config``, trained jointly)."""

    name: str | None = Field(None, description="the expert's adapter name (default: the folder's name)")
    path: str | None = Field(None, description="an adapter folder to load (relative to the config file)")
    kind: Kind | None = Field(None, description="a new adapter's kind (with config)")
    config: dict[str, Any] | None = Field(None, description="a new adapter's options: r, scale ...")


DataField = dict[str, Any] | str | list[dict[str, Any] | str]


class AdapterEntry(_Section):
    """One adapter of the run: its name, kind, options and data (a list: rows of all of them)."""

    name: str
    kind: EntryKind = "parallel"
    config: dict[str, Any] = Field(default_factory=dict, description="the kind's options: r, scale, head ...")
    data: DataField
    eval_data: DataField | None = None
    eval_fraction: float | None = Field(None, gt=0, lt=1)
    experts: list[ExpertEntry] | None = Field(None, description="kind mixture: the adapters it gates")
    aux_loss_coef: float = Field(
        0.0, ge=0, description="kind mixture: weight of the Switch load-balancing loss (0.01 is usual)"
    )


class RunConfig(_Section):
    """A whole ``paradapt train`` run."""

    model: str | None = Field(
        None, description="a named model (smollm2-135m-instruct) or a local folder (default: bundled MiniLM)"
    )
    quantize: Literal["none", "int4", "int8", "bf16"] = Field(
        "none",
        description="quantise the frozen base before adding the adapters (QLoRA-style; int4: groups of "
        "quantize_group_size); docs/quantization.md",
    )
    quantize_group_size: int | None = Field(None, description="int4's group size (32, 64, 128 or 256; default 32)")
    output_dir: str
    adapters: list[AdapterEntry] = Field(min_length=1)
    tokenize: TokenizeSection = Field(default_factory=TokenizeSection)
    train: TrainSection = Field(default_factory=TrainSection)

    @model_validator(mode="before")
    @classmethod
    def _single_adapter(cls, data: Any) -> Any:
        """``adapter: {...}`` is shorthand for a one-entry ``adapters:`` list."""
        if isinstance(data, dict) and "adapter" in data:
            data = dict(data)
            if "adapters" in data:
                raise ValueError("give either 'adapter' (one) or 'adapters' (a list), not both")
            data["adapters"] = [data.pop("adapter")]
        return data

    # -- derived objects ---------------------------------------------------------------
    def train_args(self) -> TrainArgs:
        return TrainArgs(**self.train.model_dump(), output_dir=self.output_dir)

    def adapter_config(self, i: int) -> AdapterConfig:
        """The ``adapters[i]`` options as the kind's config object (unknown keys: did-you-mean)."""
        entry = self.adapters[i]
        where = f"adapters.{i}.config"
        if entry.kind != Mixture.kind:
            if entry.experts is not None:
                raise ConfigError(
                    f"adapters.{i}.experts", f"only a mixture has experts (kind is {entry.kind!r})"
                )
            return build_adapter_config(entry.kind, entry.config, where)
        if "experts" in entry.config:
            raise ConfigError(f"{where}.experts", f"list the experts in adapters.{i}.experts, not in config")
        names = [name for name, _ in self.experts(i)]
        return build_adapter_config(entry.kind, {**entry.config, "experts": names}, where)

    def experts(self, i: int) -> list[tuple[str, ExpertEntry]]:
        """``adapters[i]``'s experts as ``(name, entry)``: a folder's default name is its basename."""
        entry = self.adapters[i]
        if not entry.experts:
            raise ConfigError(f"adapters.{i}.experts", "a mixture needs a list of at least two experts")
        out = []
        for j, e in enumerate(entry.experts):
            where = f"adapters.{i}.experts.{j}"
            if (e.path is None) == (e.kind is None):
                raise ConfigError(where, "give either path (an adapter folder) or kind (a new adapter)")
            if e.path is not None and e.config is not None:
                raise ConfigError(f"{where}.config", "a loaded expert's options come from its folder")
            if e.name is None and e.path is None:
                raise ConfigError(f"{where}.name", "a new expert needs a name")
            name = e.name if e.name is not None else Path(e.path.removeprefix("bundled:")).name
            if not _NAME.match(name):
                raise ConfigError(
                    f"{where}.name", f"letters, digits, '_', '.', '-' only, got {name!r} (set name:)"
                )
            out.append((name, e))
        return out

    def expert_config(self, i: int, j: int) -> AdapterConfig:
        """A new expert's config object (``adapters[i].experts[j]``, with ``kind``)."""
        e = self.adapters[i].experts[j]
        return build_adapter_config(e.kind, e.config or {}, f"adapters.{i}.experts.{j}.config")

    def data_specs(
        self, i: int, base_dir: str | os.PathLike | None = None
    ) -> tuple[DataSpec | list[DataSpec], DataSpec | list[DataSpec] | None]:
        """Train and eval :class:`DataSpec` of ``adapters[i]`` (paths relative to ``base_dir``);
        a ``data:`` list gives a list (its rows are read as one data set)."""
        entry = self.adapters[i]
        train = _specs(entry.data, f"adapters.{i}.data", base_dir)
        evals = None
        if entry.eval_data is not None:
            first = train[0] if isinstance(train, list) else train
            evals = _specs(entry.eval_data, f"adapters.{i}.eval_data", base_dir, inherit=first)
            if entry.eval_fraction is not None:
                raise ConfigError(f"adapters.{i}.eval_fraction", "give either eval_data or eval_fraction")
        return train, evals


# --------------------------------------------------------------------------- loading


def load_config(
    source: str | os.PathLike | dict | RunConfig, overrides: dict[str, Any] | None = None
) -> tuple[RunConfig, Path | None]:
    """The validated config and the folder its relative paths start from (the file's, or None)."""
    if isinstance(source, RunConfig):
        if overrides:
            source = source.model_dump()
        else:
            return source, None
    base_dir = None
    if isinstance(source, dict):
        raw = _deep_copy(source)
    else:
        path = Path(source)
        raw = read_yaml(path)
        base_dir = path.resolve().parent
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return validate(raw), base_dir


def read_yaml(path: Path) -> dict:
    """The mapping in a YAML file (``1e-4`` reads as a float, as in YAML 1.2)."""
    if not path.is_file():
        raise ConfigError("config", f"{path}: no such file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 (safe loader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError("config", f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path}: must be a mapping of sections, got {type(data).__name__}")
    return data


def validate(raw: dict) -> RunConfig:
    """Check a raw mapping against the schema; the first problem becomes one ConfigError."""
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise _to_config_error(e) from None
    names = [a.name for a in cfg.adapters]
    for i, a in enumerate(cfg.adapters):
        if not _NAME.match(a.name):
            raise ConfigError(f"adapters.{i}.name", f"letters, digits, '_', '.', '-' only, got {a.name!r}")
        if names.index(a.name) != i:
            raise ConfigError(f"adapters.{i}.name", f"{a.name!r} is used twice")
        cfg.adapter_config(i)  # options fail here, before any model is loaded
        if a.kind == Mixture.kind:
            for j, (name, e) in enumerate(cfg.experts(i)):
                if name in names:
                    raise ConfigError(f"adapters.{i}.experts.{j}.name", f"{name!r} is used twice")
                names.append(name)
                if e.kind is not None:
                    cfg.expert_config(i, j)
    return cfg


def build_adapter_config(kind: str, options: dict, where: str) -> AdapterConfig:
    """The kind's config object; unknown or bad options name ``where.<key>``."""
    cls = FILE_KINDS[kind]
    known = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in known:
            raise ConfigError(f"{where}.{key}", _unknown(str(key), known, f"{where} ({kind})"))
    try:
        return cls(**options)
    except ConfigError as e:
        message = e.message
        raise ConfigError(f"{where}.{e.field}", message) from None
    except TypeError as e:
        raise ConfigError(where, str(e)) from None


# --------------------------------------------------------------------------- overrides


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``["--train.lr", "3e-4", "--adapters.0.config.r=16"]`` -> ``{"train.lr": 3e-4, ...}``."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError("overrides", f"expected --key value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(key, "override needs a value (--key value or --key=value)")
            value, i = argv[i + 1], i + 1
        out[key] = parse_scalar(value)
        i += 1
    return out


def parse_scalar(text: str) -> Any:
    """A command-line value read as YAML (``16`` -> 16, ``3e-4`` -> 0.0003, ``[a, b]`` -> list)."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506
    except yaml.YAMLError:
        return text


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set ``raw[a][b][0][c] = value`` for ``key="a.b.0.c"``, creating mappings on the way.

    Unknown keys are not judged here: the schema (and its did-you-mean) does that next.
    """
    parts = key.split(".")
    if any(p == "" for p in parts):
        raise ConfigError(key, "bad override key (use dotted names like train.lr)")
    if parts[0] == "adapters" and "adapter" in raw and "adapters" not in raw:
        raw["adapters"] = [raw.pop("adapter")]
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    where, f"no such entry: the list has {len(node)} (indices 0..{len(node) - 1})"
                )
            idx: Any = int(part)
        elif isinstance(node, dict):
            idx = part
        else:
            raise ConfigError(where, f"cannot set a key inside {type(node).__name__} {node!r}")
        if last:
            node[idx] = value
        else:
            if isinstance(node, dict) and node.get(idx) is None:
                node[idx] = {}
            if part in ("data", "eval_data") and isinstance(node[idx], str):
                node[idx] = {"path": node[idx]}  # a bare path is shorthand for {path: ...}
            node = node[idx]


# --------------------------------------------------------------------------- helpers


def _unknown(key: str, known: list[str], section: str) -> str:
    hint = difflib.get_close_matches(key, known, n=1)
    extra = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(known)}"
    return f"unknown key in {section}{extra}"


def _to_config_error(e: ValidationError) -> ConfigError:
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"]]
    where = ".".join(loc) or "config"
    if err["type"] == "extra_forbidden":
        parent = _model_at(RunConfig, loc[:-1])
        known = list(parent.model_fields) if parent is not None else []
        if parent is RunConfig:
            known.append("adapter")
        return ConfigError(where, _unknown(loc[-1], known, ".".join(loc[:-1]) or "the top level"))
    if err["type"] == "missing":
        return ConfigError(where, "required key is missing")
    if err["type"] == "value_error" and "error" in err.get("ctx", {}):
        return ConfigError(where, str(err["ctx"]["error"]))
    got = err.get("input")
    return ConfigError(where, f"{err['msg'][0].lower()}{err['msg'][1:]} (got {got!r})")


def _model_at(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    """The schema class that holds the key at ``loc`` (list indices are skipped)."""
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        found = _first_model(field.annotation)
        if found is None:
            return None
        model = found
    return model


def _first_model(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in typing.get_args(tp):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _specs(
    raw: Any, where: str, base_dir: str | os.PathLike | None, inherit: DataSpec | None = None
) -> DataSpec | list[DataSpec]:
    """One :class:`DataSpec`, or a list of them for a ``data:`` list (``where.N``)."""
    if isinstance(raw, list):
        if not raw:
            raise ConfigError(where, "an empty list: give at least one data file")
        return [_specs(r, f"{where}.{j}", base_dir, inherit) for j, r in enumerate(raw)]
    if inherit is not None:
        raw = _inherit_chat(_expand(raw), inherit)
    return DataSpec.from_dict(_expand(raw), where=where, base_dir=base_dir)


def _expand(spec: dict | str) -> dict | str:
    """``${assets}`` in a data path -> the shared assets folder."""
    path = spec if isinstance(spec, str) else spec.get("path")
    if not isinstance(path, str) or "${assets}" not in path:
        return spec
    path = expand_assets(path, "data.path")
    return path if isinstance(spec, str) else {**spec, "path": path}


def expand_assets(path: str, field: str) -> str:
    """``path`` with ``${assets}`` replaced by the shared assets folder (data files, expert folders)."""
    if "${assets}" not in path:
        return path
    from ..loading import find_assets

    assets = find_assets()
    if assets is None:
        raise ConfigError(field, f"{path}: no shared assets folder found (set $PARADAPT_ASSETS)")
    return path.replace("${assets}", str(assets))


CHAT_KEYS = ("task", "prompt_template", "system", "labels")  # what eval_data takes from data


def _inherit_chat(eval_data: dict | str, train: DataSpec) -> dict | str:
    """Chat eval rows are rendered as the training rows are: ``eval_data`` takes ``data``'s
    ``task: chat``, ``prompt_template``, ``system`` and ``labels`` unless it sets its own."""
    if train.task != "chat" and train.prompt_template is None:
        return eval_data
    spec = {"path": eval_data} if isinstance(eval_data, str) else dict(eval_data)
    for key in CHAT_KEYS:
        value = getattr(train, key)
        if key not in spec and value is not None and (key != "task" or value == "chat"):
            spec[key] = dict(value) if isinstance(value, dict) else value
    return spec


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` (no dot) as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
