"""K adapters trained in ONE paradapt Trainer run vs K separate runs (issue 4), on real MiniLM.

Base: the bundled all-MiniLM-L6-v2 encoder (``paradapt.cli.default_model_dir()``), frozen.
Tasks (real data from ``shared/assets/data``), one adapter each, kinds mixed:

- ``sst2``      parallel r=64: seeded 2,000 rows of ``sst2/train.tsv``, eval on the first
  ``--eval-rows`` (default 200) of ``sst2/test.tsv`` (the 872 GLUE dev sentences);
- ``agnews``    parallel r=64: seeded 2,000 rows of ``agnews/dev.tsv``, eval on a seeded
  ``--eval-rows`` of ``agnews/test.tsv``;
- ``sms``       series r=64:  SMS Spam Collection, de-duplicated by text, seeded 80/20 split
  (train limited to 2,000 rows, eval to ``--eval-rows``);
- ``sst2_lora`` LoRA r=16:    another seeded 2,000 rows of SST-2, same eval rows as ``sst2``.

For K > 4 (cost phase only) the tasks repeat with other adapter seeds and another row order.

Setups, with the same per-adapter batch ``b``, steps, lr, warmup + cosine schedule, adapter init
(``torch.manual_seed`` per adapter before ``add_adapter``) and data order:

- joint:    one ``Trainer`` with K tasks and ``batch_size = K*b``. Its round-robin split gives
  task i the rows i, i+K, ... of each step: exactly b rows per step, taken in order from that
  task's own seeded permutation (``seeded_order(len, seed, epoch)``), i.e. the same rows a
  separate run with ``batch_size = b`` and the same seed draws. The script checks this: each
  adapter's data cursor (epoch, position) must be the same at the end of both setups.
- separate: K ``Trainer`` runs, one adapter each, ``batch_size = b``, each on a fresh base.

What differs: dropout masks (MiniLM and the heads keep dropout 0.1; the joint run draws them
for a K*b-row tensor, so each row gets another mask) and padding (a joint batch pads every row
to the longest row of ANY task: SST-2 rows pay for AG News lengths). So the final accuracies
agree within noise, not bit for bit (tests/test_train_loop.py checks bit-level equality of
joint vs separate training without dropout).

Timing: (1) the two full runs, wall (``perf_counter``) and process CPU time (``process_time``,
all threads); (2) a cost phase for K in {2, 4, 8} (``--cost-k``): one joint trainer and K
separate trainers, timed alternately (``--rounds`` rounds of ``--cost-steps`` steps each);
per round the joint time and the SUM of the K separate times; median over rounds; ratio
separate / joint (> 1: joint is faster), and the padded tokens (rows x longest row, summed over
the batches) the joint trainer ran over those of the K separate ones. The CPU is shared, so only the interleaved ratios are
robust; the full-run totals are given for completeness.

The defaults are small (60 steps of 8 rows per adapter, max_length 48, 200 eval rows) to stay
under ~10 minutes on a busy 2-core CPU: the accuracies are of briefly trained adapters, fit for
comparing joint with separate, not as task results (see train_quality.py for those).

    python benchmarks/train_multi.py            # full: K=4, 60 steps, b=8 (~5-10 min on 2 cores)
    python benchmarks/train_multi.py --quick    # < 1 min smoke run
    python benchmarks/train_multi.py --k 2 --steps 60 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import paradapt as pa  # noqa: E402
from paradapt.train.data import LabelMap, tokenize  # noqa: E402
from paradapt.train.loop import Task, TrainArgs, Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("PARADAPT_ASSETS", ROOT.parent / "shared" / "assets"))
AGNEWS = ["World", "Sports", "Business", "Sci/Tech"]


# ----------------------------------------------------------------------------- data
def read_tsv(path: Path, header: bool) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    return rows[1:] if header else rows


def subset(rows: list, n: int, seed: int) -> list:
    """``n`` rows of a seeded permutation (all of them, shuffled, when ``n >= len(rows)``)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[:n]]


