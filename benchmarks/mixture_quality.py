"""Learned mixtures on SmolLM2-135M-Instruct: one router over three frozen task adapters (issue 19).

The experts are the three task adapters of ``benchmarks/decoder_quality.py`` of one row (default
``lora-1%``, seed 0: a LoRA on q/v per task; a mixture's router chooses among adapters at the same
sites, so the three share a kind). Only a router per site is trained (``train_experts: false``,
token gates, Switch load balancing), by ``paradapt train``'s own code, on an unlabelled mix of the
three tasks' *training* rows (each task's held-out rows are left out exactly as
``decoder_quality.py`` leaves them out). Then one model, the mixture, answers every task's
held-out rows, next to:

* ``oracle``: each row sent to its own task's adapter by name (what a caller who knows the task does);
* ``average``: ``pa.Average`` of the three adapters (fixed equal weights);
* ``base``: the base model with the same prompt.

Accuracy is ``decoder_quality.py``'s ``strict`` (the greedy answer is exactly the label word and
the end of turn). Target: the mixture within 2 points of ``oracle`` on every task.

Serving cost (``--serve``): the real decoder ``Engine`` in process, one mixed stream of held-out
prompts (the three tasks interleaved, greedy, 3 new tokens each with EOS ignored so every
configuration generates the same tokens) routed by name and through each mixture (top-1, top-2,
dense); they run interleaved, ``--repeats`` times, and requests/s is reported
relative to routing by name.

    python benchmarks/mixture_quality.py                                   # top 1, 2 and dense, ~2 h here
    python benchmarks/mixture_quality.py --top-k 1,2,3 --reuse             # routers and cells already done are kept
    python benchmarks/mixture_quality.py --top-k 1 --steps 5 --eval-limit 16 --serve-rows 12   # smoke

Results go to ``--out`` (``results.json``) and the table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decoder_quality as dq  # noqa: E402  (the tasks, their held-out rows and the accuracy)

TASKS = ("sst2", "agnews", "sms")


def expert_folder(quality_out: Path, task: str, row: str) -> Path:
    """Where ``decoder_quality.py`` saved the task's adapter of ``row`` (seed 0)."""
    folder = quality_out / task / f"{row}-s0" / "adapters" / task
    if not (folder / "adapter_config.json").is_file():
        sys.exit(
            f"no {row} adapter for {task} at {folder}; train it first:\n"
            f"  python benchmarks/decoder_quality.py --tasks {task} --rows {row} --out {quality_out}"
        )
    return folder


def task_rows(task: str, eval_limit: int | None) -> tuple[list[dict], list[dict], int]:
    """(train, held-out, max_length) chat records of a task, split as decoder_quality splits them."""
    cfg, base_dir = dq.load_task(task)
    train, evals = dq.eval_records(cfg, base_dir, limit=eval_limit or sys.maxsize)
    return train, evals, cfg.tokenize.max_length


def write_mix(path: Path, train: dict[str, list[dict]], per_task: int, seed: int) -> int:
    """An unlabelled JSONL mix of ``per_task`` training conversations per task (seeded picks)."""
    rng = random.Random(seed)
    rows = []
    for task in TASKS:
        picks = rng.sample(train[task], min(per_task, len(train[task])))
        rows += [{"messages": r["messages"]} for r in picks]
    rng.shuffle(rows)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return len(rows)


def train_router(
    out: Path, experts: dict[str, Path], mix: Path, top_k: int, max_length: int, args
) -> tuple[Path, float]:
    """Train the mixture's routers over the frozen experts through ``paradapt.train.train``."""
    from paradapt.train import train

    raw = {
        "model": "smollm2-135m-instruct",
        "output_dir": str(out),
        "tokenize": {"max_length": max_length},
        "adapters": [
            {
                "name": f"mix-top{top_k}",
                "kind": "mixture",
                "experts": [{"path": str(experts[t])} for t in TASKS],
                "config": {"train_experts": False, "granularity": "token", "top_k": top_k},
                "aux_loss_coef": 0.01,
                "data": {"path": str(mix)},
            }
        ],
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_steps": max(1, args.steps // 10),
            "schedule": "cosine",
            "eval_every": 0,
            "save_every": 0,
            "log_every": 10,
            "seed": args.seed,
        },
    }
    t0 = time.perf_counter()
    result = train(raw, overwrite=True, progress=False)
    return result.adapters[f"mix-top{top_k}"], time.perf_counter() - t0


