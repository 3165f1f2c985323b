"""Adapters shipped inside the package, one folder per base model they were trained on.

``src/paradapt/adapters/<model>/<name>/`` holds paradapt adapter folders (``adapter_config.json``,
``adapter.safetensors``) plus a ``README.md`` card and ``card.json`` (task, data, steps, seed, test
accuracy, the command that trained them). ``<model>`` is a named model (:mod:`paradapt.models`):

* ``smollm2-135m-instruct``: chat adapters that answer in their task's label words
  (``chat-sst2-parallel``, ``chat-agnews-lora``, ``chat-sms-series``; ``benchmarks/decoder_quality.py``);
* ``all-minilm-l6-v2``: classifiers with a head (``sst2-parallel``, ``agnews-parallel``;
  ``benchmarks/train_quality.py``).

Names are unique across models, so ``bundled_path(name)`` needs no model. ``paradapt serve`` with a
named model and no ``--adapter-root`` serves that model's folder (:func:`bundled_root`).

>>> from paradapt.bundled import bundled, bundled_path
>>> sorted(bundled("all-minilm-l6-v2"))
['agnews-parallel', 'sst2-parallel']
>>> pa.load_adapter(minilm, bundled_path("sst2-parallel"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import AdapterNotFoundError

ROOT = Path(__file__).resolve().parent / "adapters"
CONFIG_FILE = "adapter_config.json"


def bundled_root(model: str) -> Path | None:
    """The folder of the adapters shipped for the named ``model``, or None when there are none."""
    folder = ROOT / model
    return folder if _adapters_in(folder) else None


def bundled(model: str | None = None) -> dict[str, Path]:
    """Name -> folder of every adapter shipped with this install (for ``model`` only, if given)."""
    if not ROOT.is_dir():
        return {}
    models = [ROOT / model] if model is not None else sorted(p for p in ROOT.iterdir() if p.is_dir())
    found: dict[str, Path] = {}
    for folder in models:
        found.update(_adapters_in(folder))
    return dict(sorted(found.items()))


def bundled_path(name: str) -> Path:
    """The folder of the shipped adapter ``name`` (an error lists the ones there are)."""
    found = bundled()
    if name not in found:
        raise AdapterNotFoundError(f"no bundled adapter named {name!r}; bundled adapters: {sorted(found)}")
    return found[name]


def base_model_of(name: str) -> str:
    """The named model the shipped adapter ``name`` was trained on (its folder's parent)."""
    return bundled_path(name).parent.name


def card(name: str) -> dict:
    """The shipped adapter's ``card.json``: task, data slice, steps, lr, seed, accuracy, command."""
    return json.loads((bundled_path(name) / "card.json").read_text(encoding="utf-8"))


def _adapters_in(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir()) if (p / CONFIG_FILE).is_file()}


def held_out_records(name: str, limit: int | None = None) -> list[dict]:
    """The held-out rows a shipped chat adapter's card accuracy was measured on, as chat records
    (``messages`` ending with the assistant's answer, ``answer`` the label word); the first
    ``limit`` only. The card keeps its training config's adapter entry (data and eval with
    ``${assets}`` paths) and seed, so the rows are read and split again exactly as then."""
    from .train.config import validate
    from .train.data import read_splits

    c = card(name)
    if "adapter" not in c:
        raise AdapterNotFoundError(f"bundled adapter {name!r} has no chat test set in its card")
    cfg = validate(
        {"output_dir": ".", "model": c["model"], "adapters": [c["adapter"]], "train": {"seed": c["seed"]}}
    )
    train, evals = cfg.data_specs(0)
    _, rows = read_splits(train, evals, cfg.adapters[0].eval_fraction, cfg.train.seed)
    return (rows or [])[:limit]


__all__ = ["base_model_of", "bundled", "bundled_path", "bundled_root", "card", "held_out_records"]
