"""Small checks shared by every layer: one spelling of each, so a fix lands everywhere.

``is_int`` exists because ``bool`` is a subclass of ``int`` in Python: a config value ``True``
must not pass as the integer 1. ``read_structured`` is the one way a config, cost, workload or
model file is read: a missing or malformed file is a :class:`ConfigError` naming the field and
the file, never a stack trace.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError


def is_int(value: Any) -> bool:
    """True for an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for an ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_structured(path: str | Path, field: str, parse: Callable[[str], Any] = json.loads, fmt: str = "JSON") -> Any:
    """Parse the file at ``path`` with ``parse`` (JSON by default); errors name ``field`` and the file.

    ``fmt`` is the format's name in the message ("JSON", "YAML"). A parser error of any kind
    (``json.JSONDecodeError``, ``yaml.YAMLError``) becomes "not valid FMT".
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(field, f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(field, f"{path}: not valid {fmt} (not UTF-8 text)") from None
    try:
        return parse(text)
    except Exception as e:  # noqa: BLE001 - each parser has its own error class
        raise ConfigError(field, f"{path}: not valid {fmt} ({e})") from None