def trained_router(out: Path, top_k: int) -> Path | None:
    """The mixture an earlier run of this script finished training into ``out`` (``--reuse``)."""
    for cfg in sorted((out / f"top{top_k}").rglob("adapter_config.json")):
        if cfg.parent.name == f"mix-top{top_k}" and "checkpoints" not in cfg.parts:
            return cfg.parent
    return None


def accuracy(model, tok, evals: list[dict], max_length: int, entry) -> float:
    """``strict`` accuracy of every held-out row under one routing entry (name, composition, None)."""
    import paradapt as pa
    from paradapt.train.data.chat import render_chats
    from paradapt.train.data.tokens import pad_id_of

    examples = render_chats(evals, tok, max_length)
    answers = dq.answer_tokens(examples, evals)
    with pa.route(model, entry):
        return dq.evaluate(model, examples, pad_id_of(tok), answers)["strict"]


def quality(
    mixtures: dict[int, Path], experts: dict[str, Path], evals: dict, lengths: dict, known: dict | None = None
) -> dict:
    """Accuracy per task of base, oracle, average and each mixture, on one model carrying them all.

    ``known`` (task -> label -> accuracy) holds cells an earlier run measured on the same rows
    with the same adapters (``--reuse``); they are copied, not re-evaluated, since the held-out
    sets take minutes per configuration here.
    """
    import paradapt as pa
    from paradapt.loading import load_model
    from paradapt.train import load_mixture

    tok, model = load_model("smollm2-135m-instruct")
    for t in TASKS:
        pa.load_adapter(model, experts[t], name=t)
    for k, folder in mixtures.items():
        load_mixture(model, folder, f"mix-top{k}")
    entries = {"base": None, "average": pa.Average(*TASKS)}
    entries |= {mixture_label(k): f"mix-top{k}" for k in mixtures}
    out: dict[str, dict[str, float]] = {}
    for t in TASKS:
        row = {}
        for label, entry in {"oracle": t, **entries}.items():
            cached = (known or {}).get(t, {}).get(label)
            row[label] = cached if cached is not None else accuracy(model, tok, evals[t], lengths[t], entry)
        out[t] = row
        print(t, {k: round(v, 4) for k, v in row.items()}, flush=True)
    return out


def mixture_label(k: int) -> str:
    """The column of the mixture with ``top_k = k`` (``k`` = every expert: the dense softmax gate)."""
    return "mixture dense" if k == len(TASKS) else f"mixture top-{k}"


def known_cells(path: Path, evals: dict, reused: set[int], experts: str) -> dict:
    """Cells of an earlier ``results.json`` that still hold: same experts and held-out rows;
    a mixture's cells only where its router was reused, not retrained."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if old.get("experts") != experts or old.get("eval_rows") != {t: len(evals[t]) for t in TASKS}:
        return {}
    keep = {"oracle", "base", "average"} | {mixture_label(k) for k in reused}
    return {t: {c: v for c, v in row.items() if c in keep} for t, row in old.get("accuracy", {}).items()}


# --------------------------------------------------------------------------- serving cost


def serving_cost(mixtures: dict[int, Path], experts: dict[str, Path], evals: dict, args) -> dict:
    """Requests/s of one mixed stream routed by name vs through each mixture (interleaved, repeated)."""
    from paradapt.loading import load_model
    from paradapt.serve.engine import Engine, EngineConfig
    from paradapt.serve.sampling import SamplingParams

    root = args.out / "serve_root"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for t in TASKS:
        shutil.copytree(experts[t], root / t)
    for k, folder in mixtures.items():
        shutil.copytree(folder, root / f"mix-top{k}")
    tok, model = load_model("smollm2-135m-instruct")
    engine = Engine(model, root, EngineConfig(max_slots=8, max_served=8, max_running=16), tokenizer=tok)
    stream = []  # (prompt ids, task), the tasks interleaved
    per = args.serve_rows // len(TASKS)
    for i in range(per):
        for t in TASKS:
            r = evals[t][i % len(evals[t])]
            msgs = r["messages"][:-1]  # the answer is the last message
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            stream.append((tok(text, add_special_tokens=False)["input_ids"], t))
    configs = {"by name": None, **{mixture_label(k): f"mix-top{k}" for k in mixtures}}
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    seconds: dict[str, list[float]] = {c: [] for c in configs}
    for rep in range(args.repeats + 1):  # the first pass warms every adapter up and is not counted
        for label, mixture in configs.items():
            t0 = time.perf_counter()
            for ids, t in stream:
                engine.add_request(ids, mixture or t, params)
            engine.run()
            dt = time.perf_counter() - t0
            for h in list(engine.handles.values()):
                if h.status != "finished":
                    sys.exit(f"{label}: request failed: {h.error}")
                engine.pop(h.id)
            if rep:
                seconds[label].append(dt)
    base = statistics.median(seconds["by name"])
    return {
        label: {
            "req_s": len(stream) / statistics.median(s),
            "x_by_name": base / statistics.median(s),
            "seconds": s,
        }
        for label, s in seconds.items()
    } | {"requests": len(stream)}


# --------------------------------------------------------------------------- report


def table(q: dict) -> str:
    """Accuracy per task and configuration, and each mixture's distance to the oracle."""
    cols = list(next(iter(q.values())))
    mixes = [c for c in cols if c.startswith("mixture")]
    lines = [
        "| task | " + " | ".join(cols) + " | " + " | ".join(f"{m} - oracle" for m in mixes) + " |",
        "|---|" + "--:|" * (len(cols) + len(mixes)),
    ]
    for t, row in q.items():
        cells = " | ".join(f"{100 * row[c]:.1f}" for c in cols)
        gaps = " | ".join(f"{100 * (row[m] - row['oracle']):+.1f}" for m in mixes)
        lines.append(f"| {t} | {cells} | {gaps} |")
    return "\n".join(lines)


