"""Checkpoints of a run: written atomically, the latest few kept, the best adapters copied out.

Layout under ``output_dir``::

    checkpoints/step-N/adapters/<name>/   each adapter in paradapt's format (pa.load_adapter reads it)
    checkpoints/step-N/trainer_state.pt   optimizer, scheduler, data cursors, RNG, adapter tensors
    checkpoints/step-N/checkpoint.json    step and the last eval metrics (for people and tools)
    best/<name>/                          each adapter at its best eval metric so far
                                          (a mixture's experts beside it, as of that step)
    best/best.json                        the step and score of each best

A checkpoint folder is written as ``.step-N.tmp-*`` and renamed into place, so a crash
leaves either the old set or the new one, never half a checkpoint. The trainer state holds
only tensors and plain containers and loads with ``torch.load(weights_only=True)``; it
keeps the adapter tensors unfolded (prefix reparametrizations included) so a resume is exact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch

from ..errors import ParadaptError
from ..files import write_text_atomic
from ..io import save_adapter
from .loop import Trainer

STATE_FILE = "trainer_state.pt"
INFO_FILE = "checkpoint.json"
_STEP = re.compile(r"^step-(\d+)$")


class CheckpointError(ParadaptError, OSError):
    """A checkpoint is missing or unreadable; ``path`` names it."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest(output_dir: str | os.PathLike) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def save(trainer: Trainer, output_dir: str | os.PathLike, keep: int = 2) -> Path:
    """Write ``checkpoints/step-<trainer.step>`` atomically, then drop all but the latest ``keep``."""
    folder = Path(output_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{trainer.step}"
    tmp = folder / f".step-{trainer.step}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        trainer.save_adapters(tmp / "adapters")  # a mixture's experts too: the folder loads on its own
        torch.save(trainer.state_dict(), tmp / STATE_FILE)
        info = {
            "step": trainer.step,
            "eval": _last_eval(trainer),
            "adapters": [t.name for t in trainer.tasks],
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _fsync_tree(tmp)
        if final.exists():  # e.g. the final step saved again after a resume
            old = folder / f".step-{trainer.step}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in checkpoints(output_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_state(path: str | os.PathLike) -> dict:
    """The trainer state of checkpoint folder ``path`` (weights-only safe loading)."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(path, f"not a checkpoint (no {STATE_FILE})")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise CheckpointError(
            file, f"cannot read the trainer state: {' '.join(str(e).split())[:200]}"
        ) from None


def score(metrics: dict[str, float]) -> float:
    """Higher is better: accuracy when there is one, else minus the eval loss."""
    return metrics["accuracy"] if "accuracy" in metrics else -metrics["loss"]


class BestKeeper:
    """Copies each adapter to ``output_dir/best/<name>`` whenever its eval score improves."""

    def __init__(self, output_dir: str | os.PathLike):
        self.folder = Path(output_dir) / "best"
        self.file = self.folder / "best.json"
        self.best: dict[str, dict] = json.loads(self.file.read_text()) if self.file.is_file() else {}

    def update(self, trainer: Trainer, metrics: dict[str, dict[str, float]]) -> list[str]:
        """Save the adapters that beat their best (a mixture with its experts); returns their names."""
        improved = []
        experts = {t.name: t.experts for t in trainer.tasks}
        for name, m in metrics.items():
            s = score(m)
            if name not in self.best or s > self.best[name]["score"]:
                save_adapter(trainer.model, name, self.folder / name)
                for e in experts.get(name, []):  # best/<mixture> loads with the experts of that step
                    save_adapter(trainer.model, e, self.folder / e)
                self.best[name] = {"step": trainer.step, "score": s, "metrics": m}
                improved.append(name)
        if improved:
            write_text_atomic(self.file, json.dumps(self.best, indent=2) + "\n")
        return improved


def _last_eval(trainer: Trainer) -> dict | None:
    for record in reversed(trainer.history):
        if "eval" in record:
            return {"step": record["step"], **record["eval"]}
    return None


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` so the rename publishes complete data."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(Path(folder) / name, "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
