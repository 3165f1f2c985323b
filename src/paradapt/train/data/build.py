"""``build_datasets``: a training config's data entries to train and eval data sets, steps in the right order."""

from __future__ import annotations

from typing import Any

from ...errors import ConfigError
from .labels import LabelMap
from .records import DataError, infer_task, source_of
from .sampling import split
from .sources import load_records
from .spec import DataSpec
from .tokens import TokenizedDataset, tokenize


def build_datasets(
    train: DataSpec | list[DataSpec],
    tokenizer: Any,
    *,
    eval_spec: DataSpec | list[DataSpec] | None = None,
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
    train_records, eval_records = read_splits(train, eval_spec, eval_fraction, seed)
    task = infer_task(train_records)
    if eval_records is not None and infer_task(eval_records) != task:
        path, line = source_of(eval_records[0])
        raise DataError(
            path, line, f"eval records are for task {infer_task(eval_records)!r}, training ones for {task!r}"
        )
    label_map = LabelMap.build(train_records, _labels(train)) if task == "classification" else None
    if label_map is not None and eval_records is not None:
        label_map.check(eval_records)
    kw = {"max_length": max_length, "task": task, "packing": packing, "add_eos": add_eos, "pad_id": pad_id}
    train_ds = tokenize(train_records, tokenizer, labels=label_map, **kw)
    eval_ds = tokenize(eval_records, tokenizer, labels=label_map, **kw) if eval_records else None
    return train_ds, eval_ds


def read_splits(
    train: DataSpec | list[DataSpec],
    eval_spec: DataSpec | list[DataSpec] | None = None,
    eval_fraction: float | None = None,
    seed: int = 0,
) -> tuple[list[dict], list[dict] | None]:
    """(train, eval) records before tokenizing: eval from its own file, else the seeded
    ``split(train, eval_fraction, seed)``, else None. A shipped adapter's card names the same
    three, so its held-out rows are read again exactly (``paradapt.bundled.held_out_records``)."""
    if eval_spec is not None and eval_fraction is not None:
        raise ConfigError("eval_fraction", "give either an eval file or eval_fraction, not both")
    train_records = _records(train)
    if eval_spec is not None:
        return train_records, _records(eval_spec)
    if eval_fraction is not None:
        return split(train_records, eval_fraction, seed)
    return train_records, None


def _records(spec: DataSpec | list[DataSpec]) -> list[dict]:
    """The records of one spec, or of every spec of a list, in order (one task, checked)."""
    if not isinstance(spec, list):
        return load_records(spec)
    out: list[dict] = []
    for s in spec:
        records = load_records(s)
        if out and records and infer_task(records) != infer_task(out):
            path, line = source_of(records[0])
            raise DataError(
                path,
                line,
                f"records for task {infer_task(records)!r}, earlier files' for {infer_task(out)!r}",
            )
        out += records
    return out


def _labels(spec: DataSpec | list[DataSpec]) -> list | None:
    """``labels`` of a spec; of a list, every spec's list joined (None when none sets any)."""
    if not isinstance(spec, list):
        return spec.labels
    given = [s.labels for s in spec if s.labels is not None]
    if not given:
        return None
    if any(isinstance(g, dict) for g in given):
        return given[0]
    return list(dict.fromkeys(label for g in given for label in g))
