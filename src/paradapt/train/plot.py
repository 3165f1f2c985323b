"""The curves of a run as a PNG: train loss and the eval metric per adapter, from metrics.jsonl."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a torn last line, from a kill mid-write, is skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def plot_curves(records: list[dict], path: str | os.PathLike) -> Path | None:
    """Two panels, one line per adapter: train loss by step, and the eval metric by step.

    The eval metric is accuracy for classification and loss for language modelling. matplotlib
    comes with the ``train`` extra, not the core install: without it the run still finishes
    (adapters and metrics.jsonl are what matter) and this returns None with a warning.
    """
    try:
        import matplotlib
    except ImportError:
        warnings.warn(
            "curves.png not written: matplotlib is not installed (pip install 'paradapt[train]')", stacklevel=2
        )
        return None

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    losses: dict[str, tuple[list, list]] = {}
    evals: dict[str, tuple[list, list]] = {}
    metric_name = "eval loss"
    for r in records:
        for name, value in (r.get("loss") or {}).items():
            xs, ys = losses.setdefault(name, ([], []))
            xs.append(r["step"])
            ys.append(value)
        for name, m in (r.get("eval") or {}).items():
            key = "accuracy" if "accuracy" in m else "loss"
            metric_name = "eval accuracy" if key == "accuracy" else "eval loss"
            xs, ys = evals.setdefault(name, ([], []))
            xs.append(r["step"])
            ys.append(m[key])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (xs, ys) in losses.items():
        left.plot(xs, ys, label=name)
    left.set(title="train loss", xlabel="step", ylabel="loss")
    for name, (xs, ys) in evals.items():
        right.plot(xs, ys, marker="o", label=name)
    right.set(title=metric_name, xlabel="step", ylabel=metric_name.split()[-1])
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
