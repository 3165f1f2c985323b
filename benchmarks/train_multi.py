"""K adapters trained in ONE paradapt Trainer run vs K separate runs (issue 4), on real MiniLM.

Base: the bundled all-MiniLM-L6-v2 encoder (``paradapt.loading.default_model_dir()``), frozen.
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

- joint:    one ``Trainer`` with K tasks and ``batch_size = K*b``, ``micro_batches`` as given by
  ``--joint-micro`` (default: both ``1``, one forward of all K*b rows padded to the longest,
  and ``auto``, the rows sorted by length and cut into the micro-batches that minimise padded
  tokens + a fixed cost per forward; the quality phase trains with the last setting). Its
  round-robin split gives
  task i the rows i, i+K, ... of each step: exactly b rows per step, taken in order from that
  task's own seeded permutation (``seeded_order(len, seed, epoch)``), i.e. the same rows a
  separate run with ``batch_size = b`` and the same seed draws. The script checks this: each
  adapter's data cursor (epoch, position) must be the same at the end of both setups.
- separate: K ``Trainer`` runs, one adapter each, ``batch_size = b``, each on a fresh base, with
  ``micro_batches`` from ``--separate-micro`` (default both ``1`` and ``auto``: a separate run
  buckets its own b rows the same way, so the comparison is auto against auto).

What differs: dropout masks (MiniLM and the heads keep dropout 0.1; the joint run draws them
for other tensors, so each row gets another mask) and padding (one joint forward pads every row
to the longest row of ANY task; micro-batches group rows of similar length across tasks, and
pad less than the separate runs' batches of b rows can). So the final accuracies
agree within noise, not bit for bit (tests/train/test_train_loop.py checks bit-level equality of
joint vs separate training without dropout).

Timing: (1) the two full runs, wall (``perf_counter``) and process CPU time (``process_time``,
all threads); (2) a cost phase for K in {2, 4, 8} (``--cost-k``): one joint trainer and K
separate trainers, timed alternately (``--rounds`` rounds of ``--cost-steps`` steps each);
per round the joint time and the SUM of the K separate times; median over rounds; ratio
separate / joint (> 1: joint is faster), and the padded tokens (rows x longest row, summed over
the forwards: ``Trainer.padded_tokens``) the joint trainer ran over those of the K separate ones.
The CPU is shared, so only the interleaved ratios are robust; the full-run totals are given for
completeness. ``--threads 1`` keeps the comparison steady next to other jobs; the load average
is printed at the start and the end.

The defaults are small (60 steps of 8 rows per adapter, max_length 48, 200 eval rows) to stay
under ~10 minutes on a busy 2-core CPU: the accuracies are of briefly trained adapters, fit for
comparing joint with separate, not as task results (see train_quality.py for those).

    python benchmarks/train_multi.py            # full: K=4, 60 steps, b=8 (~5-10 min on 2 cores)
    python benchmarks/train_multi.py --quick    # < 1 min smoke run
    python benchmarks/train_multi.py --k 2 --steps 60 --json out.json
    python benchmarks/train_multi.py --skip-quality --threads 1 --rounds 5 --joint-micro 1 4 auto
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


def specs_for(k: int, order: list[str] | None = None) -> list[Spec]:
    """The first ``k`` adapters (in ``order``, names of BASE_SPECS); beyond 4 they repeat with new seeds."""
    by_name = {s.name: s for s in BASE_SPECS}
    base = [by_name[n] for n in order] if order else BASE_SPECS
    out = []
    for i in range(k):
        s = base[i % len(base)]
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


def train_args(a: argparse.Namespace, batch: int, steps: int, micro: str = "auto") -> TrainArgs:
    """Shared settings; ``micro``: the ``micro_batches`` value (``"auto"`` is 1 for one adapter)."""
    return TrainArgs(
        max_steps=steps,
        batch_size=batch,
        micro_batches=micro if micro == "auto" else int(micro),
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
        args = train_args(a, k * b, a.steps, micro=a.joint_micro[-1])
        tr = Trainer(with_adapters(base, specs, labels), list(tasks.values()), args)
        tr.train(progress=False)
        return tr, tr.evaluate()

    (jt, jev), jw, jc = timed(joint)
    log(f"joint run: {jw:.0f} s wall")
    rows, sw_total, sc_total = [], 0.0, 0.0
    for s in specs:

        def alone(s=s):
            torch.manual_seed(0)
            args = train_args(a, b, a.steps, micro=a.separate_micro[-1])
            tr = Trainer(with_adapters(base, [s], labels), [tasks[s.name]], args)
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
    """Interleaved per-step cost of joint trainers (one per ``--joint-micro`` setting) and K
    separate ones (one set per ``--separate-micro`` setting; training steps only)."""
    specs = specs_for(k, a.order)
    built = {s.name: build_task(s, tok, a.cost_train_rows, 1, a.max_length) for s in specs}
    tasks = {n: t for n, (t, _) in built.items()}
    labels = {n: lab for n, (_, lab) in built.items()}
    steps = a.cost_steps * (a.rounds + 1)
    setups: dict[str, list[Trainer]] = {}
    for m in a.joint_micro:
        args = train_args(a, k * a.batch, steps, micro=m)
        setups[f"joint {m}"] = [Trainer(with_adapters(base, specs, labels), list(tasks.values()), args)]
    for m in a.separate_micro:
        setups[f"separate {m}"] = [
            Trainer(with_adapters(base, [s], labels), [tasks[s.name]], train_args(a, a.batch, steps, micro=m))
            for s in specs
        ]
    run = lambda tr: [tr.train_step() for _ in range(a.cost_steps)]  # noqa: E731
    for trainers in setups.values():
        for tr in trainers:
            run(tr)  # warm-up round, not timed
    counted = {id(tr): tr.padded_tokens for trainers in setups.values() for tr in trainers}
    wall: dict[str, list[float]] = {name: [] for name in setups}
    cpu: dict[str, list[float]] = {name: [] for name in setups}
    for r in range(a.rounds):
        names = list(setups) if r % 2 == 0 else list(setups)[::-1]
        for name in names:
            w = c = 0.0
            for tr in setups[name]:
                _, tw, tc = timed(lambda tr=tr: run(tr))
                w, c = w + tw / a.cost_steps, c + tc / a.cost_steps
            wall[name].append(w)
            cpu[name].append(c)
    med = statistics.median
    out = {"k": k, "rows_per_step": k * a.batch, "setups": {}}
    for name, trainers in setups.items():
        out["setups"][name] = {
            "step_wall_s": med(wall[name]),
            "step_cpu_s": med(cpu[name]),
            "padded_tokens": sum(tr.padded_tokens - counted[id(tr)] for tr in trainers),
            "forwards": a.rounds * a.cost_steps,
        }
    return out


def fit_forward_cost(base: nn.Module, reps: int = 5) -> dict:
    """The fixed cost of one routed forward + backward, in tokens: the ``micro_batches: auto``
    constant (``paradapt.train.loop.AUTO_FORWARD_COST_TOKENS``). Times one parallel adapter (r=64,
    2-class head) at rows x width from 1 x 16 to 16 x 48 and fits ``cpu = a * tokens + b``."""
    from paradapt.heads import classify

    model = with_adapters(base, [Spec("a", "sst2", "parallel", 0)], {"a": [0, 1]})
    model.train()
    g = torch.Generator().manual_seed(0)
    points = []
    for rows in (1, 2, 4, 8, 16):
        for width in (16, 32, 48):
            ids = torch.randint(1000, 20000, (rows, width), generator=g)
            mask, y = torch.ones_like(ids), torch.zeros(rows, dtype=torch.long)

            def step(ids=ids, mask=mask, y=y):
                with pa.route(model, ["a"] * len(ids)):
                    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
                logits = classify(model, hidden, mask, ["a"] * len(ids))
                torch.nn.functional.cross_entropy(logits, y).backward()

            step()
            times = [timed(step)[2] for _ in range(reps)]
            points.append((rows * width, statistics.median(times)))
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(c for _, c in points) / n
    a = sum((t - mx) * (c - my) for t, c in points) / sum((t - mx) ** 2 for t, _ in points)
    b = my - a * mx
    return {
        "ms_per_token": 1000 * a,
        "ms_per_forward": 1000 * b,
        "tokens_per_forward": b / a,
        "points": points,
    }


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
    p.add_argument(
        "--joint-micro",
        nargs="+",
        default=["1", "auto"],
        help="joint runs' micro_batches settings timed in the cost phase (the last one also "
        "trains the quality phase); 1 = one forward of the whole batch, as before micro-batching",
    )
    p.add_argument(
        "--separate-micro",
        nargs="+",
        default=["1", "auto"],
        help="the separate runs' micro_batches settings timed in the cost phase (the last one also "
        "trains the quality phase)",
    )
    p.add_argument(
        "--order",
        type=lambda v: v.split(","),
        default=None,
        help="adapters in this order (comma list of sst2, agnews, sms, sst2_lora): K=2 takes the first "
        "two, e.g. sst2,sms for two tasks of similar lengths (default: sst2,agnews,sms,sst2_lora)",
    )
    p.add_argument("--skip-quality", action="store_true", help="cost phase only")
    p.add_argument(
        "--fit-forward-cost",
        action="store_true",
        help="only fit the fixed cost of one forward + backward in tokens (micro_batches: auto's constant)",
    )
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)
    if not 1 <= a.k <= len(BASE_SPECS):
        p.error(f"--k must be 1..{len(BASE_SPECS)} (the quality phase has {len(BASE_SPECS)} real tasks)")
    names = [s.name for s in BASE_SPECS]
    if a.order is not None and (sorted(a.order) != sorted(names)):
        p.error(f"--order must list each of {names} once, got {a.order}")
    if a.quick:
        a.steps, a.batch, a.train_rows, a.eval_rows = 2, 2, 32, 16
        a.cost_k, a.cost_steps, a.rounds, a.cost_train_rows = [2], 1, 1, 16
    return a


def report(a, q: dict | None, costs: list[dict]) -> None:
    if q is not None:
        print(
            f"quality phase: K={a.k}, {a.steps} steps, b={a.batch} rows/adapter/step, lr {a.lr}, "
            f"max_length {a.max_length}, micro_batches joint {a.joint_micro[-1]}, "
            f"separate {a.separate_micro[-1]}"
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
        f"\ncost phase (interleaved, {a.rounds} rounds x {a.cost_steps} steps, medians; per training step; "
        f"{torch.get_num_threads()} threads); ratio = separate / joint (> 1: joint is faster):"
    )
    print(
        f"{'K':>3}{'rows':>6}{'joint':>12}{'separate':>12}{'joint s':>10}{'separate s':>12}"
        f"{'ratio wall':>12}{'ratio CPU':>11}{'padded tok joint/sep':>22}"
    )
    for c in costs:
        st = c["setups"]
        for jm in a.joint_micro:
            for sm in a.separate_micro:
                j, s = st[f"joint {jm}"], st[f"separate {sm}"]
                print(
                    f"{c['k']:>3}{c['rows_per_step']:>6}{jm:>12}{sm:>12}{j['step_wall_s']:>10.3f}"
                    f"{s['step_wall_s']:>12.3f}{s['step_wall_s'] / j['step_wall_s']:>12.2f}"
                    f"{s['step_cpu_s'] / j['step_cpu_s']:>11.2f}"
                    f"{j['padded_tokens'] / s['padded_tokens']:>22.2f}"
                )


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoModel, AutoTokenizer

    from paradapt.loading import default_model_dir

    model_dir = str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModel.from_pretrained(model_dir)
    if a.fit_forward_cost:
        fit = fit_forward_cost(base)
        print(
            f"routed forward + backward, 1 adapter, {torch.get_num_threads()} threads, load "
            f"{os.getloadavg()[0]:.2f}: {fit['ms_per_token']:.3f} ms a token + {fit['ms_per_forward']:.1f} ms "
            f"a forward = {fit['tokens_per_forward']:.0f} tokens a forward"
        )
        for t, c in fit["points"]:
            print(f"  {t:5d} tokens: {1000 * c:7.1f} ms")
        return 0
    specs = specs_for(a.k, a.order)
    built = {s.name: build_task(s, tok, a.train_rows, a.eval_rows, a.max_length) for s in specs}
    tasks = {n: t for n, (t, _) in built.items()}
    labels = {n: lab for n, (_, lab) in built.items()}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; base {model_dir}; "
        f"load average at start {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    q = None if a.skip_quality else quality_phase(a, base, tasks, labels, specs)
    costs = []
    for k in a.cost_k:
        costs.append(cost_phase(a, base, tok, k))
        times = ", ".join(f"{n} {v['step_wall_s']:.3f} s" for n, v in costs[-1]["setups"].items())
        log(f"cost phase K={k}: {times}")
    report(a, q, costs)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "quality": q, "cost": costs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
