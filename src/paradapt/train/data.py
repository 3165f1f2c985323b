"""Training data: read a file, normalise its records, tokenize them and batch them.

The pipeline is ``DataSpec`` (what the config says) -> :func:`load_records` (plain dicts,
each remembering its ``file:line`` so any later error can point at it) -> :class:`LabelMap`
(classification only) -> :func:`tokenize` (a :class:`TokenizedDataset`) -> :func:`collate`.

Records are normalised to one of three shapes, which also name the task:

* ``{"text"}``: causal language modelling (``lm``), loss on every token;
* ``{"prompt", "completion"}``: ``completion``, loss on the completion tokens only;
* ``{"text", "label"}``: ``classification``, one label id per text.

Private keys ``_file`` and ``_line`` ride along in each record for error messages.
Nothing here needs a model: only its tokenizer.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import functools
import json
import math
import os
import random
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, ParadaptError

FORMATS = ("auto", "jsonl", "csv", "tsv", "txt")
TASKS = ("auto", "lm", "completion", "classification")
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "txt"}
IGNORE_INDEX = -100  # label value the loss skips (torch / Hugging Face convention)

Label = int | str


class DataError(ParadaptError, ValueError):
    """A data file is missing or has a bad record. ``path`` and ``line`` (1-based, or None) name it."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {message}")


# --------------------------------------------------------------------------- spec


@dataclass
class DataSpec:
    """Where a data set is and how to read it (one ``data:`` entry of a training config).

    ``limit`` keeps the first N records *of the file* (before any split or shuffle), so
    a quick run reads only the head of a big file. ``header="auto"`` treats the first
    csv/tsv row as a header when it contains one of the configured field names.
    ``txt_separator`` splits a .txt file into documents; when it does not occur the
    whole file is one document (to be packed into blocks).
    """

    path: str
    format: str = "auto"
    header: bool | str = "auto"
    columns: list[str] | None = None
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    label_field: str = "label"
    task: str = "auto"
    labels: list[Label] | None = None
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
        _check_choice(self.format, FORMATS, f"{w}.format")
        _check_choice(self.task, TASKS, f"{w}.task")
        if self.header not in (True, False, "auto"):
            raise ConfigError(f"{w}.header", f"must be true, false or 'auto', got {self.header!r}")
        for key in ("text_field", "prompt_field", "completion_field", "label_field"):
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
        if self.limit is not None and (
            not isinstance(self.limit, int) or isinstance(self.limit, bool) or self.limit < 1
        ):
            raise ConfigError(f"{w}.limit", f"must be a positive integer, got {self.limit!r}")
        if self.txt_separator is not None and not isinstance(self.txt_separator, str):
            raise ConfigError(f"{w}.txt_separator", f"must be a string, got {self.txt_separator!r}")
        if self.labels is not None:
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
        return [self.text_field, self.prompt_field, self.completion_field, self.label_field]


def _check_choice(value: Any, choices: Sequence[str], name: str) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), list(choices), n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(name, f"must be one of {list(choices)}, got {value!r}{extra}")


# --------------------------------------------------------------------------- reading


def load_records(spec: DataSpec) -> list[dict]:
    """Read ``spec.path`` into normalised records (see the module doc), at most ``spec.limit``.

    Every record carries ``_file`` and ``_line`` so later steps (labels, tokenization)
    can name the line at fault. Raises :class:`DataError` for a missing file, a malformed
    line, a missing field or an empty data set.
    """
    path = Path(spec.path)
    if not path.exists():
        raise DataError(path, None, f"data file not found (from {spec.where}.path; cwd is {os.getcwd()})")
    if path.is_dir():
        raise DataError(path, None, f"is a directory, expected a data file ({spec.where}.path)")
    fmt = spec.resolved_format()
    rows = {"jsonl": _read_jsonl, "csv": _read_csv, "tsv": _read_csv, "txt": _read_txt}[fmt](spec, fmt)
    records: list[dict] = []
    task = "lm" if fmt == "txt" else spec.task
    try:
        for line, row in rows:
            if task == "auto":
                task = _detect_task(spec, row, path, line)
            records.append(_normalise(spec, task, row, path, line))
            if spec.limit is not None and len(records) >= spec.limit:
                break  # before reading on: a bad line after the limit does not matter
    except UnicodeDecodeError as e:
        raise DataError(path, None, f"not valid UTF-8 ({e})") from None
    if not records:
        raise DataError(path, None, "no records: the data set is empty")
    return records