def raw_task(kind: str, n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) records ``{"text", "label"}`` of a base task ("sst2", "agnews", "sms")."""
    rec = lambda rows: [{"text": t, "label": y} for t, y in rows]  # noqa: E731
    if kind == "sst2":
        train = [(t, int(y)) for t, y in read_tsv(ASSETS / "data/sst2/train.tsv", True)]
        test = [(t, int(y)) for t, y in read_tsv(ASSETS / "data/sst2/test.tsv", True)]
        return rec(subset(train, n_train, seed)), rec(test[:n_eval])  # GLUE dev order
    if kind == "agnews":
        train = [(t, y) for t, y in read_tsv(ASSETS / "data/agnews/dev.tsv", False)]
        test = [(t, y) for t, y in read_tsv(ASSETS / "data/agnews/test.tsv", False)]
        return rec(subset(train, n_train, seed)), rec(subset(test, n_eval, 4321))
    if kind == "sms":
        seen: dict[str, str] = {}
        for label, text in read_tsv(ASSETS / "data/sms_spam/SMSSpamCollection", False):
            seen.setdefault(text, label)  # de-duplicate BEFORE splitting: no test text in train
        rows = subset(sorted((t, y) for t, y in seen.items()), len(seen), 99)
        cut = int(0.8 * len(rows))
        return rec(subset(rows[:cut], n_train, seed)), rec(rows[cut:][:n_eval])
    raise SystemExit(f"unknown task {kind!r}")


@dataclass
class Spec:
    """One adapter of the benchmark: name, base task, adapter kind, seeds."""

    name: str
    task: str
    kind: str
    seed: int  # adapter init and data slice


BASE_SPECS = [
    Spec("sst2", "sst2", "parallel", 0),
    Spec("agnews", "agnews", "parallel", 1),
    Spec("sms", "sms", "series", 2),
    Spec("sst2_lora", "sst2", "lora", 3),
]


def specs_for(k: int) -> list[Spec]:
    """The first ``k`` adapters; beyond 4 the tasks repeat with new seeds."""
    out = []
    for i in range(k):
        s = BASE_SPECS[i % len(BASE_SPECS)]
        rep = i // len(BASE_SPECS)
        out.append(Spec(s.name if rep == 0 else f"{s.name}_{rep}", s.task, s.kind, s.seed + 10 * rep))
    return out


def build_task(spec: Spec, tok, n_train: int, n_eval: int, max_length: int) -> tuple[Task, list]:
    train, ev = raw_task(spec.task, n_train, n_eval, 1234 + spec.seed)
    labels = LabelMap(AGNEWS) if spec.task == "agnews" else LabelMap.from_records(train)
    kw = {"max_length": max_length, "task": "classification", "labels": labels}
    return Task(spec.name, tokenize(train, tok, **kw), tokenize(ev, tok, **kw)), list(labels.labels)


# ----------------------------------------------------------------------------- models
def adapter_config(kind: str, labels: list) -> pa.AdapterConfig:
    head = {"labels": labels, "pooling": "mean", "dropout": 0.1}
    if kind == "parallel":
        return pa.ParallelConfig(r=64, scale=4.0, head=head)
    if kind == "series":
        return pa.SeriesConfig(r=64, head=head)
    return pa.LoRAConfig(r=16, alpha=32.0, head=head)


def with_adapters(base: nn.Module, specs: list[Spec], labels: dict[str, list]) -> nn.Module:
    """A copy of the frozen base with ``specs``' adapters, each initialised from its own seed."""
    model = copy.deepcopy(base)
    for s in specs:
        torch.manual_seed(10_000 + s.seed)
        pa.add_adapter(model, s.name, adapter_config(s.kind, labels[s.name]))
    return model


