"""Peak memory and step time of the parallel adapter with gradient checkpointing vs full fine-tuning.

Issue 4's memory target is peak RSS <= 0.5x full fine-tuning. In ``train_quality.py`` the
parallel adapter at 0.5% of the parameters peaks at 0.72x: the frozen encoder's activations
(~600 MiB at 32 x 64 tokens) are kept for the backward in every method. Gradient checkpointing
keeps only each layer's input and recomputes the layer in the backward pass; micro-batches
(``+mbN``: the batch's rows in N forward/backward passes, as the Trainer's ``micro_batch_tokens``
does) keep only one micro-batch's activations at a time, without recomputing anything.
``trainer`` / ``trainer+tok512``: the same adapter trained by ``paradapt.train.Trainer`` itself
(one forward, or ``micro_batch_tokens: 512``) on random rows of the same shape.
``parallel-top-s`` / ``trainer-top``: the parallel adapter at the same 0.5% budget on the top 3
of MiniLM's 6 layers only (``layers: [3, 4, 5]``, r=49; AdapterDrop): the backward stops at
layer 3, so layers 0-2 neither run backward nor keep activations. ``+heap``: glibc's mmap and trim
thresholds raised first (``paradapt.serve.malloc.keep_freed_memory``, as ``paradapt serve`` does).
``trainer-top5m``: the Trainer with the parallel adapter at ~1% on the top 5 layers (r=57).

Same measurement as ``train_quality.py`` (its ``build``, ``optimizer``, ``train_step`` and RSS
helpers): each setup runs in a FRESH subprocess on one fixed SST-2-shaped batch (``--batch`` x
``--max-length`` random tokens), 1 warm-up + ``--time-steps`` timed steps; "peak RSS in steps"
is VmHWM after resetting it once the model, method and optimizer are set up; setups are
interleaved round-robin over ``--rounds`` rounds and the medians are reported.

    python benchmarks/train_memory.py                # every setup in SETUPS
    python benchmarks/train_memory.py --rounds 1 --time-steps 1   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_quality as tq  # noqa: E402

SETUPS = [
    "full",
    "full+ckpt",
    "parallel-s",
    "parallel-s+ckpt",
    "parallel-s+mb2",
    "parallel-s+mb4",
    "trainer",
    "trainer+tok512",
    "parallel-top-s",
    "trainer-top",
    "trainer-top+tok1024",
    "full+heap",
    "trainer+heap",
    "trainer-top5m",
    "trainer-top5m+tok1024",
    "trainer-top5m+tok512",
]


def trainer_setup(rank: int, batch: int, length: int, flags: list[str], layers: list[int] | None = None):
    """``parallel-s`` trained by ``paradapt.train.Trainer`` itself (``+tokN``: ``micro_batch_tokens``
    N, ``+ckpt``: gradient checkpointing) on ``4 x batch`` random rows of ``length`` tokens."""
    import paradapt as pa
    from paradapt.train.data import TokenizedDataset
    from paradapt.train.loop import Task, TrainArgs, Trainer

    model = tq.load_base()
    head = {"labels": tq.LABELS["sst2"], "pooling": "mean", "dropout": 0.1}
    pa.add_adapter(model, "a", pa.ParallelConfig(r=rank, scale=4.0, head=head, layers=layers))
    g = torch.Generator().manual_seed(0)
    rows = [
        {
            "input_ids": torch.randint(1000, 20000, (length,), generator=g).tolist(),
            "attention_mask": [1] * length,
            "labels": i % 2,
        }
        for i in range(4 * batch)
    ]
    cap = next((int(f[3:]) for f in flags if f.startswith("tok")), None)
    args = TrainArgs(
        max_steps=1000,
        batch_size=batch,
        micro_batch_tokens=cap,
        gradient_checkpointing="ckpt" in flags,
        weight_decay=0.01,
    )
    data = TokenizedDataset(rows, "classification", pad_id=0)
    return Trainer(model, [Task("a", data)], args)


def micro_step(s: tq.Setup, opt, sched, batch: dict, y: torch.Tensor, parts: int) -> None:
    """``train_quality.train_step`` in ``parts`` micro-batches of rows, each backpropagated at once:
    what the Trainer's ``micro_batch_tokens`` does (the summed gradient is the full batch's)."""
    s.encoder.train()
    s.head.train()
    n = y.shape[0]
    for rows in torch.arange(n).chunk(parts):
        sub = {k: v[rows] for k, v in batch.items()}
        (F.cross_entropy(s.logits(sub), y[rows], reduction="sum") / n).backward()
    torch.nn.utils.clip_grad_norm_(s.body_params + list(s.head.parameters()), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def worker(setup: str, ranks: dict, batch: int, length: int, steps: int, threads: int) -> dict:
    """In a fresh process: build the setup, time 1 warm-up + ``steps`` steps, read peak RSS."""
    torch.set_num_threads(threads)
    method, *flags = setup.split("+")
    parts = int(flags[-1][2:]) if flags and flags[-1].startswith("mb") else 1
    if "heap" in flags:
        from paradapt.serve.malloc import keep_freed_memory

        keep_freed_memory()
    if method == "trainer":
        return measure_trainer(setup, trainer_setup(ranks["parallel-s"], batch, length, flags), steps)
    if method in ("trainer-top", "trainer-top5m"):
        n, rank = (5, ranks["parallel-top5-m"]) if method == "trainer-top5m" else (3, ranks["parallel-top-s"])
        tr = trainer_setup(rank, batch, length, flags, layers=tq.top_layers(n))
        return measure_trainer(setup, tr, steps)
    s = tq.build(method, tq.LABELS["sst2"], 0, ranks)
    if "ckpt" in flags:
        s.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt, sched = tq.optimizer(s, 1000)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    b = {"input_ids": torch.randint(1000, 20000, (batch, length), generator=g)}
    b["attention_mask"] = torch.ones_like(b["input_ids"])
    y = torch.randint(0, 2, (batch,), generator=g)
    loaded = tq.status_kb("VmRSS")
    tq.reset_peak_rss()
    wall, cpu = [], []
    for i in range(steps + 1):
        t, c = time.perf_counter(), time.process_time()
        if parts > 1:
            micro_step(s, opt, sched, b, y, parts)
        else:
            tq.train_step(s, opt, sched, b, y)
        if i:
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return {
        "setup": setup,
        "trainable": s.body_count,
        "wall": wall,
        "cpu": cpu,
        "loaded_kb": loaded,
        "steps_peak_kb": tq.status_kb("VmHWM"),
    }


def measure_trainer(setup: str, tr, steps: int) -> dict:
    """The worker's timing and RSS readings for a ``Trainer`` (its ``train_step``)."""
    loaded = tq.status_kb("VmRSS")
    tq.reset_peak_rss()
    wall, cpu = [], []
    for i in range(steps + 1):
        t, c = time.perf_counter(), time.process_time()
        tr.train_step()
        if i:
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    trainable = sum(p.numel() for n, p in tr.model.paradapt["a"].named_parameters() if "head" not in n)
    return {
        "setup": setup,
        "trainable": trainable,
        "wall": wall,
        "cpu": cpu,
        "loaded_kb": loaded,
        "steps_peak_kb": tq.status_kb("VmHWM"),
    }