def verdicts(q: dict) -> list[str]:
    """Per mixture: is this one model within 2 points of the oracle on every task (the target:
    one endpoint serving all three)?"""
    mixes = [c for c in next(iter(q.values())) if c.startswith("mixture")]
    out = []
    for m in mixes:
        worst_task = min(q, key=lambda t: q[t][m] - q[t]["oracle"])
        worst = 100 * (q[worst_task][m] - q[worst_task]["oracle"])
        ok = worst >= -2.0
        out.append(f"{m}: worst task {worst_task} {worst:+.1f} points vs oracle: {'met' if ok else 'NOT met'}")
    return out


def report(result: dict) -> None:
    print(table(result["accuracy"]))
    for line in verdicts(result["accuracy"]):
        print(line)
    cost = result.get("serving")
    for label in (c for c in cost or {} if c != "requests"):
        print(f"serving {label}: {cost[label]['req_s']:.2f} req/s, {cost[label]['x_by_name']:.2f}x by name")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", default="lora-1%", help="decoder_quality row whose adapters are the experts")
    ap.add_argument("--quality-out", type=Path, default=Path("runs/decoder_quality"))
    ap.add_argument(
        "--top-k", default="1,2,3", help="comma list: one mixture per top_k (3, every expert: the dense gate)"
    )
    ap.add_argument("--train-rows", type=int, default=800, help="training conversations per task in the mix")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=None, help="first N held-out rows per task")
    ap.add_argument("--serve-rows", type=int, default=96, help="requests per pass of the serving stream")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-serve", action="store_true")
    ap.add_argument(
        "--reuse", action="store_true", help="use the routers an earlier run trained into --out (same settings)"
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--table-only", action="store_true", help="print the report of --out's results.json")
    ap.add_argument("--out", type=Path, default=Path("runs/mixture_quality"))
    args = ap.parse_args(argv)
    if args.table_only:
        report(json.loads((args.out / "results.json").read_text()))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    experts = {t: expert_folder(args.quality_out, t, args.experts) for t in TASKS}
    train, evals, lengths = {}, {}, {}
    for t in TASKS:
        train[t], evals[t], lengths[t] = task_rows(t, args.eval_limit)
    mix = args.out / "mix_train.jsonl"
    n_mix = write_mix(mix, train, args.train_rows, args.seed)
    mixtures, train_s = {}, {}
    for k in (int(x) for x in args.top_k.split(",")):
        done = trained_router(args.out, k) if args.reuse else None
        if done is not None:
            mixtures[k], train_s[k] = done, None
            print(f"top-{k}: reusing the router trained in {done}", flush=True)
            continue
        mixtures[k], train_s[k] = train_router(args.out / f"top{k}", experts, mix, k, max(lengths.values()), args)
    reused = {k for k, s in train_s.items() if s is None}
    known = known_cells(args.out / "results.json", evals, reused, args.experts) if args.reuse else {}
    q = quality(mixtures, experts, evals, lengths, known)
    cost = None if args.no_serve else serving_cost(mixtures, experts, evals, args)
    result = {
        "experts": args.experts,
        "mix_rows": n_mix,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "eval_rows": {t: len(evals[t]) for t in TASKS},
        "train_s": train_s,
        "accuracy": q,
        "serving": cost,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