def _read_jsonl(spec: DataSpec, fmt: str) -> Iterator[tuple[int, dict]]:
    """One JSON object a line; blank lines are skipped."""
    path = spec.path
    with open(path, encoding="utf-8-sig") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(path, n, f"malformed JSON line: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(
                    path, n, f"expected a JSON object on each line, got {type(obj).__name__} (use JSON lines)"
                )
            yield n, obj


def _read_csv(spec: DataSpec, fmt: str) -> Iterator[tuple[int, dict]]:
    """csv (standard quoting) or tsv (no quoting: SST-2 and AG News hold raw quotes)."""
    path = spec.path
    if fmt == "tsv":
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    else:
        dialect = {"delimiter": ",", "quoting": csv.QUOTE_MINIMAL}
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, **dialect)
        names: list[str] | None = None
        start = 1  # first line of the next row (a quoted csv row may span lines)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(path, reader.line_num or start, f"malformed {fmt} row: {e}") from None
            line, start = start, reader.line_num + 1
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if names is None:
                if _is_header(spec, row):
                    names = list(spec.columns) if spec.columns is not None else [c.strip() for c in row]
                    continue
                if spec.columns is None:
                    raise DataError(
                        path,
                        line,
                        f"the first row is not a header (it has none of the fields {spec.field_names()}): "
                        f"{_short(row)}; set {spec.where}.columns (e.g. ['text', 'label']), "
                        "or the *_field names to the header's",
                    )
                names = list(spec.columns)
            if len(row) != len(names):
                raise DataError(
                    path,
                    line,
                    f"expected {len(names)} columns ({', '.join(names)}), found {len(row)}"
                    + (" (a tab inside the text?)" if fmt == "tsv" and len(row) > len(names) else ""),
                )
            yield line, dict(zip(names, row, strict=True))


def _is_header(spec: DataSpec, row: list[str]) -> bool:
    """``header: true``, or ``auto`` and the row holds one of the configured field names."""
    if spec.header == "auto":
        return bool({c.strip() for c in row} & set(spec.field_names()))
    return spec.header is True


def _read_txt(spec: DataSpec, fmt: str) -> Iterator[tuple[int, dict]]:
    """Documents split at ``txt_separator``, stripped; empty ones skipped."""
    text = Path(spec.path).read_text(encoding="utf-8-sig")
    sep = spec.txt_separator
    parts = text.split(sep) if sep else [text]
    line = 1
    for part in parts:
        doc = part.strip()
        if doc:
            lead = len(part) - len(part.lstrip())
            yield line + part.count("\n", 0, lead), {spec.text_field: doc}
        line += part.count("\n") + (sep.count("\n") if sep else 0)


def _detect_task(spec: DataSpec, row: dict, path: Path, line: int) -> str:
    """``task: auto``: a label means classification, a prompt or completion means completion."""
    if spec.label_field in row:
        return "classification"
    if spec.prompt_field in row or spec.completion_field in row:
        return "completion"
    if spec.text_field in row:
        return "lm"
    raise DataError(
        path,
        line,
        f"cannot tell the task: no field {spec.text_field!r}, {spec.prompt_field!r}/"
        f"{spec.completion_field!r} or {spec.label_field!r} (fields found: {sorted(row)}); "
        f"set {spec.where}.text_field (or prompt_field, completion_field, label_field) to your field names",
    )


def _normalise(spec: DataSpec, task: str, row: dict, path: Path, line: int) -> dict:
    """Map the file's field names to the canonical ones for ``task``."""
    if task == "lm":
        wanted = {"text": spec.text_field}
    elif task == "completion":
        wanted = {"prompt": spec.prompt_field, "completion": spec.completion_field}
    else:
        wanted = {"text": spec.text_field, "label": spec.label_field}
    rec: dict = {}
    for canon, name in wanted.items():
        if name not in row:
            raise DataError(
                path,
                line,
                f"missing field {name!r} for task {task!r} (fields found: {sorted(row)}); "
                f"set {spec.where}.{canon}_field to the right name",
            )
        value = row[name]
        if canon != "label" and not isinstance(value, str):
            raise DataError(path, line, f"field {name!r} must be a string, got {_short(value)}")
        rec[canon] = value
    if task == "classification":
        _check_label_type(rec["label"], str(path), line)
    rec["_file"] = str(path)
    rec["_line"] = line
    return rec