def measure(a: argparse.Namespace) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {s: [] for s in a.setups}
    for rnd in range(a.rounds):
        for setup in a.setups if rnd % 2 == 0 else a.setups[::-1]:
            cmd = [
                sys.executable,
                __file__,
                "--_worker",
                setup,
                "--rank",
                str(a.rank),
                "--top-rank",
                str(a.top_rank),
                "--top5m-rank",
                str(a.top5m_rank),
                "--batch",
                str(a.batch),
            ]
            cmd += ["--max-length", str(a.max_length), "--time-steps", str(a.time_steps)]
            cmd += ["--threads", str(a.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise SystemExit(f"worker {setup} failed:\n{r.stderr[-3000:]}")
            w = json.loads(r.stdout.strip().splitlines()[-1])
            runs[setup].append(w)
            print(
                f"  round {rnd + 1} {setup:16s} step CPU {statistics.median(w['cpu']):.2f}s "
                f"wall {statistics.median(w['wall']):.2f}s peak RSS in steps {w['steps_peak_kb'] / 1024:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
    med = statistics.median
    return {
        s: {
            "trainable": ws[0]["trainable"],
            "step_cpu_s": med([t for w in ws for t in w["cpu"]]),
            "step_wall_s": med([t for w in ws for t in w["wall"]]),
            "loaded_mib": med([w["loaded_kb"] for w in ws]) / 1024,
            "steps_peak_mib": med([w["steps_peak_kb"] for w in ws]) / 1024,
        }
        for s, ws in runs.items()
    }


def report(res: dict[str, dict]) -> None:
    full = res.get("full")
    print(
        "| setup | trainable | step CPU | x full | step wall | x full | RSS loaded | peak RSS in steps "
        "| x full | overhead above loaded | x full |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s, r in res.items():
        over = r["steps_peak_mib"] - r["loaded_mib"]
        if full is not None:
            f_over = full["steps_peak_mib"] - full["loaded_mib"]
            ratios = (
                r["step_cpu_s"] / full["step_cpu_s"],
                r["step_wall_s"] / full["step_wall_s"],
                r["steps_peak_mib"] / full["steps_peak_mib"],
                over / f_over,
            )
        else:
            ratios = (float("nan"),) * 4
        print(
            f"| {s} | {r['trainable']:,} | {r['step_cpu_s']:.3f}s | {ratios[0]:.2f} | {r['step_wall_s']:.3f}s "
            f"| {ratios[1]:.2f} | {r['loaded_mib']:.0f} MiB | {r['steps_peak_mib']:.0f} MiB | {ratios[2]:.2f} "
            f"| {over:.0f} MiB | {ratios[3]:.2f} |"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setups", nargs="+", default=SETUPS, choices=SETUPS)
    p.add_argument(
        "--rank",
        type=int,
        default=24,
        help="parallel-s rank (train_quality.py's solve_rank for 0.5%% of the base)",
    )
    p.add_argument("--top-rank", type=int, default=49, help="parallel-top-s rank (0.5%% on the top 3 layers)")
    p.add_argument(
        "--top5m-rank", type=int, default=57, help="trainer-top5m rank (0.98%% on the top 5 layers)"
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--time-steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--_worker", dest="worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        ranks = {"parallel-s": a.rank, "parallel-top-s": a.top_rank, "parallel-top5-m": a.top5m_rank}
        print(json.dumps(worker(a.worker, ranks, a.batch, a.max_length, a.time_steps, a.threads)))
        return
    print(f"load average at start {os.getloadavg()[0]:.2f}", file=sys.stderr)
    res = measure(a)
    report(res)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
