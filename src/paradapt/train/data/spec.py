"""``DataSpec``: where a data set is and how to read it (one ``data:`` entry of a training config)."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...checks import is_int
from ...errors import ConfigError
from .labels import LabelMap, canon_label
from .records import Label, short_repr

FORMATS = ("auto", "jsonl", "csv", "tsv", "txt")
TASKS = ("auto", "lm", "completion", "classification", "chat")
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")  # a ``{field}`` of ``prompt_template``
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "txt"}


@dataclass
class DataSpec:
    """Where a data set is and how to read it (one ``data:`` entry of a training config).

    ``limit`` keeps the first N records *of the file* (before any split or shuffle), so
    a quick run reads only the head of a big file. ``header="auto"`` treats the first
    csv/tsv row as a header when it contains one of the configured field names.
    ``txt_separator`` splits a .txt file into documents; when it does not occur the
    whole file is one document (to be packed into blocks).

    Chat data (``task: chat``, see :mod:`.chat`): a ``messages_field`` list of ``{role, content}``
    (detected), ``prompt``/``completion`` with ``task: chat``, or a labelled row turned into one
    turn by ``prompt_template`` (the user message; ``{text}`` is the text field, ``{name}`` any
    other field) with ``labels`` mapping each raw label to its answer word (a list keeps the
    labels as they are, as answers). ``system`` starts every conversation that has no system
    message of its own.
    """

    path: str
    format: str = "auto"
    header: bool | str = "auto"
    columns: list[str] | None = None
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    label_field: str = "label"
    messages_field: str = "messages"
    task: str = "auto"
    labels: list[Label] | dict[Label, str] | None = None
    prompt_template: str | None = None
    system: str | None = None
    limit: int | None = None
    txt_separator: str | None = "<|endoftext|>"
    where: str = field(default="data", repr=False, compare=False)  # config prefix for messages

    def __post_init__(self) -> None:
        self.path = os.fspath(self.path) if isinstance(self.path, os.PathLike) else self.path
        self.validate()

    @classmethod
    def keys(cls) -> list[str]:
        """The keys a config may set (``where`` is internal)."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "where"]

    @classmethod
    def from_dict(
        cls, d: dict | str | os.PathLike, where: str = "data", base_dir: str | os.PathLike | None = None
    ) -> DataSpec:
        """Build from a config mapping (or a bare path); unknown keys fail with a did-you-mean.

        A relative ``path`` is resolved against ``base_dir`` (the config file's folder) when given,
        so a config works from any working directory.
        """
        if isinstance(d, (str, os.PathLike)):
            d = {"path": os.fspath(d)}
        if not isinstance(d, dict):
            raise ConfigError(where, f"must be a mapping with at least 'path', got {type(d).__name__}")
        keys = cls.keys()
        for key in d:
            if key not in keys:
                hint = difflib.get_close_matches(str(key), keys, n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {keys}"
                raise ConfigError(f"{where}.{key}", f"unknown key{extra}")
        if "path" not in d or d["path"] in (None, ""):
            raise ConfigError(f"{where}.path", "required: the data file to read")
        values = dict(d)
        if not isinstance(values["path"], (str, os.PathLike)):
            raise ConfigError(f"{where}.path", f"must be a file path, got {values['path']!r}")
        path = Path(values["path"])
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        values["path"] = str(path)
        return cls(**values, where=where)

    def to_dict(self) -> dict:
        """The config keys and values (round-trips through :meth:`from_dict`)."""
        return {k: getattr(self, k) for k in self.keys()}

    def validate(self) -> None:
        """Check every value, naming the field as ``<where>.<key>``."""
        w = self.where
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(f"{w}.path", f"must be a file path, got {self.path!r}")
        check_choice(self.format, FORMATS, f"{w}.format")
        check_choice(self.task, TASKS, f"{w}.task")
        if self.header not in (True, False, "auto"):
            raise ConfigError(f"{w}.header", f"must be true, false or 'auto', got {self.header!r}")
        for key in ("text_field", "prompt_field", "completion_field", "label_field", "messages_field"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{w}.{key}", f"must be a non-empty string, got {value!r}")
        if self.columns is not None:
            if (
                not isinstance(self.columns, (list, tuple))
                or not self.columns
                or not all(isinstance(c, str) and c for c in self.columns)
            ):
                raise ConfigError(f"{w}.columns", f"must be a list of column names, got {self.columns!r}")
            if len(set(self.columns)) != len(self.columns):
                raise ConfigError(f"{w}.columns", f"has duplicate names: {self.columns!r}")
            self.columns = list(self.columns)
        if self.limit is not None and (not is_int(self.limit) or self.limit < 1):
            raise ConfigError(f"{w}.limit", f"must be a positive integer, got {self.limit!r}")
        if self.txt_separator is not None and not isinstance(self.txt_separator, str):
            raise ConfigError(f"{w}.txt_separator", f"must be a string, got {self.txt_separator!r}")
        self._validate_chat()
        if isinstance(self.labels, dict):
            self.labels = answer_words(self.labels, f"{w}.labels")
        elif self.labels is not None:
            LabelMap(self.labels, where=f"{w}.labels")  # checks types and duplicates
            self.labels = list(self.labels)
        fmt = self.resolved_format()
        if fmt == "txt" and self.task not in ("auto", "lm"):
            raise ConfigError(
                f"{w}.task", f"a .txt file holds plain text, so the task is 'lm', not {self.task!r}"
            )
        if fmt in ("csv", "tsv") and self.header is False and self.columns is None:
            raise ConfigError(
                f"{w}.columns", f"a {fmt} file without a header needs column names, e.g. ['text', 'label']"
            )

    def _validate_chat(self) -> None:
        """The chat keys: ``prompt_template`` names a field, ``labels`` as a mapping needs it."""
        w = self.where
        if self.prompt_template is not None:
            if not isinstance(self.prompt_template, str) or not PLACEHOLDER.search(self.prompt_template):
                raise ConfigError(
                    f"{w}.prompt_template",
                    "must be a string holding {text} (or another {field} of the row) where the input goes, "
                    f"got {short_repr(self.prompt_template)}",
                )
            if self.task not in ("auto", "chat"):
                raise ConfigError(
                    f"{w}.prompt_template",
                    f"turns rows into chat turns, so the task is 'chat', not {self.task!r}",
                )
        if self.system is not None and (not isinstance(self.system, str) or not self.system):
            raise ConfigError(f"{w}.system", f"must be a non-empty string, got {self.system!r}")
        if self.system is not None and self.task not in ("auto", "chat"):
            raise ConfigError(f"{w}.system", f"is a chat system message, but the task is {self.task!r}")
        if isinstance(self.labels, dict) and self.prompt_template is None:
            raise ConfigError(
                f"{w}.labels",
                "a mapping of labels to answer words needs a prompt_template (chat turns); "
                "a classification head takes a list of labels",
            )

    def resolved_format(self) -> str:
        """The file format: ``format``, or the one its extension implies."""
        if self.format != "auto":
            return self.format
        ext = Path(self.path).suffix.lower()
        if ext not in EXTENSIONS:
            raise ConfigError(
                f"{self.where}.format",
                f"cannot tell the format of {self.path!r} from its extension; set format to jsonl, csv, tsv or txt",
            )
        return EXTENSIONS[ext]

    def field_names(self) -> list[str]:
        """The configured field names, used to recognise a header row."""
        names = [self.text_field, self.prompt_field, self.completion_field, self.label_field]
        if self.prompt_template is not None:
            names += [n for n in PLACEHOLDER.findall(self.prompt_template) if n != "text"]
        return names

    def template_fields(self) -> dict[str, str]:
        """``prompt_template``'s placeholders -> the row fields they read (``{text}``: ``text_field``)."""
        names = PLACEHOLDER.findall(self.prompt_template or "")
        return {n: self.text_field if n == "text" else n for n in dict.fromkeys(names)}


def answer_words(labels: dict, where: str) -> dict[Label, str]:
    """``{raw label: answer word}`` with canonical keys (``0``, ``"0"`` and ``0.0`` are one label)."""
    if not labels:
        raise ConfigError(where, "must map each label to its answer word, got an empty mapping")
    out: dict[Label, str] = {}
    for raw, word in labels.items():
        if not (is_int(raw) or isinstance(raw, str)):
            raise ConfigError(where, f"each label must be a string or an integer, got {raw!r}")
        if not isinstance(word, str) or not word.strip():
            raise ConfigError(f"{where}.{raw}", f"the answer must be a non-empty string, got {word!r}")
        key = canon_label(raw)
        if key in out:
            raise ConfigError(where, f"label {raw!r} is given twice")
        out[key] = word
    return out


def check_choice(value: Any, choices: Sequence[str], name: str) -> None:
    """``value`` is one of ``choices``, else a ConfigError naming ``name`` with a did-you-mean."""
    if value not in choices:
        hint = difflib.get_close_matches(str(value), list(choices), n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(name, f"must be one of {list(choices)}, got {value!r}{extra}")
