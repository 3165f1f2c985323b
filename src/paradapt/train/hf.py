"""Train paradapt adapters under ``transformers.Trainer``; checkpoints hold adapter folders only.

``ParadaptTrainer`` is a ``transformers.Trainer`` that

- trains only the named adapters (the base must already be frozen, as ``pa.add_adapter``
  leaves it; a trainable base weight is an error, because it would not be saved);
- writes, in every checkpoint and in ``save_model``, one paradapt adapter folder per adapter
  (``<dir>/<name>/adapter_config.json`` + ``adapter.safetensors``, loadable with
  ``pa.load_adapter``) instead of the full model's ``model.safetensors``;
- resumes from such a checkpoint by copying the saved weights into the adapters in place
  (so the optimizer state restored by ``Trainer`` still points at the right tensors) and
  loads the best checkpoint the same way (``load_best_model_at_end``);
- computes a cross-entropy loss with the adapter's own classification head when the adapter
  has one (``head={"labels": [...]}``) and the batch's ``labels`` are one class per row; any
  other model/batch (causal LM with token ``labels``) uses ``Trainer``'s usual loss.

Adapters are saved in their training form (a reparametrised prefix is not folded), so a resumed
run continues exactly; ``pa.load_adapter`` reads that form too. PiSSA-initialised LoRA is
exported as a plain LoRA and therefore cannot be resumed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from torch import nn

from .. import lifecycle
from ..errors import AdapterFileError, AdapterNotFoundError, IncompatibleAdapterError, ParadaptError
from ..heads import ClassificationHead
from ..io import CONFIG_FILE, WEIGHTS_FILE, save_adapter
from ..state import get_state

MANIFEST = "paradapt_trainer.json"  # which adapter folders a checkpoint holds


class ParadaptTrainerError(ParadaptError, ValueError):
    """The model or arguments given to ``ParadaptTrainer`` cannot be trained as adapters only."""


def resolve_adapters(model: nn.Module, adapters: str | list[str] | None) -> list[str]:
    """The adapters to train: the given names (checked), or every adapter on the model."""
    have = lifecycle.list_adapters(model)
    if not have:
        raise ParadaptTrainerError("model has no paradapt adapters; add one with pa.add_adapter first")
    if adapters is None:
        return have
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    if not names:
        raise ParadaptTrainerError("adapters: give at least one adapter name (or None for all)")
    for n in names:
        if n not in have:
            raise AdapterNotFoundError(f"adapters: no adapter named {n!r} on this model (it has {have})")
    return names


def check_base_frozen(model: nn.Module, names: list[str]) -> None:
    """Refuse a trainable base weight: it would train but never be saved in a checkpoint."""
    own = {id(p) for n in names for p in model.paradapt[n].parameters()}
    for pname, p in model.named_parameters():
        if p.requires_grad and id(p) not in own:
            raise ParadaptTrainerError(
                f"parameter {pname!r} is trainable but belongs to no adapter being trained; "
                "ParadaptTrainer trains and saves adapters only (freeze it, or list its adapter in adapters=)"
            )


def head_of(model: nn.Module, names: list[str]) -> ClassificationHead | None:
    """The classification head of the (single) adapter being trained, if it has one."""
    heads = [getattr(model.paradapt[n], "head", None) for n in names]
    heads = [h for h in heads if h is not None]
    if len(heads) > 1:
        raise ParadaptTrainerError(
            f"adapters {names} have {len(heads)} classification heads; train one head per Trainer "
            "(or use paradapt.train.Trainer for several tasks at once)"
        )
    return heads[0] if heads else None


def load_adapter_weights(model: nn.Module, name: str, folder: Path) -> None:
    """Copy a saved adapter folder's weights into the existing adapter ``name`` (same tensors, in place)."""
    file = folder / WEIGHTS_FILE
    if not file.is_file():
        raise AdapterFileError(
            file, "missing (expected a paradapt adapter folder written by ParadaptTrainer)"
        )
    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors has its own error type for truncated files
        raise AdapterFileError(file, f"cannot be read as safetensors ({e})") from None
    adapter = model.paradapt[name]
    want = adapter.state_dict()
    if set(want) != set(tensors) or any(tuple(tensors[k].shape) != tuple(want[k].shape) for k in want):
        raise IncompatibleAdapterError(
            "weights",
            f"{file} does not match adapter {name!r} on this model (other config, or a PiSSA export)",
        )
    with torch.no_grad():
        for k, target in want.items():
            target.copy_(tensors[k])


