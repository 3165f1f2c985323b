"""A normalised record: its shapes, where it came from, and the error that names its line.

Records are normalised to one of four shapes, which also name the task:

* ``{"text"}``: causal language modelling (``lm``), loss on every token;
* ``{"prompt", "completion"}``: ``completion``, loss on the completion tokens only;
* ``{"text", "label"}``: ``classification``, one label id per text;
* ``{"messages", "train_from"}`` (+ ``"answer"``): ``chat``, rendered with the tokenizer's chat
  template, loss on the assistant's tokens only (:mod:`.chat`).

Private keys ``_file`` and ``_line`` ride along in each record for error messages.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ...errors import ParadaptError

Label = int | str
IGNORE_INDEX = -100  # label value the loss skips (torch / Hugging Face convention)


class DataError(ParadaptError, ValueError):
    """A data file is missing or has a bad record. ``path`` and ``line`` (1-based, or None) name it."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {message}")


def short_repr(value: Any, n: int = 80) -> str:
    """``repr(value)`` cut to ``n`` characters, so a huge field does not flood an error message."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def infer_task(records: Sequence[dict]) -> str:
    """The task that normalised records imply (their keys name it)."""
    if not records:
        raise ParadaptError("no records")
    first = records[0]
    if "messages" in first:
        return "chat"
    if "label" in first:
        return "classification"
    if "prompt" in first:
        return "completion"
    return "lm"


def source_of(record: dict) -> tuple[str, int | None]:
    """``(file, line)`` of a record, for :class:`DataError`."""
    return record.get("_file", "<records>"), record.get("_line")