def _short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def infer_task(records: Sequence[dict]) -> str:
    """The task that normalised records imply (their keys name it)."""
    if not records:
        raise ParadaptError("no records")
    first = records[0]
    if "label" in first:
        return "classification"
    if "prompt" in first:
        return "completion"
    return "lm"


def source_of(record: dict) -> tuple[str, int | None]:
    """``(file, line)`` of a record, for :class:`DataError`."""
    return record.get("_file", "<records>"), record.get("_line")


# --------------------------------------------------------------------------- labels

_INT_RE = re.compile(r"-?(0|[1-9][0-9]*)")


def _check_label_type(label: Any, path: str, line: int | None) -> None:
    if isinstance(label, float) and label.is_integer():
        return
    if not isinstance(label, (int, str)):
        raise DataError(path, line, f"a class label must be a string or an integer, got {_short(label)}")


def _canon(label: Any) -> Label:
    """Integers, integral floats and canonical integer strings ("3", not "03") become ints."""
    if isinstance(label, bool):
        return int(label)
    if isinstance(label, int):
        return label
    if isinstance(label, float) and label.is_integer():
        return int(label)
    if isinstance(label, str) and _INT_RE.fullmatch(label.strip()):
        return int(label.strip())
    return label


def _str_key(label: Any) -> str:
    """The key of a label in a map of string labels (1.0 and True read as "1")."""
    return str(_canon(label)) if isinstance(label, (bool, float)) else str(label)