class ParadaptTrainer(transformers.Trainer):
    """``transformers.Trainer`` for a model carrying paradapt adapters (see the module doc).

    ``adapters``: the adapter names to train and save (default: every adapter on the model).
    If nothing is active and one adapter is named, it is activated for training.
    """

    def __init__(
        self,
        model: nn.Module,
        args: transformers.TrainingArguments | None = None,
        *,
        adapters: str | list[str] | None = None,
        **kwargs: Any,
    ):
        if get_state(model) is None:
            raise ParadaptTrainerError("model has no paradapt adapters; add one with pa.add_adapter first")
        names = resolve_adapters(model, adapters)
        lifecycle.set_trainable(model, names, True)
        check_base_frozen(model, names)
        if lifecycle.active(model) is None:
            if len(names) != 1:
                raise ParadaptTrainerError(
                    f"no active composition for adapters {names}; call pa.set_active(model, ...) first"
                )
            lifecycle.set_active(model, names[0])
        self.adapters = names
        self.head = head_of(model, names)
        super().__init__(model=model, args=args, **kwargs)
        if self.head is not None:
            # The base's forward takes no labels, so Trainer would not find them by itself.
            if self.args.label_names is None:
                self.label_names = ["labels"]
            self.model_accepts_loss_kwargs = False

    # -- loss -----------------------------------------------------------------------------
    def compute_loss(
        self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None
    ):
        labels = inputs.get("labels")
        if self.head is None or labels is None or labels.dim() != 1:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        feed = {k: v for k, v in inputs.items() if k != "labels"}
        out = model(**feed, output_hidden_states=True)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out.hidden_states[-1]
        logits = self.head(hidden.float(), feed.get("attention_mask"))
        if labels.max() >= logits.shape[-1] or labels.min() < 0:
            raise ParadaptTrainerError(
                f"labels: class {int(labels.max())} is outside the head's {logits.shape[-1]} labels {self.head.labels}"
            )
        loss = F.cross_entropy(logits, labels.to(logits.device))
        return (loss, {"loss": loss, "logits": logits}) if return_outputs else loss

    # -- saving / loading -------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Adapter folders (+ tokenizer and training args), never the base model's weights."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        for name in self.adapters:
            save_adapter(model, name, Path(output_dir) / name, fold_prefix=False)
        manifest = {"adapters": self.adapters, "paradapt": _version()}
        Path(output_dir, MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def _load_adapters(self, checkpoint: str) -> None:
        folder = Path(checkpoint)
        manifest = folder / MANIFEST
        if not manifest.is_file():
            raise AdapterFileError(manifest, "missing: not a ParadaptTrainer checkpoint")
        saved = json.loads(manifest.read_text()).get("adapters", [])
        missing = [n for n in self.adapters if n not in saved]
        if missing:
            raise AdapterFileError(manifest, f"has no folder for adapters {missing} (it holds {saved})")
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        for name in self.adapters:
            load_adapter_weights(model, name, folder / name)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self._load_adapters(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_adapters(self.state.best_model_checkpoint)


def _version() -> str:
    from .. import __version__

    return __version__


def checkpoint_files(folder: str | Path) -> list[str]:
    """Relative paths of every file under ``folder`` (to inspect what a checkpoint holds)."""
    root = Path(folder)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


__all__ = [
    "CONFIG_FILE",
    "MANIFEST",
    "ParadaptTrainer",
    "ParadaptTrainerError",
    "checkpoint_files",
    "load_adapter_weights",
]
