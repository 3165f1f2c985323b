"""Class labels <-> ids: the :class:`LabelMap` saved next to a classification head."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ...checks import is_int
from ...errors import ConfigError
from .records import DataError, Label, short_repr, source_of

_INT_RE = re.compile(r"-?(0|[1-9][0-9]*)")


def check_label_type(label: Any, path: str, line: int | None) -> None:
    """A raw label is a string, an integer or an integral float; anything else fails naming ``path:line``."""
    if isinstance(label, float) and label.is_integer():
        return
    if not isinstance(label, (int, str)):
        raise DataError(path, line, f"a class label must be a string or an integer, got {short_repr(label)}")


def canon_label(label: Any) -> Label:
    """A label's canonical form: integers, integral floats and integer strings ("3", not "03") become ints."""
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
    return str(canon_label(label)) if isinstance(label, (bool, float)) else str(label)


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
            if not (is_int(label) or isinstance(label, str)):
                raise ConfigError(where, f"each label must be a string or an integer, got {label!r}")
        canon = [canon_label(x) for x in labels]
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
        seen = {canon_label(r["label"]) for r in records}
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
        canon = canon_label(label)
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