class LabelMap:
    """Class labels <-> ids 0..K-1, saved next to a classification head.

    Built from the training records (sorted unique labels: integers in numeric order when
    every label is an integer, as in SST-2's "0"/"1", else strings in sorted order) or from
    an explicit list, whose order is kept. Any other label fails naming its ``file:line``.
    """

    def __init__(self, labels: Sequence[Any], where: str = "labels"):
        if not isinstance(labels, (list, tuple)) or not labels:
            raise ConfigError(where, f"must be a non-empty list of class labels, got {labels!r}")
        for label in labels:
            if isinstance(label, bool) or not isinstance(label, (int, str)):
                raise ConfigError(where, f"each label must be a string or an integer, got {label!r}")
        canon = [_canon(x) for x in labels]
        self.numeric = all(isinstance(x, int) for x in canon)
        self.labels: list[Label] = canon if self.numeric else [str(x) for x in labels]
        self.index: dict[Label, int] = {}
        for i, label in enumerate(self.labels):
            if label in self.index:
                raise ConfigError(where, f"duplicate label {label!r} in {list(labels)!r}")
            self.index[label] = i

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> LabelMap:
        """The sorted unique labels of ``records`` (the training set)."""
        seen = {_canon(r["label"]) for r in records}
        if all(isinstance(x, int) for x in seen):
            return cls(sorted(seen))
        return cls(sorted({_str_key(r["label"]) for r in records}))

    @classmethod
    def build(cls, records: Sequence[dict], labels: Sequence[Any] | None = None) -> LabelMap:
        """The explicit ``labels`` if given (checking every record against them), else from ``records``."""
        label_map = cls(labels, where="data.labels") if labels is not None else cls.from_records(records)
        label_map.check(records)
        return label_map

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def _key(self, label: Any) -> Label | None:
        canon = _canon(label)
        if self.numeric:
            return canon if isinstance(canon, int) else None
        return _str_key(label)

    def id_of(self, label: Any, path: str = "<labels>", line: int | None = None) -> int:
        """The id of ``label``; a label outside the map fails naming ``path:line``."""
        key = self._key(label)
        if key is None or key not in self.index:
            raise DataError(
                path,
                line,
                f"label {label!r} is not one of the {self.num_labels} classes {self.labels!r}"
                " (the head's labels come from the training data or data.labels)",
            )
        return self.index[key]

    def encode(self, record: dict) -> int:
        """The id of a record's label."""
        return self.id_of(record["label"], *source_of(record))

    def check(self, records: Sequence[dict]) -> None:
        """Fail on the first record whose label is outside the map."""
        for r in records:
            self.encode(r)

    def to_dict(self) -> dict:
        return {"labels": list(self.labels)}

    @classmethod
    def from_dict(cls, d: dict) -> LabelMap:
        if not isinstance(d, dict) or "labels" not in d:
            raise ConfigError("labels", f"a saved label map needs a 'labels' list, got {d!r}")
        return cls(d["labels"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and self.labels == other.labels

    def __repr__(self) -> str:
        return f"LabelMap({self.labels!r})"


# --------------------------------------------------------------------------- tokenizing


class TokenizedDataset(Dataset):
    """Examples as dicts of int lists, ready for :func:`collate`.

    ``task`` is "lm", "completion" or "classification"; ``labels`` the :class:`LabelMap`
    (classification) or None; ``num_truncated`` how many records were cut to ``max_length``;
    ``num_dropped`` how many were left out (completion prompts that filled ``max_length``);
    ``pad_id`` the id :func:`collate` pads ``input_ids`` with.
    """

    def __init__(
        self,
        examples: list[dict],
        task: str,
        labels: LabelMap | None = None,
        num_truncated: int = 0,
        num_dropped: int = 0,
        pad_id: int | None = None,
        max_length: int | None = None,
    ):
        self.examples = examples
        self.task = task
        self.labels = labels
        self.num_truncated = num_truncated
        self.num_dropped = num_dropped
        self.pad_id = pad_id
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]

    def num_tokens(self) -> int:
        """Tokens in the data set (real tokens, no padding)."""
        return sum(len(e["input_ids"]) for e in self.examples)

    def collate_fn(self, padding_side: str = "right") -> Callable[[list[dict]], dict]:
        """A ``collate_fn`` for ``DataLoader`` that pads with this data set's ``pad_id``."""
        if self.pad_id is None:
            raise ParadaptError("this data set has no pad_id; pass one to collate()")
        return functools.partial(collate, pad_id=self.pad_id, padding_side=padding_side)


def pad_id_of(tokenizer: Any, pad_id: int | None = None) -> int:
    """``pad_id`` if given, else the tokenizer's pad token, else unk, else eos.

    Padded positions are masked out (attention 0, label -100), so the id only needs to be a
    valid embedding row; stories260K has no pad token and pads with ``<unk>`` (0).
    """
    if pad_id is not None:
        return int(pad_id)
    for name in ("pad_token_id", "unk_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise ConfigError("pad_id", "the tokenizer has no pad, unk or eos token; set pad_id")


def _resolve_max_length(tokenizer: Any, max_length: int | None) -> int:
    if max_length is None:
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < 1_000_000:
            return limit
        raise ConfigError("max_length", "the tokenizer sets no model_max_length; set max_length")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ConfigError("max_length", f"must be an integer >= 2, got {max_length!r}")
    return max_length


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool, **kw: Any) -> dict:
    """Batch-encode without padding; ``verbose=False`` because we report truncation ourselves."""
    if not texts:
        return {"input_ids": []}
    return tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False, **kw)


