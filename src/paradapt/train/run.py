"""``paradapt.train.train(config)``: a whole run from a config, as ``paradapt train`` does it.

Order of work: check the config, load the tokenizer and model, load and tokenize every
adapter's data (every data, label and config error surfaces here, before step 1), add the
adapters, restore a checkpoint if resuming, train with checkpoints every ``save_every``
steps, at each eval the best adapters copied to ``best/``, and at the end the final
adapters in ``adapters/<name>``, a last checkpoint and ``curves.png``.

Ctrl-C saves a checkpoint at the last finished step and raises :class:`Interrupted`
(a KeyboardInterrupt that knows the checkpoint); ``paradapt train`` exits 130 on it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import lifecycle
from ..config import Mixture
from ..errors import ConfigError, ParadaptError
from ..files import write_text_atomic
from ..io import CONFIG_FILE, load_adapter
from . import checkpoint, distributed
from .config import RunConfig, expand_assets, load_config
from .data import LabelMap, build_datasets
from .loop import Task, Trainer, loss_kind
from .plot import plot_curves, read_metrics

RUN_FILES = ("metrics.jsonl", "checkpoints", "best", "adapters", "curves.png", "config.json")


class Interrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C after saving ``checkpoint`` (None on ranks other than 0)."""

    def __init__(self, checkpoint: Path | None, step: int):
        self.checkpoint, self.step = checkpoint, step
        super().__init__(f"interrupted at step {step}; checkpoint saved to {checkpoint}")


@dataclass
class TrainResult:
    """What a run produced: where the adapters are (a mixture's experts too), and the last eval
    metrics per adapter; ``experts`` maps each mixture to its experts' names."""

    output_dir: Path
    adapters: dict[str, Path]
    best: dict[str, Path]
    metrics: dict[str, dict[str, float]]
    steps: int
    checkpoint: Path | None
    curves: Path | None
    history: list[dict] = field(repr=False, default_factory=list)
    experts: dict[str, list[str]] = field(default_factory=dict)


