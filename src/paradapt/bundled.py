"""Adapters shipped inside the package, ready to load onto all-MiniLM-L6-v2.

``src/paradapt/adapters/<name>/`` holds paradapt adapter folders (``adapter_config.json``,
``adapter.safetensors`` with the classification head and its label names) plus a ``README.md``
card and ``card.json`` (data, steps, seed, test accuracy, the command that trained them). They
are the best parallel adapters of ``benchmarks/train_quality.py``; serving uses them by default.

>>> from paradapt.bundled import bundled, bundled_path
>>> sorted(bundled())
['agnews-parallel', 'sst2-parallel']
>>> pa.load_adapter(minilm, bundled_path("sst2-parallel"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import AdapterNotFoundError

ROOT = Path(__file__).resolve().parent / "adapters"
CONFIG_FILE = "adapter_config.json"


def bundled() -> dict[str, Path]:
    """Name -> folder of every adapter shipped with this install."""
    if not ROOT.is_dir():
        return {}
    return {p.name: p for p in sorted(ROOT.iterdir()) if (p / CONFIG_FILE).is_file()}


def bundled_path(name: str) -> Path:
    """The folder of the shipped adapter ``name`` (an error lists the ones there are)."""
    found = bundled()
    if name not in found:
        raise AdapterNotFoundError(f"no bundled adapter named {name!r}; bundled adapters: {sorted(found)}")
    return found[name]


def card(name: str) -> dict:
    """The shipped adapter's ``card.json``: task, data slice, steps, lr, seed, accuracy, command."""
    return json.loads((bundled_path(name) / "card.json").read_text(encoding="utf-8"))


__all__ = ["bundled", "bundled_path", "card"]