def tokenize(
    records: Sequence[dict],
    tokenizer: Any,
    *,
    max_length: int | None = None,
    task: str | None = None,
    labels: LabelMap | None = None,
    packing: bool = True,
    add_eos: bool = True,
    pad_id: int | None = None,
) -> TokenizedDataset:
    """Tokenize normalised records with the model's own tokenizer.

    * classification: ``input_ids``/``attention_mask`` (+``token_type_ids`` when the tokenizer
      gives them) truncated to ``max_length`` by the tokenizer (special tokens kept), ``labels``
      the class id from ``labels`` (built from ``records`` when None: pass the training map
      when tokenizing an eval set);
    * lm: each document as the tokenizer encodes it (BOS if it adds one) plus EOS (``add_eos``);
      ``packing=True`` concatenates them and cuts blocks of exactly ``max_length`` (the last
      partial block is dropped unless it is the only one), ``packing=False`` truncates each
      document. ``labels`` equal ``input_ids`` (models shift them);
    * completion: prompt (with the tokenizer's special tokens) + completion (+EOS), labels -100
      on the prompt. Each part is tokenized alone, so put the separating space at the start of
      the completion. Over-long examples are cut at the end; one whose prompt fills
      ``max_length`` has nothing left to learn and is dropped.

    Truncation is reported by ONE warning with the count, not one per record.
    """
    if not records:
        raise ParadaptError("no records to tokenize")
    task = task or infer_task(records)
    _check_choice(task, TASKS[1:], "task")
    needed = {"lm": ("text",), "completion": ("prompt", "completion"), "classification": ("text", "label")}[
        task
    ]
    missing = [k for k in needed if k not in records[0]]
    if missing:
        raise DataError(
            *source_of(records[0]), f"task {task!r} needs record fields {missing} (load with that task)"
        )
    max_length = _resolve_max_length(tokenizer, max_length)
    pad = pad_id_of(tokenizer, pad_id)
    dropped = 0
    if task == "classification":
        labels = labels if labels is not None else LabelMap.from_records(records)
        examples, truncated = _tokenize_classification(records, tokenizer, max_length, labels)
    elif task == "lm":
        labels = None
        if packing:
            examples, truncated = _tokenize_packed(records, tokenizer, max_length, add_eos), 0
        else:
            examples, truncated = _tokenize_lm(records, tokenizer, max_length, add_eos)
    else:
        labels = None
        examples, truncated, dropped = _tokenize_completion(records, tokenizer, max_length, add_eos)
    if truncated or dropped:
        msg = f"{truncated} of {len(records)} records were longer than max_length={max_length} tokens and were truncated"
        if dropped:
            msg += f"; {dropped} were dropped because the prompt alone fills max_length"
        warnings.warn(msg, stacklevel=2)
    if not examples:
        path, _ = source_of(records[0])
        raise DataError(path, None, f"no examples left after tokenizing with max_length={max_length}")
    return TokenizedDataset(examples, task, labels, truncated, dropped, pad, max_length)


def _tokenize_classification(
    records: Sequence[dict], tokenizer: Any, max_length: int, labels: LabelMap
) -> tuple[list[dict], int]:
    """Encode once without truncation to count, then re-encode only the long ones truncated."""
    ids = [labels.encode(r) for r in records]  # label errors first: they name file:line
    enc = _encode(tokenizer, [r["text"] for r in records], True)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    long = [i for i, x in enumerate(enc["input_ids"]) if len(x) > max_length]
    fixed = {}
    if long:
        cut = _encode(
            tokenizer, [records[i]["text"] for i in long], True, truncation=True, max_length=max_length
        )
        fixed = {i: {k: cut[k][j] for k in keys} for j, i in enumerate(long)}
    examples = []
    for i, label_id in enumerate(ids):
        ex = fixed.get(i) or {k: enc[k][i] for k in keys}
        ex = dict(ex)
        ex.setdefault("attention_mask", [1] * len(ex["input_ids"]))
        ex["labels"] = label_id
        examples.append(ex)
    return examples, len(long)


def _doc_ids(records: Sequence[dict], tokenizer: Any, add_eos: bool) -> list[list[int]]:
    """Each document's ids (with the tokenizer's special tokens) and EOS when wanted."""
    enc = _encode(tokenizer, [r["text"] for r in records], True)
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    for ids in enc["input_ids"]:
        ids = list(ids)
        if add_eos and isinstance(eos, int) and (not ids or ids[-1] != eos):
            ids.append(eos)
        out.append(ids)
    return out


def _tokenize_packed(records: Sequence[dict], tokenizer: Any, max_length: int, add_eos: bool) -> list[dict]:
    """Concatenate all documents and cut blocks of exactly ``max_length`` tokens."""
    stream = [t for ids in _doc_ids(records, tokenizer, add_eos) for t in ids]
    n_full = len(stream) // max_length
    blocks = [stream[i * max_length : (i + 1) * max_length] for i in range(n_full)]
    if not blocks and stream:
        blocks = [stream]  # shorter than one block: keep it (collate pads)
    return [{"input_ids": b, "attention_mask": [1] * len(b), "labels": list(b)} for b in blocks]


