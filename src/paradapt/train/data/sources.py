"""Reading a data file (jsonl, csv, tsv, txt) into normalised records (see :mod:`.records`).

Every record remembers its ``file:line``, so any later error (labels, tokenization) can point at it.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

from ...errors import ConfigError
from .chat import chat_record
from .labels import check_label_type
from .records import DataError, short_repr
from .spec import DataSpec


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
    if task != "chat" and spec.system is not None:
        raise ConfigError(
            f"{spec.where}.system", f"is a chat system message, but the rows are for task {task!r}"
        )
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
                        f"{short_repr(row)}; set {spec.where}.columns (e.g. ['text', 'label']), "
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
    """``task: auto``: a prompt_template or messages mean chat, a label classification, a prompt
    or completion string completion (a list of messages in either: chat), a text lm."""
    if spec.prompt_template is not None or spec.messages_field in row:
        return "chat"
    if spec.label_field in row:
        return "classification"
    if spec.prompt_field in row or spec.completion_field in row:
        pair = (row.get(spec.prompt_field), row.get(spec.completion_field))
        return "chat" if any(isinstance(v, list) for v in pair) else "completion"
    if spec.text_field in row:
        return "lm"
    raise DataError(
        path,
        line,
        f"cannot tell the task: no field {spec.text_field!r}, {spec.prompt_field!r}/"
        f"{spec.completion_field!r}, {spec.label_field!r} or {spec.messages_field!r} (fields found: "
        f"{sorted(row)}); set {spec.where}.text_field (or prompt_field, completion_field, label_field, "
        "messages_field) to your field names",
    )


def _normalise(spec: DataSpec, task: str, row: dict, path: Path, line: int) -> dict:
    """Map the file's field names to the canonical ones for ``task``."""
    if task == "chat":
        return chat_record(spec, row, path, line)
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
            raise DataError(path, line, f"field {name!r} must be a string, got {short_repr(value)}")
        rec[canon] = value
    if task == "classification":
        check_label_type(rec["label"], str(path), line)
    rec["_file"] = str(path)
    rec["_line"] = line
    return rec