def train_args(a: argparse.Namespace, batch: int, steps: int) -> TrainArgs:
    return TrainArgs(
        max_steps=steps,
        batch_size=batch,
        lr=a.lr,
        warmup_steps=max(1, steps // 10),
        log_every=10**9,
        eval_batch_size=64,
        seed=0,
    )


def log(msg: str) -> None:
    """Progress on stderr (stdout holds only the report)."""
    print(msg, file=sys.stderr, flush=True)


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """``fn()`` with its wall and process CPU seconds."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


# ----------------------------------------------------------------------------- phases
def quality_phase(a, base, tasks, labels, specs) -> dict:
    """Full joint run vs K full separate runs: accuracy per adapter, wall and CPU totals."""
    k, b = len(specs), a.batch

    def joint():
        torch.manual_seed(0)
        tr = Trainer(with_adapters(base, specs, labels), list(tasks.values()), train_args(a, k * b, a.steps))
        tr.train(progress=False)
        return tr, tr.evaluate()

    (jt, jev), jw, jc = timed(joint)
    log(f"joint run: {jw:.0f} s wall")
    rows, sw_total, sc_total = [], 0.0, 0.0
    for s in specs:

        def alone(s=s):
            torch.manual_seed(0)
            tr = Trainer(with_adapters(base, [s], labels), [tasks[s.name]], train_args(a, b, a.steps))
            tr.train(progress=False)
            return tr, tr.evaluate()

        (st, sev), sw, sc = timed(alone)
        log(f"separate run {s.name}: {sw:.0f} s wall")
        sw_total, sc_total = sw_total + sw, sc_total + sc
        same_rows = vars(jt.cursors[s.name]) == vars(st.cursors[s.name])
        if not same_rows:
            raise SystemExit(f"{s.name}: the joint and separate runs drew different rows")
        rows.append(
            {
                "adapter": s.name,
                "kind": s.kind,
                "joint_acc": jev[s.name]["accuracy"],
                "separate_acc": sev[s.name]["accuracy"],
                "eval_rows": len(tasks[s.name].eval),
                "same_rows": same_rows,
            }
        )
    return {
        "adapters": rows,
        "joint_wall_s": jw,
        "joint_cpu_s": jc,
        "separate_wall_s": sw_total,
        "separate_cpu_s": sc_total,
    }


def cost_phase(a, base, tok, k: int) -> dict:
    """Interleaved per-step cost of one joint trainer vs K separate ones (training steps only)."""
    specs = specs_for(k)
    built = {s.name: build_task(s, tok, a.cost_train_rows, 1, a.max_length) for s in specs}
    tasks = {n: t for n, (t, _) in built.items()}
    labels = {n: lab for n, (_, lab) in built.items()}
    steps = a.cost_steps * (a.rounds + 1)
    joint = Trainer(
        with_adapters(base, specs, labels), list(tasks.values()), train_args(a, k * a.batch, steps)
    )
    alone = [
        Trainer(with_adapters(base, [s], labels), [tasks[s.name]], train_args(a, a.batch, steps))
        for s in specs
    ]
    padded = {id(tr): 0 for tr in [joint, *alone]}
    for tr in [joint, *alone]:
        tr._batch = count_padded(tr, padded)
    run = lambda tr: [tr.train_step() for _ in range(a.cost_steps)]  # noqa: E731
    run(joint)  # warm-up round, not timed
    for tr in alone:
        run(tr)
    jw, jc, sw, sc = [], [], [], []
    for r in range(a.rounds):
        order = [joint, *alone] if r % 2 == 0 else [*alone, joint]
        t_sep_w = t_sep_c = 0.0
        for tr in order:
            _, w, c = timed(lambda tr=tr: run(tr))
            if tr is joint:
                jw.append(w / a.cost_steps)
                jc.append(c / a.cost_steps)
            else:
                t_sep_w, t_sep_c = t_sep_w + w / a.cost_steps, t_sep_c + c / a.cost_steps
        sw.append(t_sep_w)
        sc.append(t_sep_c)
    med = statistics.median
    return {
        "k": k,
        "rows_per_step": k * a.batch,
        "joint_step_wall_s": med(jw),
        "separate_steps_wall_s": med(sw),
        "ratio_wall": med(sw) / med(jw),
        "joint_step_cpu_s": med(jc),
        "separate_steps_cpu_s": med(sc),
        "ratio_cpu": med(sc) / med(jc),
        "padded_tokens_joint": padded[id(joint)],
        "padded_tokens_separate": sum(padded[id(tr)] for tr in alone),
    }


def count_padded(tr: Trainer, counts: dict[int, int]) -> Callable[[], tuple[dict, list[str]]]:
    """``tr._batch`` that also adds the batch's padded size (rows x longest row) to ``counts``:
    a joint batch pads every row to the longest row of any task."""
    draw = tr._batch

    def batch() -> tuple[dict, list[str]]:
        out, names = draw()
        counts[id(tr)] += out["input_ids"].numel()
        return out, names

    return batch


# ----------------------------------------------------------------------------- main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run (< 1 min): checks the script works")
    p.add_argument("--k", type=int, default=4, help="adapters in the quality phase (1-4)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8, help="rows per adapter per step (b)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--train-rows", type=int, default=2000)
    p.add_argument("--eval-rows", type=int, default=200, help="eval rows per adapter")
    p.add_argument("--cost-k", type=int, nargs="*", default=[2, 4, 8])
    p.add_argument("--cost-steps", type=int, default=1, help="steps per setup per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cost-train-rows", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)
    if not 1 <= a.k <= len(BASE_SPECS):
        p.error(f"--k must be 1..{len(BASE_SPECS)} (the quality phase has {len(BASE_SPECS)} real tasks)")
    if a.quick:
        a.steps, a.batch, a.train_rows, a.eval_rows = 2, 2, 32, 16
        a.cost_k, a.cost_steps, a.rounds, a.cost_train_rows = [2], 1, 1, 16
    return a


def report(a, q: dict, costs: list[dict]) -> None:
    print(
        f"quality phase: K={a.k}, {a.steps} steps, b={a.batch} rows/adapter/step, lr {a.lr}, max_length {a.max_length}"
    )
    print(f"{'adapter':<12}{'kind':<10}{'eval rows':>10}{'joint acc':>11}{'separate acc':>14}{'diff':>8}")
    for r in q["adapters"]:
        d = r["joint_acc"] - r["separate_acc"]
        print(
            f"{r['adapter']:<12}{r['kind']:<10}{r['eval_rows']:>10}{r['joint_acc']:>11.3f}"
            f"{r['separate_acc']:>14.3f}{d:>+8.3f}"
        )
    print(
        "same rows per adapter in both setups (data cursors equal):",
        all(r["same_rows"] for r in q["adapters"]),
    )
    print(
        f"train+eval totals: joint {q['joint_wall_s']:.1f} s wall / {q['joint_cpu_s']:.1f} s CPU; "
        f"separate (sum of {a.k}) {q['separate_wall_s']:.1f} s wall / {q['separate_cpu_s']:.1f} s CPU; "
        f"ratio separate/joint {q['separate_wall_s'] / q['joint_wall_s']:.2f} wall, "
        f"{q['separate_cpu_s'] / q['joint_cpu_s']:.2f} CPU"
    )
    print(
        f"\ncost phase (interleaved, {a.rounds} rounds x {a.cost_steps} steps, medians; per training step):"
    )
    print(
        f"{'K':>3}{'rows':>6}{'joint s':>10}{'K separate s':>14}{'ratio wall':>12}{'ratio CPU':>11}"
        f"{'padded tok joint/sep':>22}"
    )
    for c in costs:
        print(
            f"{c['k']:>3}{c['rows_per_step']:>6}{c['joint_step_wall_s']:>10.3f}{c['separate_steps_wall_s']:>14.3f}"
            f"{c['ratio_wall']:>12.2f}{c['ratio_cpu']:>11.2f}"
            f"{c['padded_tokens_joint'] / c['padded_tokens_separate']:>22.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoModel, AutoTokenizer

    from paradapt.cli import default_model_dir

    model_dir = str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModel.from_pretrained(model_dir)
    specs = specs_for(a.k)
    built = {s.name: build_task(s, tok, a.train_rows, a.eval_rows, a.max_length) for s in specs}
    tasks = {n: t for n, (t, _) in built.items()}
    labels = {n: lab for n, (_, lab) in built.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; base {model_dir}", flush=True)
    q = quality_phase(a, base, tasks, labels, specs)
    costs = []
    for k in a.cost_k:
        costs.append(cost_phase(a, base, tok, k))
        log(f"cost phase K={k}: ratio {costs[-1]['ratio_wall']:.2f} wall")
    report(a, q, costs)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "quality": q, "cost": costs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