def _tokenize_lm(
    records: Sequence[dict], tokenizer: Any, max_length: int, add_eos: bool
) -> tuple[list[dict], int]:
    """One example per document, cut to ``max_length`` (a cut document loses its EOS)."""
    examples, truncated = [], 0
    for ids in _doc_ids(records, tokenizer, add_eos):
        if len(ids) > max_length:
            ids, truncated = ids[:max_length], truncated + 1
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    return examples, truncated


def _tokenize_completion(
    records: Sequence[dict], tokenizer: Any, max_length: int, add_eos: bool
) -> tuple[list[dict], int, int]:
    """prompt + completion with the loss masked (-100) on the prompt."""
    prompts = _encode(tokenizer, [r["prompt"] for r in records], True)["input_ids"]
    comps = _encode(tokenizer, [r["completion"] for r in records], False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    examples, truncated, dropped = [], 0, 0
    for p, c in zip(prompts, comps, strict=True):
        c = list(c) + ([eos] if add_eos and isinstance(eos, int) else [])
        ids, labels = list(p) + c, [IGNORE_INDEX] * len(p) + c
        if len(ids) > max_length:
            truncated += 1
            if len(p) >= max_length:
                dropped += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return examples, truncated, dropped


# --------------------------------------------------------------------------- batching


def collate(batch: Sequence[dict], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of examples into a batch of tensors.

    ``input_ids`` pad with ``pad_id``, ``attention_mask``/``token_type_ids`` with 0, sequence
    ``labels`` with -100 (the loss skips them); integer ``labels`` (classification) become a
    1-D LongTensor. Get ``pad_id`` from :func:`pad_id_of`.
    """
    if padding_side not in ("right", "left"):
        raise ConfigError("padding_side", f"must be 'right' or 'left', got {padding_side!r}")
    if not batch:
        raise ParadaptError("cannot collate an empty batch")
    width = max(len(ex["input_ids"]) for ex in batch)
    out: dict[str, torch.Tensor] = {}
    for key in batch[0]:
        values = [ex[key] for ex in batch]
        if not isinstance(values[0], (list, tuple)):
            out[key] = torch.tensor(values, dtype=torch.long)
            continue
        fill = pad_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
        rows = []
        for v in values:
            pad = [fill] * (width - len(v))
            rows.append(list(v) + pad if padding_side == "right" else pad + list(v))
        out[key] = torch.tensor(rows, dtype=torch.long)
    return out


def length_buckets(
    lengths: Sequence[int],
    parts: int,
    max_tokens: int | None = None,
    forward_cost: float | None = None,
) -> list[list[int]]:
    """Row indices grouped into micro-batches that are padded as little as possible.

    A micro-batch pads every row to its longest, so its cost is ``rows x longest row``
    ("padded tokens"). The rows are sorted by length and cut into contiguous runs by an exact
    dynamic programme over the cut points; some optimal partition into g groups is always
    such a run of the sorted rows, so no other grouping into g micro-batches pads less.

    * ``forward_cost=None``: exactly ``parts`` micro-batches (fewer only when there are fewer rows);
    * ``forward_cost=c``: at most ``parts`` micro-batches, as many as minimise padded tokens +
      ``c`` x micro-batches (``c``: the fixed cost of one forward and backward, in tokens);
    * ``max_tokens``: no micro-batch holds more padded tokens (more micro-batches when needed).
      A row longer than ``max_tokens`` is an error (the trainer checks the data up front).

    Each micro-batch lists its rows in their original order (so the result is deterministic).
    """
    n = len(lengths)
    if n == 0:
        return []
    if parts < 1:
        raise ConfigError("micro_batches", f"must be >= 1, got {parts}")
    longest = max(lengths)
    if max_tokens is not None and longest > max_tokens:
        raise ConfigError(
            "micro_batch_tokens", f"a row of {longest} tokens does not fit a budget of {max_tokens}"
        )
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    width = torch.tensor([0] + [lengths[i] for i in order], dtype=torch.float64)  # width[j]: row j-1
    first = torch.arange(n + 1, dtype=torch.float64).unsqueeze(1)
    stop = torch.arange(n + 1, dtype=torch.float64).unsqueeze(0)
    cost = (stop - first) * width.unsqueeze(0)  # cost[i, j]: sorted rows i..j-1 in one micro-batch
    ok = stop > first
    if max_tokens is not None:
        ok &= cost <= max_tokens
    cost = torch.where(ok, cost, torch.full_like(cost, math.inf))
    real = float(sum(lengths))
    best = torch.full((n + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    choices: list[torch.Tensor] = []  # per group count g: the best start of the g-th group, per end
    parts = min(parts, n)
    chosen, score = 0, math.inf  # the group count kept, and its padded tokens + forward costs
    while True:
        best, arg = (best.unsqueeze(1) + cost).min(0)
        choices.append(arg)
        g, total = len(choices), float(best[n])
        if not math.isfinite(total):
            continue  # max_tokens needs more micro-batches
        here = total + (forward_cost or 0.0) * g
        if here < score or forward_cost is None:  # without a cost: the last count, ``parts``
            chosen, score = g, here
        # more micro-batches cannot pad less than the real tokens: stop once they cannot win
        if g >= parts or (forward_cost is not None and real + forward_cost * (g + 1) >= score):
            break
    cuts, end = [n], n
    for arg in reversed(choices[:chosen]):
        end = int(arg[end])
        cuts.append(end)
    cuts.reverse()
    return [sorted(order[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]


# --------------------------------------------------------------------------- splitting and order


def split(records: Sequence[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split into (train, eval) by a seeded shuffle; each part keeps file order.

    Split records (documents) before tokenizing, so packed blocks never straddle the two.
    The eval part holds ``round(n * eval_fraction)`` records, at least 1 and at most n - 1.
    Use a separate eval file instead by loading it with its own :class:`DataSpec`.
    """
    if (
        not isinstance(eval_fraction, (int, float))
        or isinstance(eval_fraction, bool)
        or not 0 < eval_fraction < 1
    ):
        raise ConfigError(
            "eval_fraction", f"must be a number between 0 and 1 (exclusive), got {eval_fraction!r}"
        )
    n = len(records)
    if n < 2:
        path, _ = source_of(records[0]) if records else ("<records>", None)
        raise DataError(
            path,
            None,
            f"cannot split {n} record(s) into train and eval; give an eval file (or a txt_separator)",
        )
    k = min(max(round(n * eval_fraction), 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    train = [r for i, r in enumerate(records) if i not in held]
    evals = [r for i, r in enumerate(records) if i in held]
    return train, evals


def seeded_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of ``epoch``: a function of (seed, epoch) only.

    A resumed run recomputes the same order and skips the examples already seen.
    """
    gen = torch.Generator().manual_seed(int(seed) + int(epoch))
    return torch.randperm(n, generator=gen).tolist()


# --------------------------------------------------------------------------- all together


def build_datasets(
    train: DataSpec,
    tokenizer: Any,
    *,
    eval_spec: DataSpec | None = None,
    eval_fraction: float | None = None,
    seed: int = 0,
    max_length: int | None = None,
    packing: bool = True,
    add_eos: bool = True,
    pad_id: int | None = None,
) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Train (and eval) data sets in the right order of steps.

    Eval comes from its own file, else from ``split(train, eval_fraction, seed)``, else none.
    The label map comes from the training records (or ``train.labels``) and every eval
    label is checked against it, so an eval-only class fails naming its line.
    """
    if eval_spec is not None and eval_fraction is not None:
        raise ConfigError("eval_fraction", "give either an eval file or eval_fraction, not both")
    train_records = load_records(train)
    if eval_spec is not None:
        eval_records: list[dict] | None = load_records(eval_spec)
    elif eval_fraction is not None:
        train_records, eval_records = split(train_records, eval_fraction, seed)
    else:
        eval_records = None
    task = infer_task(train_records)
    if eval_records is not None and infer_task(eval_records) != task:
        path, line = source_of(eval_records[0])
        raise DataError(
            path, line, f"eval records are for task {infer_task(eval_records)!r}, training ones for {task!r}"
        )
    label_map = LabelMap.build(train_records, train.labels) if task == "classification" else None
    if label_map is not None and eval_records is not None:
        label_map.check(eval_records)
    kw = {"max_length": max_length, "task": task, "packing": packing, "add_eos": add_eos, "pad_id": pad_id}
    train_ds = tokenize(train_records, tokenizer, labels=label_map, **kw)
    eval_ds = tokenize(eval_records, tokenizer, labels=label_map, **kw) if eval_records else None
    return train_ds, eval_ds
