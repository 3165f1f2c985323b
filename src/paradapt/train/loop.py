"""The training loop: one or many adapters on one frozen base, sharing every forward.

Each adapter is a *task* with its own data, optimizer (AdamW), schedule (linear
warmup, then cosine or constant) and metrics. A step draws ``batch_size``
rows, split round-robin between the tasks, routes each row to its adapter
(``pa.route``) and runs the base model on them, mixed. The loss is the sum over
tasks of each task's mean loss, so every adapter receives exactly the gradient
it would get training alone on its share of the batch, and each optimizer
steps only its own parameters.

The rows of a step form one pool: ``micro_batches`` sorts them by length and cuts
them into micro-batches that pad as little as possible (``data.length_buckets``),
each forwarded and backpropagated on its own, its losses divided by the adapters'
weights in the whole batch, so the summed gradient is the one-forward gradient.
K separate runs pad each adapter's b rows to their longest; the joint pool can
put SST-2's short rows with each other and AG News' long rows with each other.

Data order is a seeded permutation per task and epoch
(``data.seeded_order``), and the position in it is part of the checkpoint, so
a resumed run continues with the same batches and the same loss curve.

Under ``torchrun`` every rank takes its share of each global batch and the adapter
gradients are summed over ranks (``distributed.py``), giving the single-process curve.
Hooks: ``callbacks`` run after every step (checkpointing, early stops); a first Ctrl-C
(SIGINT, or SIGTERM) is deferred to the end of the running step and raised there as
KeyboardInterrupt, so the state it leaves is a consistent step boundary.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import lifecycle
from ..checks import is_int
from ..errors import ConfigError
from ..heads import classify
from ..io import save_adapter
from ..mixture import mixture_aux_loss
from . import distributed, lm_loss
from .data import IGNORE_INDEX, TokenizedDataset, length_buckets, seeded_order
from .lm_loss import LearnedLogits

# micro_batches "auto" on CPU: the fixed cost of one forward + backward, in tokens (routed MiniLM
# on one busy core: ~55-110 ms a forward plus ~1.2 ms a token, i.e. 50-90 tokens; RESULTS.md)
AUTO_FORWARD_COST_TOKENS = 64


def _option(default: Any, help: str = "", **bounds: float) -> Any:
    """A :class:`TrainArgs` field: its default, what it does, and the bounds the YAML schema checks.

    ``bounds`` are pydantic ``Field`` keywords (``ge``, ``gt``); :mod:`.config` builds the
    ``train:`` section from these fields, so an option is declared here and only here.
    """
    return field(default=default, metadata={"help": help, "bounds": bounds})


@dataclass
class TrainArgs:
    """Loop settings (the YAML ``train:`` section, whose schema is built from these fields)."""

    max_steps: int = _option(100, ge=1)
    batch_size: int = _option(16, "rows per step, shared round-robin by the adapters", ge=1)
    grad_accum: int = _option(1, ge=1)
    lr: float = _option(1e-3, gt=0)
    weight_decay: float = _option(0.0, ge=0)
    warmup_steps: int = _option(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    max_grad_norm: float | None = _option(1.0, gt=0)
    eval_every: int = _option(0, "0: evaluate only at the end", ge=0)
    eval_batch_size: int = _option(64, ge=1)
    log_every: int = _option(10, ge=1)
    seed: int = 0
    bf16: bool = _option(False, "autocast to bfloat16 where the device supports it")
    gradient_checkpointing: bool = False
    output_dir: str | None = _option(None, "checkpoints and adapters go here (the config's top-level key)")
    save_every: int = _option(
        0, "used by paradapt.train.train(): checkpoint every N steps (0: only at the end)", ge=0
    )
    keep_checkpoints: int = _option(2, "how many of the latest checkpoints to keep", ge=1)
    micro_batches: int | Literal["auto"] = _option(
        "auto", "forwards per batch, rows bucketed by length ('auto': up to one per adapter)"
    )
    micro_batch_tokens: int | None = _option(
        None, "most padded tokens (rows x longest row) in one forward (memory)", ge=1
    )


@dataclass
class Task:
    """One adapter being trained: its name and data.

    A mixture's task also names its ``experts``: the task's optimizer steps those of their
    parameters that require grad (new experts, or all with ``train_experts``), and its loss
    adds ``aux_loss_coef`` times the mixture's load-balancing loss (``pa.mixture_aux_loss``).
    """

    name: str
    train: TokenizedDataset
    eval: TokenizedDataset | None = None
    experts: list[str] = field(default_factory=list)
    aux_loss_coef: float = 0.0


@dataclass
class _Cursor:
    epoch: int = 0
    pos: int = 0
    order: list[int] = field(default_factory=list)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup to 1, then cosine decay to 0 at ``total`` (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def loss_kind(task: str) -> str:
    """What a task's loss is over: ``classification`` (a head's logits) or ``tokens`` (the LM's
    next-token logits: lm, completion and chat, whose labels mask what is not learned)."""
    return "classification" if task == "classification" else "tokens"


Callback = Callable[["Trainer"], None]


class Trainer:
    """Trains the adapters named by ``tasks`` on ``model`` (adapters must already be added).

    ``callbacks`` are called as ``cb(trainer)`` after every step (its loss record and any
    eval are in ``trainer.history``; ``trainer.last_eval`` is set on eval steps).
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: list[Task],
        args: TrainArgs,
        callbacks: list[Callback] | None = None,
        dist: distributed.Dist | None = None,
    ):
        self.model, self.tasks, self.args = model, tasks, args
        self.callbacks = list(callbacks or [])
        self.dist = dist if dist is not None else distributed.current()
        if args.batch_size < self.dist.world:
            raise ConfigError(
                "train.batch_size", f"{args.batch_size} rows cannot be shared by {self.dist.world} processes"
            )
        _check_micro_batching(args, tasks)
        self.kind = loss_kind(tasks[0].train.task)
        for t in tasks:
            if loss_kind(t.train.task) != self.kind:
                raise ValueError(
                    f"all tasks of one run need the same kind of loss (classification, or tokens for "
                    f"lm/completion/chat); {tasks[0].name} is {tasks[0].train.task}, {t.name} is {t.train.task}"
                )
        lifecycle.set_trainable(model, [t.name for t in tasks], True)
        self.opts, self.scheds = {}, {}
        for t in tasks:
            params = [
                p for n in (t.name, *t.experts) for p in model.paradapt[n].parameters() if p.requires_grad
            ]
            opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
            self.opts[t.name] = opt
            self.scheds[t.name] = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_factor(s, args.warmup_steps, args.max_steps, args.schedule)
            )
        self.cursors = {t.name: _Cursor() for t in tasks}
        self.step = 0
        self.history: list[dict] = []
        self.last_eval: dict | None = None
        self.tokens = 0  # real (non-pad) tokens of the global batches trained on
        self.padded_tokens = 0  # rows x width of this rank's forwards: what the base computed on
        self._index = {t.name: i for i, t in enumerate(tasks)}
        self._interrupted = False
        self._routed: list[str] = []  # the rows' adapters of the forward running now
        self._gather: bool | None = None  # lm_loss.head_checks' gathers, once a token task asked
        self._chunk = False  # its alone: many learned positions go through the head in chunks
        self._rows: torch.Tensor | None = None  # rows per task in the global batch (aux loss shares)
        if args.gradient_checkpointing:
            _enable_checkpointing(model, self._recompute_contexts)

    # -- data ---------------------------------------------------------------------------
    def _next(self, task: Task) -> dict:
        c = self.cursors[task.name]
        if not c.order or c.pos >= len(c.order):
            if c.order:
                c.epoch += 1
            c.order, c.pos = seeded_order(len(task.train), self.args.seed, c.epoch), 0
        ex = task.train[c.order[c.pos]]
        c.pos += 1
        return ex

    def _batch(self) -> tuple[list[dict], list[str]]:
        """The next global batch's rows (every rank draws the same ones) and their adapters."""
        rows, names = [], []
        for i in range(self.args.batch_size):
            task = self.tasks[i % len(self.tasks)]
            rows.append(self._next(task))
            names.append(task.name)
        self.tokens += sum(_real_tokens(ex) for ex in rows)
        return rows, names

    def _micro_batch_split(self, rows: list[dict]) -> list[list[int]]:
        """This rank's rows split into micro-batches (row indices), by ``data.length_buckets``.

        ``micro_batches: auto`` on CPU, where a step costs about its padded tokens plus a small
        fixed cost per forward, picks the count that minimises padded tokens + 64 tokens per
        forward: a mixed batch of SST-2 and AG News rows becomes several length buckets, a batch
        of equal-length rows stays one forward. On CUDA ``auto`` is one forward (small steps are
        bound by kernel launches rather than padded FLOPs; not measured here), and
        ``micro_batch_tokens`` adds forwards there too.
        """
        mb = self.args.micro_batches
        cost: float | None = None
        if mb == "auto":
            on_cuda = next(self.model.parameters()).device.type == "cuda"
            parts, cost = (1, None) if on_cuda else (len(rows), AUTO_FORWARD_COST_TOKENS)
        else:
            parts = int(mb)
        if parts == 1 and self.args.micro_batch_tokens is None:
            return [list(range(len(rows)))]
        lengths = [len(ex["input_ids"]) for ex in rows]
        return length_buckets(lengths, parts, self.args.micro_batch_tokens, cost)

    def _recompute_contexts(self) -> tuple:
        """For activation checkpointing: the layer's recompute (in backward, after the forward's
        ``route`` block has closed) runs under the same routing as its forward."""
        return contextlib.nullcontext(), lifecycle.route(self.model, list(self._routed))

    # -- loss -----------------------------------------------------------------------------
    def _forward(self, batch: dict, names: list[str]) -> tuple[torch.Tensor | LearnedLogits, torch.Tensor]:
        """One routed forward of a batch, on the model's device: (class logits, labels) from each
        row's adapter head, or (the learned positions' LM logits, labels) for token tasks."""
        dev = next(self.model.parameters()).device
        inputs = {k: v.to(dev) for k, v in batch.items()}
        labels = inputs.pop("labels")
        self._routed = names
        if self.kind == "classification" and self.model.get_output_embeddings() is not None:
            # A decoder with an LM head (e.g. *ForCausalLM) has no last_hidden_state: the
            # classifier reads the final hidden states, so ask for them.
            inputs["output_hidden_states"] = True
        def context(rows: list[str]) -> contextlib.ExitStack:
            stack = contextlib.ExitStack()
            bf16 = self.args.bf16 and dev.type in ("cuda", "cpu")
            stack.enter_context(torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16))
            stack.enter_context(lifecycle.route(self.model, rows))
            return stack

        if self.kind != "classification":
            if self._gather is None:  # once: may the LM head run on the learned positions alone?
                one = {k: v[:1] for k, v in inputs.items()}
                with context(names[:1]):
                    self._gather, self._chunk = lm_loss.head_checks(self.model, one)
            with context(names):
                return lm_loss.learned_logits(self.model, inputs, labels, self._gather, self._chunk), labels
        with context(names):
            out = self.model(**inputs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.hidden_states[-1]
        return classify(self.model, hidden.float(), inputs.get("attention_mask"), names), labels

    def _row_weights(self, labels: torch.Tensor) -> torch.Tensor:
        """What each row counts for in its adapter's mean: 1 (classification) or its target tokens."""
        if self.kind == "classification":
            return torch.ones(labels.shape[0])
        return (labels[:, 1:] != IGNORE_INDEX).float().sum(1)

    def _ids(self, names: list[str], device: torch.device | None = None) -> torch.Tensor:
        """Each row's adapter as its task index."""
        return torch.tensor([self._index[n] for n in names], device=device)

    def _denominators(self, weights: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Each adapter's total weight in a (global) batch, by task index: its loss is a sum over
        rows / this (at least 1, so an adapter without rows divides by 1)."""
        total = torch.zeros(len(self.tasks), dtype=weights.dtype)
        return total.index_add_(0, self._ids(names), weights).clamp(min=1)

    def _global_denominators(self, rows: list[dict], names: list[str]) -> torch.Tensor:
        """:meth:`_denominators` of a global batch from its rows, before they are collated."""
        if self.kind == "classification":
            weights = torch.ones(len(rows))
        else:
            weights = torch.tensor([float(_targets(ex["labels"])) for ex in rows])
        return self._denominators(weights, names)

    def _loss_vector(
        self, batch: dict, names: list[str], denominators: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each adapter's summed row losses / its denominator, by task index, from one routed forward.

        With the global batch's ``denominators`` the partial sums of micro-batches (and of
        ranks) add up to each adapter's mean over the global batch.
        """
        logits, labels = self._forward(batch, names)
        if self.kind == "classification":
            per_row = F.cross_entropy(logits, labels, reduction="none")
        else:
            per_row = logits.row_losses()
        if denominators is None:
            denominators = self._denominators(self._row_weights(batch["labels"]), names)
        dev = per_row.device
        sums = torch.zeros(len(self.tasks), dtype=per_row.dtype, device=dev)
        sums = sums.index_add(0, self._ids(names, dev), per_row)
        return sums / denominators.to(dev, per_row.dtype) + self._aux_losses(names, dev)

    def _aux_losses(self, names: list[str], device: torch.device) -> torch.Tensor | float:
        """Each mixture task's ``aux_loss_coef * pa.mixture_aux_loss`` of the forward just run,
        by task index, weighted by its rows' share of the task's rows in the global batch (so
        the micro-batches of a step add up to about one term per step)."""
        present = [t for t in self.tasks if t.aux_loss_coef and t.name in names]
        if not present or not torch.is_grad_enabled():
            return 0.0
        out = torch.zeros(len(self.tasks), device=device)
        for t in present:
            i = self._index[t.name]
            share = sum(1 for n in names if n == t.name) / (
                float(self._rows[i]) if self._rows is not None else 1.0
            )
            aux = mixture_aux_loss(self.model, t.name).to(device)
            out[i] = t.aux_loss_coef * share * aux
        return out

    def _losses(
        self, batch: dict, names: list[str], denominators: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Mean loss of each adapter present in ``batch``, from one forward of the mixed batch."""
        vec = self._loss_vector(batch, names, denominators)
        return {n: vec[self._index[n]] for n in dict.fromkeys(names)}

    # -- the loop -------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimizer step of every adapter; returns each adapter's mean loss.

        Interrupted midway (an exception, Ctrl-C), it puts the data cursors back and drops
        the gradients, so the trainer stays at the previous step boundary.
        """
        self.model.train()
        cursors = {n: _Cursor(c.epoch, c.pos, c.order) for n, c in self.cursors.items()}
        saved = (cursors, self.tokens, self.padded_tokens)
        try:
            totals = self._accumulate()
        except BaseException:
            self.cursors, self.tokens, self.padded_tokens = saved
            for opt in self.opts.values():
                opt.zero_grad(set_to_none=True)
            raise
        for n, opt in self.opts.items():
            if self.args.max_grad_norm:
                params = [p for g in opt.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.scheds[n].step()
        self.step += 1
        return totals

    def _stop_requested(self) -> bool:
        """Ctrl-C seen (by any rank: all ranks stop after the same step)."""
        if not self.dist.enabled:
            return self._interrupted
        return bool(self.dist.sum_(torch.tensor([float(self._interrupted)])).item() > 0)

    def _accumulate(self) -> dict[str, float]:
        """Forward/backward ``grad_accum`` batches (this rank's share of each, in micro-batches)
        and sum the gradients over ranks.

        Every micro-batch's losses are divided by the adapters' weights in the whole global
        batch and backpropagated at once (its activations freed before the next forward), so
        the summed gradient is exactly the one of a single forward of the global batch.
        """
        names_all = [t.name for t in self.tasks]
        totals = torch.zeros(len(names_all), dtype=torch.float64)
        collate = self.tasks[0].train.collate_fn()
        for _ in range(self.args.grad_accum):
            rows, names = self._batch()
            denominators = self._global_denominators(rows, names)
            self._rows = self._denominators(torch.ones(len(rows)), names)
            start, stop = self.dist.share(len(rows))
            rows, names = rows[start:stop], names[start:stop]
            for part in self._micro_batch_split(rows):
                batch = collate([rows[i] for i in part])
                self.padded_tokens += batch["input_ids"].numel()
                vec = self._loss_vector(batch, [names[i] for i in part], denominators)
                (vec.sum() / self.args.grad_accum).backward()
                totals += vec.detach().to("cpu", torch.float64) / self.args.grad_accum
        if self.dist.enabled:
            for opt in self.opts.values():
                self.dist.sum_grads([p for g in opt.param_groups for p in g["params"]])
            self.dist.sum_(totals)
        return {n: float(totals[i]) for i, n in enumerate(names_all)}

    def train(self, progress: bool = True, stop_at: int | None = None) -> list[dict]:
        """Run to ``max_steps`` (or stop early at ``stop_at``); log to ``output_dir/metrics.jsonl``.

        A progress bar (rank 0) shows loss, lr and real tokens/s; each logged record holds
        the step, per-adapter loss, lr, tokens/s and rows/s. Evaluates every ``eval_every``
        steps and at ``max_steps``.
        """
        end = self.args.max_steps if stop_at is None else min(stop_at, self.args.max_steps)
        bar = _bar(end - self.step, progress and self.dist.is_main)
        elapsed, tokens0, rows = 1e-9, self.tokens, 0  # time in train steps (evals excluded)
        try:
            with _deferred_signals(self):
                while self.step < end:
                    t0 = time.perf_counter()
                    losses = self.train_step()
                    elapsed += time.perf_counter() - t0
                    rows += self.args.batch_size * self.args.grad_accum
                    rate = (self.tokens - tokens0) / elapsed
                    lr = self.scheds[self.tasks[0].name].get_last_lr()[0]
                    if self.step % self.args.log_every == 0 or self.step == self.args.max_steps:
                        self._log(
                            {
                                "step": self.step,
                                "loss": losses,
                                "lr": lr,
                                "tokens_per_s": rate,
                                "rows_per_s": rows / elapsed,
                            }
                        )
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{sum(losses.values()) / len(losses):.4f}",
                            lr=f"{lr:.2e}",
                            tok_s=f"{rate:,.0f}",
                        )
                        bar.update(1)
                    self.last_eval = None
                    if (self.args.eval_every and self.step % self.args.eval_every == 0) or (
                        self.step == self.args.max_steps
                    ):
                        self.last_eval = self.evaluate()
                        self._log({"step": self.step, "eval": self.last_eval})
                    for cb in self.callbacks:
                        cb(self)
                    if self._stop_requested():
                        raise KeyboardInterrupt
        finally:
            if bar is not None:
                bar.close()
        return self.history

    @torch.no_grad()
    def evaluate(self) -> dict[str, dict[str, float]]:
        """Per adapter: accuracy (classification) or loss and perplexity (LM), on its eval set.

        Chat rows made from labelled rows (``prompt_template``) also get ``accuracy``: the share
        of rows whose every answer token (the label word and the end of turn) is the model's
        argmax given the tokens before it, i.e. greedy decoding would answer exactly the label.
        Distributed, each rank evaluates every world-th batch and the sums are all-reduced.
        """
        was = self.model.training
        self.model.eval()
        out = {}
        for t in self.tasks:
            if t.eval is None:
                continue
            collate = t.eval.collate_fn()
            answers = t.eval.task == "chat" and t.eval.labels is not None
            hits, loss_sum, weight, rows = 0, 0.0, 0.0, 0
            starts = range(0, len(t.eval), self.args.eval_batch_size)
            for s in starts[self.dist.rank :: self.dist.world]:
                batch = collate(
                    [t.eval[i] for i in range(s, min(s + self.args.eval_batch_size, len(t.eval)))]
                )
                names = [t.name] * batch["input_ids"].shape[0]
                if self.kind == "classification":
                    logits, labels = self._forward(batch, names)
                    hits += int((logits.argmax(-1) == labels).sum())
                    weight += len(labels)
                else:
                    learned, labels = self._forward(batch, names)
                    loss, right = float(learned.row_losses().sum()), learned.rows_right().cpu()
                    w = float((labels[:, 1:] != IGNORE_INDEX).sum())
                    loss_sum, weight = loss_sum + loss, weight + w
                    hits, rows = hits + int(right.sum()), rows + len(right)
            if self.dist.enabled:
                sums = self.dist.sum_(torch.tensor([hits, loss_sum, weight, rows], dtype=torch.float64))
                hits, loss_sum, weight, rows = int(sums[0]), float(sums[1]), float(sums[2]), int(sums[3])
            if self.kind == "classification":
                out[t.name] = {"accuracy": hits / max(weight, 1)}
            else:
                mean = loss_sum / max(weight, 1)
                out[t.name] = {"loss": mean, "perplexity": math.exp(min(mean, 50))}
                if answers:
                    out[t.name]["accuracy"] = hits / max(rows, 1)
        self.model.train(was)
        return out

    # -- output ---------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.args.output_dir and self.dist.is_main:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(Path(self.args.output_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def save_adapters(self, folder: str | os.PathLike) -> None:
        """Each trained adapter (with its head) and every mixture's experts to ``folder/<name>``,
        written atomically (a mixture names its experts: the folder holds them beside it)."""
        for n in self.adapter_names():
            save_adapter(self.model, n, Path(folder) / n)

    def adapter_names(self) -> list[str]:
        """The tasks' adapters, then the experts of the mixtures among them (each once)."""
        return list(dict.fromkeys([t.name for t in self.tasks] + [e for t in self.tasks for e in t.experts]))

    def trained_adapters(self) -> list[str]:
        """The adapters whose weights this run changes: the tasks', and experts with trainable parameters."""
        names = [t.name for t in self.tasks]
        for t in self.tasks:
            for e in t.experts:
                if e not in names and any(p.requires_grad for p in self.model.paradapt[e].parameters()):
                    names.append(e)
        return names

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "args": asdict(self.args),
            "optimizers": {n: o.state_dict() for n, o in self.opts.items()},
            "schedulers": {n: s.state_dict() for n, s in self.scheds.items()},
            "cursors": {n: asdict(c) for n, c in self.cursors.items()},
            "adapters": {n: self.model.paradapt[n].state_dict() for n in self.trained_adapters()},
            "tokens": self.tokens,
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        for n, sd in state["adapters"].items():
            self.model.paradapt[n].load_state_dict(sd)
        for n, sd in state["optimizers"].items():
            self.opts[n].load_state_dict(sd)
        for n, sd in state["schedulers"].items():
            self.scheds[n].load_state_dict(sd)
        self.cursors = {n: _Cursor(**c) for n, c in state["cursors"].items()}
        self.tokens = state.get("tokens", 0)
        if "rng" in state:
            _set_rng_state(state["rng"])


def _real_tokens(example: dict) -> int:
    mask = example.get("attention_mask")
    return int(sum(mask)) if mask is not None else len(example["input_ids"])


def _targets(labels: list[int]) -> int:
    """Target tokens of an LM row: its labels after the first that the loss does not skip."""
    return sum(1 for y in labels[1:] if y != IGNORE_INDEX)


def _check_micro_batching(args: TrainArgs, tasks: list[Task]) -> None:
    """``micro_batches`` is "auto" or >= 1; every training row fits ``micro_batch_tokens``."""
    mb = args.micro_batches
    if mb != "auto" and (not is_int(mb) or mb < 1):
        raise ConfigError("train.micro_batches", f"must be 'auto' or an integer >= 1, got {mb!r}")
    cap = args.micro_batch_tokens
    if cap is None:
        return
    if not is_int(cap) or cap < 1:
        raise ConfigError("train.micro_batch_tokens", f"must be an integer >= 1 or null, got {cap!r}")
    for t in tasks:
        longest = max(len(ex["input_ids"]) for ex in t.train.examples)
        if longest > cap:
            raise ConfigError(
                "train.micro_batch_tokens",
                f"{cap} is less than the longest training row of {t.name} ({longest} tokens)",
            )


def _enable_checkpointing(model: nn.Module, contexts: Callable[[], tuple]) -> None:
    """Hugging Face activation checkpointing, non-reentrant, recomputing under ``contexts()[1]``."""
    kwargs = {"use_reentrant": False, "context_fn": contexts}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError(
            "train.gradient_checkpointing",
            f"{type(model).__name__} does not support activation checkpointing",
        )
    # Hugging Face also makes the embeddings' output require grad, which only reentrant
    # checkpointing needs; left on, it pulls the backward (and the recompute) through every
    # frozen layer below the lowest adapter. A model with the old checkpointing API ignores
    # our kwargs (and may checkpoint reentrantly): it keeps the hook.
    setter = getattr(model, "_set_gradient_checkpointing", None)
    old_api = setter is not None and "value" in inspect.signature(setter).parameters
    if not old_api and getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()


def _rng_state() -> dict:
    """Torch's random state (dropout masks), so a resumed run draws the same ones."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def _deferred_signals(trainer: Trainer) -> Iterator[None]:
    """SIGINT/SIGTERM mark the trainer interrupted; the loop stops at the end of the step.

    In one process a second signal raises at once. Distributed, launchers send a worker
    several signals (the terminal's Ctrl-C, then torchrun's own), so signals only set the
    flag there, and the ranks agree on it each step (``_stop_requested``).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    trainer._interrupted = False

    def handler(signum, frame):
        if trainer._interrupted and not trainer.dist.enabled:
            raise KeyboardInterrupt
        trainer._interrupted = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="step")
