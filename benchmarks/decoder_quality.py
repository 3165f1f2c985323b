"""Decoder quality: adapters on SmolLM2-135M-Instruct against the prompted base model, PEFT and full FT.

One command trains and evaluates every row on each task's held-out test set (issue 16's table):

    python benchmarks/decoder_quality.py                       # the default rows, seed 0
    python benchmarks/decoder_quality.py --tasks sst2 --rows parallel-1%,full-ft --seeds 0,1,2

Tasks are the chat configs in ``examples/`` (data, prompt template, answer words, steps, lr):
``sst2`` (``train_chat_sst2.yaml``), ``agnews`` (``train_chat_agnews.yaml``) and ``sms``
(``train_chat_sms.yaml``). Every row of a task reads the same training rows in the same seeded
order, with the same batch size, steps, warmup and cosine schedule; only what is trained differs:

* ``base-zero``, ``base-few``: no training; the task's prompt alone, or after one worked example
  per answer word (seeded, from the training rows) as earlier chat turns.
* ``<kind>-1%``, ``<kind>-0.1%`` (parallel, lora, series): a paradapt adapter trained by
  ``paradapt.train.train(config)`` with the kind and its size overridden: exactly what
  ``paradapt train examples/train_chat_<task>.yaml --adapters.0.kind ...`` runs. The shipped
  adapters are the rows whose kind and size are the config's own (seed 0).
* ``peft-lora-1%``: the real ``peft`` package's LoRA with the same r, alpha and targets as
  ``lora-1%``, trained by this file's loop (same data order, loss, AdamW, clipping, schedule).
* ``full-ft``: every weight of the decoder, same loop, lr ``--full-lr`` (3e-5).

Accuracy (``strict``) is the share of test rows whose greedy answer is exactly the label word and
the end of turn, computed as ``paradapt train`` computes it (every answer token is the argmax given
the tokens before it). ``choice`` (base rows) is the multiple-choice accuracy lm-eval would report:
the answer word whose first token scores highest, however the model would have phrased it. The base
model's *best prompted* accuracy is the best of its zero- and few-shot rows under either measure.

Results go to ``--out`` (``results.jsonl``, one line per row and seed; a rerun skips the rows
already there, so a long table is built over several runs) and the table is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
TASKS = {
    "sst2": ROOT / "examples/train_chat_sst2.yaml",
    "agnews": ROOT / "examples/train_chat_agnews.yaml",
    "sms": ROOT / "examples/train_chat_sms.yaml",
}
# name -> (kind, config). About 1% / 0.1% of SmolLM2-135M's 134.5M parameters.
ADAPTER_ROWS = {
    "parallel-1%": ("parallel", {"r": 32, "scale": 4.0}),
    "parallel-0.1%": ("parallel", {"r": 4, "scale": 4.0}),
    "lora-1%": ("lora", {"r": 24, "alpha": 48, "targets": ["q_proj", "v_proj"]}),
    "lora-0.1%": ("lora", {"r": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]}),
    "series-1%": ("series", {"r": 32}),
    "series-0.1%": ("series", {"r": 4}),
}
OTHER_ROWS = ("majority", "base-zero", "base-few", "peft-lora-1%", "full-ft")
ALL_ROWS = ("majority", "base-zero", "base-few", *ADAPTER_ROWS, "peft-lora-1%", "full-ft")
DEFAULT_ROWS = ("base-zero", "base-few", "parallel-1%", "lora-1%", "series-1%")
EVAL_BATCH = 16
EVAL_LIMIT: int | None = None  # --eval-limit


# --------------------------------------------------------------------------- data


def load_task(task: str):
    """(config, base_dir, tokenizer's model name) of a task's example config."""
    from paradapt.train.config import load_config

    return load_config(TASKS[task])


def eval_records(cfg, base_dir, limit: int | None = None) -> tuple[list[dict], list[dict]]:
    """(train, eval) chat records of the config's adapter, split as ``paradapt train`` splits them;
    the first ``limit`` eval rows (default ``--eval-limit``; a training run's own eval takes all)."""
    from paradapt.train.data import read_splits

    train_spec, eval_spec = cfg.data_specs(0, base_dir)
    train, evals = read_splits(train_spec, eval_spec, cfg.adapters[0].eval_fraction, cfg.train.seed)
    return train, evals[: EVAL_LIMIT if limit is None else limit]


def with_shots(records: list[dict], train: list[dict], seed: int) -> list[dict]:
    """Each eval record after one worked example per answer word (seeded picks, label order
    shuffled once), as earlier user/assistant turns of the same conversation."""
    rng = random.Random(seed)
    by_answer: dict[str, list[dict]] = {}
    for r in train:
        by_answer.setdefault(r["answer"], []).append(r)
    shots = [rng.choice(rows) for _, rows in sorted(by_answer.items())]
    rng.shuffle(shots)
    turns = [m for s in shots for m in s["messages"][s["train_from"] :]]
    out = []
    for r in records:
        msgs = r["messages"][: r["train_from"]] + turns + r["messages"][r["train_from"] :]
        out.append({**r, "messages": msgs, "train_from": r["train_from"] + len(turns)})
    return out


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, examples: list[dict], pad_id: int, answers: dict[int, str]) -> dict[str, float]:
    """``strict`` and ``choice`` accuracy of ``model`` (adapters as routed by the caller)."""
    from paradapt.train.data.records import IGNORE_INDEX
    from paradapt.train.data.tokens import collate
    from paradapt.train.lm_loss import pick

    model.eval()
    firsts = torch.tensor(sorted(answers))
    strict = choice = 0
    for s in range(0, len(examples), EVAL_BATCH):
        batch = collate(examples[s : s + EVAL_BATCH], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        right = pick(logits, labels).rows_right()
        strict += int(right.sum())
        first = (labels != IGNORE_INDEX).int().argmax(1)  # the answer's first token
        rows = torch.arange(len(labels))
        scores = logits[rows, first - 1][:, firsts]
        choice += int((firsts[scores.argmax(1)] == labels[rows, first]).sum())
    return {"strict": strict / len(examples), "choice": choice / len(examples)}


def answer_tokens(examples: list[dict], records: list[dict]) -> dict[int, str]:
    """First answer token -> answer word, from the eval rows themselves (must be distinct)."""
    from paradapt.train.data.records import IGNORE_INDEX

    out: dict[int, str] = {}
    for ex, r in zip(examples, records, strict=True):
        first = next(y for y in ex["labels"] if y != IGNORE_INDEX)
        if out.setdefault(first, r["answer"]) != r["answer"]:
            sys.exit(f"answer words {out[first]!r} and {r['answer']!r} start with the same token")
    return out


# --------------------------------------------------------------------------- rows


def run_majority(task: str) -> dict:
    """No model: always the test set's most common answer (what a classifier must beat; SMS is 87% ham)."""
    from collections import Counter

    cfg, base_dir = load_task(task)
    _, evals = eval_records(cfg, base_dir)
    word, n = Counter(r["answer"] for r in evals).most_common(1)[0]
    return {"eval_rows": len(evals), "strict": n / len(evals), "choice": n / len(evals), "answer": word}


def run_base(task: str, row: str, seed: int) -> dict:
    """The base model prompted zero- or few-shot."""
    from paradapt.loading import load_model
    from paradapt.train.data.chat import render_chats
    from paradapt.train.data.tokens import pad_id_of

    cfg, base_dir = load_task(task)
    tok, model = load_model(cfg.model)
    train, evals = eval_records(cfg, base_dir)
    answers = answer_tokens(render_chats(evals, tok, cfg.tokenize.max_length), evals)
    if row == "base-few":
        evals = with_shots(evals, train, seed)
    examples = render_chats(evals, tok, 8192)
    return {"eval_rows": len(examples), **evaluate(model, examples, pad_id_of(tok), answers)}


def run_adapter(task: str, row: str, seed: int, out: Path, steps: int | None) -> dict:
    """A paradapt adapter through ``paradapt.train.train`` (the CLI's path)."""
    import paradapt as pa
    from paradapt.loading import load_model
    from paradapt.train import train
    from paradapt.train.config import read_yaml

    kind, options = ADAPTER_ROWS[row]
    cfg, base_dir = load_task(task)
    raw = read_yaml(TASKS[task])  # the entry's kind and options replaced whole (overrides would merge)
    raw["adapters"][0] = {**raw["adapters"][0], "kind": kind, "config": dict(options)}
    raw["output_dir"] = str(out)
    raw["train"] = {**raw["train"], "seed": seed, "save_every": 0}
    if steps is not None:
        raw["train"]["max_steps"] = steps
    t0 = time.perf_counter()
    result = train(raw, overwrite=True, progress=False)
    seconds = time.perf_counter() - t0
    name = cfg.adapters[0].name
    tok, model = load_model(cfg.model)
    n_base = sum(p.numel() for p in model.parameters())
    pa.load_adapter(model, result.adapters[name], name=name)
    params = sum(p.numel() for p in model.paradapt[name].parameters())
    return {  # the trainer's own final eval: the accuracy `paradapt train` reports
        "eval_rows": len(eval_records(cfg, base_dir, limit=sys.maxsize)[1]),  # what the trainer evaluated
        "strict": result.metrics[name]["accuracy"],
        "choice": None,
        "params": params,
        "share": params / n_base,
        "steps": result.steps,
        "train_s": seconds,
        "adapter": str(result.adapters[name]),
        "kind": kind,
        "config": options,
    }


def run_reference(task: str, row: str, seed: int, steps: int | None, full_lr: float) -> dict:
    """PEFT's LoRA or full fine-tuning, in a loop that mirrors paradapt's trainer for one task."""
    from paradapt.loading import load_model
    from paradapt.train.data.chat import render_chats
    from paradapt.train.data.tokens import pad_id_of
    from paradapt.train.run import build_tasks

    cfg, base_dir = load_task(task)
    cfg.train.seed = seed
    if steps is not None:
        cfg.train.max_steps = steps
    tok, model = load_model(cfg.model)
    n_base = sum(p.numel() for p in model.parameters())
    tasks, _ = build_tasks(cfg, tok, base_dir)
    torch.manual_seed(seed)
    lr = cfg.train.lr
    if row == "peft-lora-1%":
        import peft

        _, lora = ADAPTER_ROWS["lora-1%"]
        pcfg = peft.LoraConfig(
            r=lora["r"], lora_alpha=lora["alpha"], target_modules=lora["targets"], lora_dropout=0.0
        )
        model = peft.get_peft_model(model, pcfg)
    else:
        lr = full_lr
    params = [p for p in model.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    reference_loop(model, params, tasks[0].train, cfg.train, lr)
    seconds = time.perf_counter() - t0
    _, evals = eval_records(cfg, base_dir)
    examples = render_chats(evals, tok, cfg.tokenize.max_length)
    acc = evaluate(model, examples, pad_id_of(tok), answer_tokens(examples, evals))
    n = sum(p.numel() for p in params)
    return {
        "eval_rows": len(examples),
        **acc,
        "params": n,
        "share": n / n_base,
        "steps": cfg.train.max_steps,
        "train_s": seconds,
        "lr": lr,
    }


def reference_loop(model, params, data, args, lr: float) -> None:
    """paradapt's trainer for one task, without paradapt: seeded epoch order, the batch's rows in
    length buckets, loss = summed answer-token CE / the batch's answer tokens, clipping, AdamW,
    linear warmup then cosine decay."""
    from paradapt.train.data.records import IGNORE_INDEX
    from paradapt.train.data.sampling import length_buckets, seeded_order
    from paradapt.train.loop import AUTO_FORWARD_COST_TOKENS, lr_factor

    model.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, args.warmup_steps, args.max_steps, args.schedule)
    )
    collate = data.collate_fn()
    epoch, order, pos = 0, seeded_order(len(data), args.seed, 0), 0
    for _ in range(args.max_steps):
        rows = []
        for _ in range(args.batch_size):
            if pos >= len(order):
                epoch, pos = epoch + 1, 0
                order = seeded_order(len(data), args.seed, epoch)
            rows.append(data[order[pos]])
            pos += 1
        total = sum(sum(1 for y in r["labels"][1:] if y != IGNORE_INDEX) for r in rows)
        lengths = [len(r["input_ids"]) for r in rows]
        for group in length_buckets(lengths, len(rows), None, AUTO_FORWARD_COST_TOKENS):
            batch = collate([rows[i] for i in group])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            target = batch["labels"][:, 1:]
            loss = F.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), target, reduction="sum", ignore_index=IGNORE_INDEX
            )
            (loss / total).backward()
        if args.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- table


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(results: list[dict], tasks: list[str]) -> str:
    """Markdown: one line per row, a column per task (mean +- std over seeds, strict accuracy)."""
    rows = [r for r in ALL_ROWS if any(x["row"] == r for x in results)]
    head = "| row | share of base params | " + " | ".join(tasks) + " |"
    lines = [head, "|---|--:|" + "--:|" * len(tasks)]
    for row in rows:
        shares = {f"{x['share'] * 100:.3g}%" for x in results if x["row"] == row and "share" in x}
        cells = []
        for task in tasks:
            got = [x for x in results if x["row"] == row and x["task"] == task]
            cells.append(_cell(got, base=row.startswith("base")))
        lines.append(f"| {row} | {', '.join(sorted(shares)) or '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(got: list[dict], base: bool) -> str:
    if not got:
        return "-"
    strict = [100 * x["strict"] for x in got]
    text = f"{statistics.mean(strict):.1f}"
    if len(strict) > 1:
        text += f" ± {statistics.stdev(strict):.1f} (n={len(strict)})"
    if base and got[0]["row"] != "majority":
        text += f" (choice {statistics.mean(100 * x['choice'] for x in got):.1f})"
    return text


def targets(results: list[dict], tasks: list[str]) -> list[str]:
    """Issue 16's two targets, checked on what has been run."""
    notes = []
    for task in tasks:
        base = [
            max(x["strict"], x["choice"])
            for x in results
            if x["task"] == task and x["row"].startswith("base")
        ]
        if not base:
            continue
        best = max(base)
        for row in ADAPTER_ROWS:
            got = [x["strict"] for x in results if x["task"] == task and x["row"] == row]
            if got:
                gap = 100 * (statistics.mean(got) - best)
                ok = "meets" if gap >= 10 else "misses"
                notes.append(
                    f"{task} {row}: {gap:+.1f} points over the base's best prompted {100 * best:.1f} ({ok} +10)"
                )
    par = [x["strict"] for x in results if x["task"] == "sst2" and x["row"] == "parallel-1%"]
    full = [x["strict"] for x in results if x["task"] == "sst2" and x["row"] == "full-ft"]
    if par and full:
        gap = 100 * (statistics.mean(par) - statistics.mean(full))
        notes.append(
            f"sst2 parallel-1% - full-ft: {gap:+.1f} points ({'within' if gap >= -1 else 'not within'} 1)"
        )
    return notes


# --------------------------------------------------------------------------- shipping

SHIP_ROOT = ROOT / "src/paradapt/adapters/smollm2-135m-instruct"
FLOOR_MARGIN = 0.08  # the showcase scores its first rows only: the floor leaves room for that sample


def ship(results: list[dict], tasks: list[str]) -> None:
    """Each task's config-default row (seed 0) into the package, with ``card.json`` and ``README.md``.

    The adapter is loaded and saved again under its shipped name (``chat-<task>-<kind>``), so the
    folder is written atomically with fresh hashes; the card keeps the config's adapter entry and
    seed, from which :func:`paradapt.bundled.held_out_records` reads the same held-out rows again.
    """
    import paradapt as pa
    from paradapt.files import write_text_atomic
    from paradapt.loading import load_model
    from paradapt.train.config import read_yaml

    for task in tasks:
        raw = read_yaml(TASKS[task])
        entry = raw["adapters"][0]
        row = next(r for r, (k, o) in ADAPTER_ROWS.items() if k == entry["kind"] and o == entry["config"])
        got = [x for x in results if x["task"] == task and x["row"] == row and x["seed"] == 0]
        if not got:
            sys.exit(f"--ship: {task} {row} seed 0 has not been run")
        res, name = got[-1], f"chat-{task}-{entry['kind']}"
        bases = {x["row"]: x for x in results if x["task"] == task and x["row"].startswith("base")}
        tok, model = load_model(raw["model"])
        pa.load_adapter(model, res["adapter"], name=name)
        dest = SHIP_ROOT / name
        shutil.rmtree(dest, ignore_errors=True)  # the card and README too: a fresh folder
        pa.save_adapter(model, name, dest)
        c = card_of(task, raw, res, bases)
        cfg, base_dir = load_task(task)
        _, evals = eval_records(cfg, base_dir)
        c["check_answers"] = greedy_answers(model, tok, name, evals[:CHECK_ROWS])
        write_text_atomic(dest / "card.json", json.dumps(c, indent=1) + "\n")
        write_text_atomic(dest / "README.md", readme_of(name, c))
        print(f"shipped {dest.relative_to(ROOT)}: accuracy {c['accuracy']:.4f}, floor {c['floor']:.2f}")


CHECK_ROWS = 16  # the first test rows whose greedy answers the card keeps (tests/core/test_bundled_chat.py)


@torch.no_grad()
def greedy_answers(model, tok, name: str, records: list[dict], new_tokens: int = 6) -> list[str]:
    """The adapter's greedy answer to each record's user turn (plain ``generate``, one row at a time)."""
    import paradapt as pa

    model.eval()
    out = []
    for r in records:
        ids = tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
        with pa.route(model, name):
            gen = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        out.append(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    return out


def card_of(task: str, raw: dict, res: dict, bases: dict[str, dict]) -> dict:
    entry, train = raw["adapters"][0], raw["train"]
    labels = entry["data"]["labels"]
    floor = math.floor((res["strict"] - FLOOR_MARGIN) * 100) / 100
    return {
        "model": raw["model"],
        "task": {"sst2": "SST-2", "agnews": "AG News", "sms": "SMS spam"}[task],
        "kind": entry["kind"],
        "config": entry["config"],
        "labels": list(dict.fromkeys(labels.values())),
        "prompt_template": entry["data"]["prompt_template"],
        "adapter": entry,
        "seed": train["seed"],
        "steps": res["steps"],
        "batch_size": train["batch_size"],
        "lr": train["lr"],
        "params": res["params"],
        "share_of_base": res["share"],
        "accuracy": res["strict"],
        "eval_rows": res["eval_rows"],
        "floor": floor,
        "base_zero_shot": _base(bases.get("base-zero")),
        "base_few_shot": _base(bases.get("base-few")),
        "command": f"paradapt train examples/{TASKS[task].name}",
        "benchmark": f"python benchmarks/decoder_quality.py --tasks {task} --ship",
    }


def _base(res: dict | None) -> dict | None:
    return None if res is None else {"strict": res["strict"], "choice": res["choice"]}


def readme_of(name: str, c: dict) -> str:
    base = c["base_zero_shot"]
    base_text = (
        "not measured" if base is None else f"{base['strict']:.4f} (multiple choice {base['choice']:.4f})"
    )
    return f"""# {name}

A {c["kind"]} adapter for SmolLM2-135M-Instruct ({c["share_of_base"] * 100:.2f}% of its parameters) that
answers {c["task"]} with one of {", ".join(c["labels"])} through the model's chat template.

- user message: `{c["prompt_template"]!r}` (`{{text}}` is the input)
- trained by `{c["command"]}` ({c["steps"]} steps of {c["batch_size"]}, lr {c["lr"]}, seed {c["seed"]})
- test accuracy (greedy answer exactly the label word): **{c["accuracy"]:.4f}** on {c["eval_rows"]} held-out rows
- the base model zero-shot, same prompt: {base_text}
- `paradapt showcase` fails below {c["floor"]:.2f}

Serve it with `paradapt serve` (SmolLM2 and its shipped adapters) and ask `/v1/chat/completions` with
`"model": "{name}"`. The table in `benchmarks/RESULTS.md` (`benchmarks/decoder_quality.py`) compares it
with the other adapter kinds, PEFT's LoRA and full fine-tuning.
"""


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="sst2,agnews,sms")
    ap.add_argument(
        "--rows", default=",".join(DEFAULT_ROWS), help=f"comma list of {', '.join(ALL_ROWS)}, or 'all'".replace("%", "%%")
    )
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=None, help="override every config's max_steps (quick runs)")
    ap.add_argument("--full-lr", type=float, default=3e-5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/decoder_quality"))
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument(
        "--ship", action="store_true", help="copy each task's config-default adapter into the package"
    )
    ap.add_argument("--eval-limit", type=int, default=None, help="first N test rows only (smoke runs)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    global EVAL_LIMIT
    EVAL_LIMIT = args.eval_limit
    tasks = args.tasks.split(",")
    rows = list(ALL_ROWS) if args.rows == "all" else args.rows.split(",")
    for r in rows:
        if r not in ALL_ROWS:
            ap.error(f"unknown row {r!r}; rows: {', '.join(ALL_ROWS)}")
    for t in tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t!r}; tasks: {', '.join(TASKS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.jsonl"
    done = {(x["task"], x["row"], x["seed"]) for x in read_results(path)}
    for task in [] if args.table_only else tasks:
        for row in rows:
            for seed in seeds if row in ("base-few", *ADAPTER_ROWS, "peft-lora-1%", "full-ft") else [0]:
                if (task, row, seed) in done:
                    continue
                t0 = time.perf_counter()
                if row == "majority":
                    res = run_majority(task)
                elif row.startswith("base"):
                    res = run_base(task, row, seed)
                elif row in ADAPTER_ROWS:
                    res = run_adapter(task, row, seed, args.out / task / f"{row}-s{seed}", args.steps)
                else:
                    res = run_reference(task, row, seed, args.steps, args.full_lr)
                res = {"task": task, "row": row, "seed": seed, **res, "seconds": time.perf_counter() - t0}
                with path.open("a") as f:
                    f.write(json.dumps(res) + "\n")
                print(
                    f"{task} {row} seed {seed}: strict {res['strict']:.4f} choice {res['choice']} "
                    f"({res['seconds']:.0f} s)",
                    flush=True,
                )
    results = [x for x in read_results(path) if x["task"] in tasks]
    print(table(results, tasks))
    for note in targets(results, tasks):
        print(note)
    if args.ship:
        ship(results, tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