def train(
    config: str | os.PathLike | dict | RunConfig,
    *,
    resume: bool | str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: list[Callable[[Trainer], None]] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train the adapters a config describes; see docs/training.md for the config keys.

    ``overrides`` are dotted keys (``**{"train.lr": 3e-4}``) or nested mappings
    (``train={"lr": 3e-4}``), applied before validation. ``resume=True`` continues from the
    latest checkpoint in ``output_dir``; a path continues from that checkpoint. A fresh run
    refuses an ``output_dir`` holding an earlier run unless ``overwrite=True``.
    """
    cfg, base_dir = load_config(config, _flatten(overrides))
    dist = distributed.init_from_env()
    out = Path(cfg.output_dir)
    ckpt = _checkpoint_to_resume(out, resume)
    if ckpt is None:
        _prepare_fresh(out, overwrite, dist.is_main)  # every rank checks, so every rank fails alike
    dist.barrier()
    late = _quantize_after_adapters(cfg)
    tok, model = _load_model(cfg, base_dir, quantize=not late)
    tasks, adapter_cfgs = build_tasks(cfg, tok, base_dir)
    torch.manual_seed(cfg.train.seed)
    for i, (name, acfg) in enumerate(adapter_cfgs.items()):
        if isinstance(acfg, Mixture):
            _add_mixture(model, cfg, i, acfg, base_dir)
        else:
            lifecycle.add_adapter(model, name, acfg)
    if late:
        from ..quantized import quantize

        quantize(model, "int4", 32)
    model.to(distributed.local_device())
    keeper = checkpoint.BestKeeper(out) if dist.is_main else None
    args = cfg.train_args()
    trainer = Trainer(
        model, tasks, args, callbacks=[_saver(out, args, keeper), *(callbacks or [])], dist=dist
    )
    if ckpt is not None:
        _resume(trainer, ckpt, out, dist)
    elif dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2) + "\n")
    try:
        trainer.train(progress=progress)
    except KeyboardInterrupt:
        saved = checkpoint.save(trainer, out, args.keep_checkpoints) if dist.is_main else None
        raise Interrupted(saved, trainer.step) from None
    return _finish(trainer, out, keeper, dist)


# --------------------------------------------------------------------------- steps


def _flatten(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (lists are replaced whole)."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _checkpoint_to_resume(out: Path, resume: bool | str | os.PathLike | None) -> Path | None:
    if resume is None or resume is False:
        return None
    if resume is True or resume == "latest":
        found = checkpoint.latest(out)
        if found is None:
            raise checkpoint.CheckpointError(out / "checkpoints", "no checkpoint to resume from")
        return found
    path = Path(resume)
    if not (path / checkpoint.STATE_FILE).is_file():
        raise checkpoint.CheckpointError(path, f"not a checkpoint folder (no {checkpoint.STATE_FILE})")
    return path


def _prepare_fresh(out: Path, overwrite: bool, delete: bool) -> None:
    """A fresh run starts from an empty run folder: refuse to mix with an earlier run's files."""
    present = [n for n in RUN_FILES if (out / n).exists()]
    if not present:
        return
    if not overwrite:
        raise ConfigError(
            "output_dir",
            f"{out} already holds a run ({', '.join(present)}); resume it with --resume, "
            "or pass --overwrite to start again",
        )
    for name in present if delete else []:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()


def _quantize_after_adapters(cfg: RunConfig) -> bool:
    """LoftQ adapters (``init: loftq``) factor the float weight's int4 error, so the base is
    loaded in float32, they are added, and only then is it quantised (int4, groups of 32: the
    quantisation they were initialised against)."""
    inits = [getattr(cfg.adapter_config(i), "init", None) for i in range(len(cfg.adapters))]
    if "loftq" not in inits:
        return False
    if cfg.quantize != "int4" or cfg.quantize_group_size not in (None, 32):
        raise ConfigError(
            "quantize", "init: loftq initialises adapters against an int4 base in groups of 32: set quantize: int4"
        )
    return True


def _load_model(cfg: RunConfig, base_dir: Path | None, quantize: bool = True):
    """The base model, in ``quantize:``'s precision: the frozen base in int4/int8/bf16 before any
    adapter is added (QLoRA-style: the adapters train in float32 beside it; their files record
    the base's precision). A named GGUF model's int4 comes from its own 4-bit blocks."""
    from ..loading import default_model_dir, load_model
    from ..models import named_model

    if cfg.quantize == "none" and cfg.quantize_group_size is not None:
        raise ConfigError("quantize_group_size", "applies to quantize: int4 only")
    if cfg.model is None:
        spec = default_model_dir()
    elif named_model(cfg.model) is not None:  # a named model (smollm2-135m-instruct) before a path
        spec = cfg.model
    else:
        spec = Path(os.path.expanduser(cfg.model))
        if not spec.is_absolute() and base_dir is not None and (base_dir / spec).is_dir():
            spec = base_dir / spec
    try:
        if not quantize:
            return load_model(spec)
        return load_model(spec, quantize=cfg.quantize, group_size=cfg.quantize_group_size)
    except ConfigError as e:
        if e.field not in ("precision", "group_size"):
            raise
        field = "quantize_group_size" if e.field == "group_size" else "quantize"
        raise ConfigError(field, e.message) from None


def build_tasks(cfg: RunConfig, tok, base_dir: Path | None) -> tuple[list[Task], dict]:
    """Every adapter's data sets and final config (a classification head added when missing)."""
    tasks, adapter_cfgs = [], {}
    kinds = {}
    for i, entry in enumerate(cfg.adapters):
        acfg = cfg.adapter_config(i)
        train_spec, eval_spec = cfg.data_specs(i, base_dir)
        if acfg.head is not None:
            _use_head_labels(acfg.head["labels"], train_spec, f"adapters.{i}")
        train_ds, eval_ds = build_datasets(
            train_spec,
            tok,
            eval_spec=eval_spec,
            eval_fraction=entry.eval_fraction,
            seed=cfg.train.seed,
            max_length=cfg.tokenize.max_length,
            packing=cfg.tokenize.packing,
            add_eos=cfg.tokenize.add_eos,
        )
        if train_ds.task == "classification" and acfg.head is None:
            acfg = dataclasses.replace(acfg, head={"labels": list(train_ds.labels.labels)})
        elif train_ds.task != "classification" and acfg.head is not None:
            raise ConfigError(
                f"adapters.{i}.config.head",
                f"a classification head needs {{text, label}} records, but the data is for task {train_ds.task!r}",
            )
        kinds[entry.name] = train_ds.task
        if len({loss_kind(k) for k in kinds.values()}) > 1:
            raise ConfigError(
                f"adapters.{i}.data",
                f"all adapters of one run need the same kind of loss (all classification, or all "
                f"lm/completion/chat); got {kinds} (train them in separate runs)",
            )
        experts = [n for n, _ in cfg.experts(i)] if isinstance(acfg, Mixture) else []
        tasks.append(Task(entry.name, train_ds, eval_ds, experts, entry.aux_loss_coef))
        adapter_cfgs[entry.name] = acfg
    return tasks, adapter_cfgs


def _use_head_labels(head_labels: list, spec, where: str) -> None:
    """The head's label list is the class list: the data may use no other label."""
    if isinstance(spec, list):  # a mix of files: each reads its labels against the head's
        for s in spec:
            _use_head_labels(head_labels, s, where)
        return
    if spec.labels is None:
        spec.labels = list(head_labels)
        return
    if LabelMap(spec.labels).labels != LabelMap(head_labels).labels:
        raise ConfigError(
            f"{where}.data.labels",
            f"{spec.labels!r} differ from the head's labels {head_labels!r} ({where}.config.head.labels)",
        )


def _saver(out: Path, args, keeper: checkpoint.BestKeeper | None) -> Callable[[Trainer], None]:
    """The per-step hook: best adapters after each eval, a checkpoint every ``save_every`` steps."""

    def hook(trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        if trainer.last_eval and keeper is not None:
            keeper.update(trainer, trainer.last_eval)
        if args.save_every and trainer.step % args.save_every == 0:
            checkpoint.save(trainer, out, args.keep_checkpoints)

    return hook


def _resume(trainer: Trainer, ckpt: Path, out: Path, dist: distributed.Dist) -> None:
    """Load the state and cut ``metrics.jsonl`` back to the checkpoint's step."""
    state = checkpoint.load_state(ckpt)
    missing = sorted({t.name for t in trainer.tasks} - set(state["adapters"]))
    if missing:
        raise checkpoint.CheckpointError(ckpt, f"has no state for adapters {missing} of this config")
    trainer.load_state_dict(state)
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        kept = [r for r in read_metrics(metrics) if r.get("step", 0) <= trainer.step]
        trainer.history = kept
        if dist.is_main:
            write_text_atomic(metrics, "".join(json.dumps(r) + "\n" for r in kept))
    if dist.is_main:
        print(f"resumed from {ckpt} at step {trainer.step}", file=sys.stderr)


def _finish(
    trainer: Trainer, out: Path, keeper: checkpoint.BestKeeper | None, dist: distributed.Dist
) -> TrainResult:
    """Final checkpoint, adapters, curves; the result on every rank."""
    names = trainer.adapter_names()  # a mixture's experts too: the run's folder loads on its own
    adapters = {n: out / "adapters" / n for n in names}
    saved = curves = None
    if dist.is_main:
        last = checkpoint.latest(out)
        saved = last if last is not None and last.name == f"step-{trainer.step}" else None
        if saved is None:
            saved = checkpoint.save(trainer, out, trainer.args.keep_checkpoints)
        trainer.save_adapters(out / "adapters")
        for t in trainer.tasks:
            if t.experts:
                _mixture_note(adapters[t.name], t.name, t.experts)
        curves = plot_curves(trainer.history, out / "curves.png")
    dist.barrier()
    evals = [r["eval"] for r in trainer.history if "eval" in r]
    best = {n: out / "best" / n for n in names if (out / "best" / n).is_dir()}
    experts = {t.name: list(t.experts) for t in trainer.tasks if t.experts}
    return TrainResult(
        out, adapters, best, evals[-1] if evals else {}, trainer.step, saved, curves, trainer.history, experts
    )


# --------------------------------------------------------------------------- mixtures


def _expert_path(raw: str, base_dir: Path | None) -> Path:
    """An expert folder: ``bundled:NAME`` (shipped adapters), ``${assets}/...``, or a path
    (relative to the config file's folder)."""
    if raw.startswith("bundled:"):
        from ..bundled import bundled_path

        return bundled_path(raw.removeprefix("bundled:"))
    path = Path(os.path.expanduser(expand_assets(raw, "path")))
    return base_dir / path if base_dir is not None and not path.is_absolute() else path


def _add_mixture(model, cfg: RunConfig, i: int, config: Mixture, base_dir: Path | None) -> None:
    """Load or add the experts of ``adapters[i]``, then the mixture over them.

    Errors name the config field: ``adapters.i.experts.j.path`` for a folder that is missing or
    does not load, ``adapters.i.config.<field>`` (or ``adapters.i.experts...``) for what
    ``pa.add_mixture`` refuses.
    """
    for j, (name, e) in enumerate(cfg.experts(i)):
        where = f"adapters.{i}.experts.{j}"
        if e.path is None:
            lifecycle.add_adapter(model, name, cfg.expert_config(i, j))
            continue
        try:
            path = _expert_path(e.path, base_dir)
            if not (path / CONFIG_FILE).is_file():
                raise ConfigError("path", f"{e.path!r} is not an adapter folder (no {CONFIG_FILE})")
            load_adapter(model, path, name)
        except ParadaptError as err:
            raise ConfigError(f"{where}.path", getattr(err, "message", str(err))) from None
    name = cfg.adapters[i].name
    try:
        lifecycle.add_mixture(model, name, config)
    except ParadaptError as err:
        field = getattr(err, "field", None) or "config"
        m = re.match(r"experts\[(\d+)\]", field)
        where = f"adapters.{i}.experts.{m.group(1)}" if m else f"adapters.{i}.config.{field}"
        raise ConfigError(where, getattr(err, "message", str(err))) from None


def _mixture_note(folder: Path, name: str, experts: list[str]) -> None:
    """A README in the mixture's folder: which sibling folders it needs, and how to load it."""
    lines = [
        f"# Mixture {name}",
        "",
        "A learned mixture: its routers (and head, if any) only. It names its experts; load them",
        "first, from the sibling folders of this run:",
        "",
        *[f"- `../{e}/` as `{e}`" for e in experts],
        "",
        "```python",
        "from paradapt.train import load_mixture",
        f"load_mixture(model, 'adapters/{name}')   # loads the experts beside it, then the mixture",
        "```",
        "",
    ]
    write_text_atomic(folder / "README.md", "\n".join(lines))


def load_mixture(model, folder: str | os.PathLike, name: str | None = None, *, trainable: bool = False):
    """Load a mixture folder written by ``paradapt train`` with its experts from the sibling
    folders (``<folder>/../<expert>``), skipping experts already on the model; returns the
    mixture's weights module. The experts keep the names the mixture knows them by."""
    folder = Path(folder)
    cfg_file = folder / CONFIG_FILE
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
        experts = data["config"]["experts"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            "experts", f"{folder.name}: not a mixture folder (no experts in {CONFIG_FILE})"
        ) from None
    on_model = set(lifecycle.list_adapters(model))
    for e in experts:
        if e not in on_model:
            load_adapter(model, folder.parent / e, e)
    return load_adapter(model, folder, name, trainable=trainable)
