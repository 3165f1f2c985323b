"""``paradapt showcase``: train (or reuse) -> serve -> evaluate, end to end on real data.

The default is the decoder showcase (:mod:`.showcase_chat`: SmolLM2 and its three shipped chat
adapters over ``/v1/chat/completions``). ``--model all-minilm-l6-v2`` runs the encoder one, here:
it starts the real ``paradapt serve`` as a subprocess on a free loopback port with the bundled
MiniLM and the SST-2 / AG News parallel adapters, sends one mixed, interleaved, concurrent stream
of ``/classify`` requests for both adapters over their test sets, then the same texts in the same
order to the base model (``/v1/embeddings``: the same encoder forward, no adapter), and prints each
adapter's test accuracy next to its throughput ratio to the base model measured in this run.
Exit 0 when every accuracy clears its floor, 1 when one does not, 2 on an error (one line).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ParadaptError
from ..loading import find_assets
from ..serve.process import ServerProcess, ServerStartError
from .common import QUANTIZE_CHOICES, one_line_warning, positive_int, usable_cores

BASE_NAME = "all-minilm-l6-v2"  # the encoder showcase's base model, served under its name
MODELS = ("smollm2-135m-instruct", BASE_NAME)
START_TIMEOUT_S = 180.0
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"  # the repository's examples/ folder


class ShowcaseError(ParadaptError):
    """A showcase problem (missing data, server failed, bad option); one line, exit 2."""


def _httpx():
    """httpx, the client (in the ``test`` extra), or a one-line error saying how to get it."""
    try:
        import httpx
    except ImportError:
        raise ShowcaseError("showcase needs httpx: pip install 'paradapt[showcase]'") from None
    return httpx


@dataclass
class Task:
    """One adapter's test set: texts, the accepted label spellings per row, an accuracy floor."""

    title: str
    adapter: str
    floor: float
    texts: list[str]
    gold: list[frozenset[str]]
    correct: int = 0
    spans: dict[str, list[float]] = field(default_factory=dict)  # phase -> [first send, last reply]


# -- data ----------------------------------------------------------------------------------------

SST2_NAMES = {"0": "negative", "1": "positive"}  # the bundled head says names; a retrained one, 0/1


def _read_tsv(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise ShowcaseError(f"test set {path} not found (is the shared assets folder there?)")
    with open(path, encoding="utf-8", newline="") as f:
        return [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if len(r) >= 2]


def sst2_task(assets: Path, limit: int | None, adapter: str) -> Task:
    """The SST-2 test split (872 rows, header ``sentence\\tlabel``, labels 0/1), in file order."""
    rows = _read_tsv(assets / "data" / "sst2" / "test.tsv")[1:][:limit]
    gold = [frozenset({r[1].strip(), SST2_NAMES.get(r[1].strip(), "?")}) for r in rows]
    return Task("SST-2", adapter, 0.75, [r[0].strip() for r in rows], gold)


def agnews_task(assets: Path, limit: int, seed: int, adapter: str) -> Task:
    """A seeded random subset of the AG News test split (7,600 rows, no header, label names)."""
    rows = _read_tsv(assets / "data" / "agnews" / "test.tsv")
    rows = random.Random(seed).sample(rows, min(limit, len(rows)))
    gold = [frozenset({r[1].strip()}) for r in rows]
    return Task("AG News", adapter, 0.80, [r[0].strip() for r in rows], gold)


def interleave(tasks: list[Task], batch: int) -> list[tuple[Task, int, int]]:
    """Requests ``(task, start, stop)`` of ``batch`` rows, merged so every task is spread evenly
    over the whole stream (a mixed stream, not one task after the other)."""
    reqs = []
    for t in tasks:
        n_req = -(-len(t.texts) // batch)
        reqs += [
            ((k + 0.5) / n_req, t.title, t, k * batch, min(len(t.texts), (k + 1) * batch))
            for k in range(n_req)
        ]
    reqs.sort(key=lambda r: (r[0], r[1]))
    return [(t, a, b) for _, _, t, a, b in reqs]


# -- the server ----------------------------------------------------------------------------------


def start_server(args: list[str], threads: int | None) -> ServerProcess:
    """``paradapt serve ARGS`` on a free loopback port, healthy, or a ShowcaseError."""
    server = ServerProcess(args + (["--threads", str(threads)] if threads else []))
    try:
        server.wait_healthy(START_TIMEOUT_S)
    except ServerStartError as e:
        server.stop()
        raise ShowcaseError(str(e)) from None
    return server


# -- the stream ----------------------------------------------------------------------------------


async def _send(client, sem, url: str, phase: str, req: tuple[Task, int, int], base: bool) -> None:
    task, a, b = req
    body = {"model": BASE_NAME if base else task.adapter, "input": task.texts[a:b]}
    async with sem:
        span = task.spans.setdefault(phase, [time.perf_counter(), 0.0])
        span[0] = min(span[0], time.perf_counter())
        r = await client.post(f"{url}/v1/embeddings" if base else f"{url}/classify", json=body)
        if r.status_code != 200:
            raise ShowcaseError(
                f"{phase}: {task.adapter if not base else BASE_NAME} answered {r.status_code}: {r.text[:200]}"
            )
        span[1] = max(span[1], time.perf_counter())
    if not base and phase == "mixed":
        task.correct += sum(
            d["label"] is not None and str(d["label"]) in task.gold[a + d["index"]] for d in r.json()["data"]
        )


async def _stream(url: str, phase: str, reqs: list, base: bool, concurrency: int) -> float:
    """Send ``reqs`` with at most ``concurrency`` in flight; the wall time in seconds."""
    httpx = _httpx()
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600.0, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(_send(client, sem, url, phase, r, base) for r in reqs))
        return time.perf_counter() - t0


# -- training ------------------------------------------------------------------------------------


def retrain(out_dir: Path, sst2_name: str, agnews_name: str) -> Path:
    """Train both adapters with the examples/ configs; an adapter root holding them under
    the names the showcase serves."""
    from ..train import run as train_run

    root = out_dir / "adapters"
    for config, name in (("train_sst2.yaml", sst2_name), ("train_agnews.yaml", agnews_name)):
        path = EXAMPLES / config
        if not path.is_file():
            raise ShowcaseError(f"--train needs {path} (run from a repository checkout)")
        print(f"training {name} with {path.name} ...", flush=True)
        with warnings.catch_warnings():  # e.g. the truncation count: one line, not a source excerpt
            warnings.showwarning = one_line_warning
            result = train_run.train(path, overwrite=True, progress=False, output_dir=str(out_dir / name))
        (trained,) = result.adapters.values()
        metrics = ", ".join(f"{k} {v:.4f}" for m in result.metrics.values() for k, v in m.items())
        print(f"  {result.steps} steps; {metrics}", flush=True)
        shutil.rmtree(root / name, ignore_errors=True)
        shutil.copytree(trained, root / name)
    return root


# -- the command ---------------------------------------------------------------------------------


@dataclass
class Options:
    limit: int | None  # SST-2 rows (None: all 872)
    agnews: int  # AG News rows (a seeded subset)
    batch: int
    concurrency: int
    seed: int
    train: bool
    train_dir: Path
    threads: int | None


def check_options(o: Options) -> None:
    for name, value in (
        ("--limit", o.limit),
        ("--agnews-rows", o.agnews),
        ("--batch", o.batch),
        ("--concurrency", o.concurrency),
    ):
        if value is not None and value < 1:
            raise ShowcaseError(f"{name}: must be at least 1, got {value}")


def run(o: Options, assets: Path | None) -> int:
    """The whole showcase; returns the exit status (0 ok, 1 an accuracy under its floor)."""
    check_options(o)
    if assets is None:
        raise ShowcaseError("no shared assets folder (set PARADAPT_ASSETS) for the SST-2 / AG News test sets")
    t_start = time.perf_counter()
    names = ("sst2-parallel", "agnews-parallel")
    tasks = [sst2_task(assets, o.limit, names[0]), agnews_task(assets, o.agnews, o.seed, names[1])]
    root = retrain(o.train_dir, *names) if o.train else None
    reqs = interleave(tasks, o.batch)
    print(
        f"paradapt showcase: {BASE_NAME} + {', '.join(names)} "
        f"({'retrained in ' + str(root) if root else 'bundled'}) behind `paradapt serve`"
    )
    print(
        f"stream: {len(reqs)} /classify requests of up to {o.batch} texts, both adapters interleaved, "
        f"{o.concurrency} in flight; then the same texts to the base model"
    )
    args = ["--model", BASE_NAME] + (["--adapter-root", str(root)] if root is not None else [])
    server = start_server(args, o.threads)
    try:
        warm = [(t, 0, min(o.batch, len(t.texts))) for t in tasks]
        asyncio.run(_stream(server.url, "warmup", warm, False, o.concurrency))  # loads the adapters
        asyncio.run(_stream(server.url, "warmup", warm, True, o.concurrency))
        t_mixed = asyncio.run(_stream(server.url, "mixed", reqs, False, o.concurrency))
        t_base = asyncio.run(_stream(server.url, "base", reqs, True, o.concurrency))
    finally:
        server.stop()
    return report(tasks, t_mixed, t_base, time.perf_counter() - t_start)


def _rate(task: Task, phase: str) -> float:
    first, last = task.spans[phase]
    return len(task.texts) / max(last - first, 1e-9)


def report(tasks: list[Task], t_mixed: float, t_base: float, total: float) -> int:
    """The table; 1 when an accuracy is under its floor."""
    print(
        f"\n{'adapter':<16} {'test set':<8} {'rows':>5} {'accuracy':>8} {'floor':>5}  {'rows/s':>7} {'base rows/s':>11} {'vs base':>7}"
    )
    status = 0
    for t in tasks:
        acc = t.correct / len(t.texts)
        ok = acc >= t.floor
        status |= 0 if ok else 1
        mixed, base = _rate(t, "mixed"), _rate(t, "base")
        print(
            f"{t.adapter:<16} {t.title:<8} {len(t.texts):>5} {acc:8.4f} {t.floor:5.2f}  "
            f"{mixed:7.1f} {base:11.1f} {mixed / base:6.2f}x{'' if ok else '  BELOW FLOOR'}"
        )
    n = sum(len(t.texts) for t in tasks)
    print(
        f"{'mixed stream':<16} {'both':<8} {n:>5} {'':>8} {'':>5}  {n / t_mixed:7.1f} "
        f"{n / t_base:11.1f} {t_base / t_mixed:6.2f}x"
    )
    print(
        "(rows/s: an adapter's rows over its span of the mixed stream; base rows/s: the same texts, "
        "same requests, to the base model)"
    )
    verdict = (
        "OK: every accuracy is at or above its floor"
        if status == 0
        else "FAILED: an accuracy is below its floor"
    )
    print(f"{verdict}; done in {total:.1f} s")
    return status


# -- flags ---------------------------------------------------------------------------------------


def run_command(args: argparse.Namespace) -> int:
    """``paradapt showcase`` from its flags: the decoder one, or the encoder one by ``--model``."""
    if args.model != BASE_NAME:
        from . import showcase_chat

        if args.train:
            raise ShowcaseError("--train retrains the encoder showcase's adapters (--model all-minilm-l6-v2)")
        return showcase_chat.run(
            args.rows,
            showcase_chat.CONCURRENCY if args.concurrency is None else args.concurrency,
            args.threads or usable_cores(),
            args.quantize,
        )
    if args.quantize not in ("auto", "none"):
        raise ShowcaseError("--quantize is for the SmolLM2 showcase (the MiniLM encoder serves in float32)")
    options = Options(
        limit=args.limit,
        agnews=args.agnews_rows,
        batch=args.batch,
        concurrency=8 if args.concurrency is None else args.concurrency,
        seed=args.seed,
        train=args.train,
        train_dir=Path(args.train_dir).expanduser(),
        threads=args.threads or 1,
    )
    check_options(options)  # before looking for data, so a bad flag is the error named
    return run(options, find_assets())


def add_parser(sub) -> None:
    """Register ``paradapt showcase`` on the ``paradapt`` subparsers."""
    sc = sub.add_parser(
        "showcase",
        help="serve real adapters, stream their test sets over HTTP, print accuracy and throughput",
        description="Start `paradapt serve` on a free loopback port and drive it over HTTP. Default: "
        "SmolLM2-135M-Instruct with its three shipped chat adapters (SST-2, AG News, SMS spam): one "
        "mixed stream of /v1/chat/completions requests over their held-out test rows, then the same "
        "requests to the base model; prints each adapter's accuracy next to the base model's zero-shot "
        "accuracy and its throughput next to the base model's. --model all-minilm-l6-v2: the MiniLM "
        "encoder with the SST-2 and AG News classifiers over /classify (floors SST-2 0.75, AG News "
        "0.80). Exit 0: every accuracy at or above its floor; 1: one below; 2: an error.",
    )
    sc.add_argument(
        "--model",
        choices=MODELS,
        default=MODELS[0],
        help="which showcase: the SmolLM2 chat adapters (default) or the MiniLM classifiers",
    )
    sc.add_argument(
        "--rows",
        type=positive_int,
        default=100,
        metavar="N",
        help="SmolLM2: test rows per adapter (default: 100, about 2.5 minutes on 2 cores in float32)",
    )
    sc.add_argument(
        "--train", action="store_true", help="MiniLM: retrain both adapters first (examples/*.yaml)"
    )
    sc.add_argument("--train-dir", default="runs/showcase", metavar="DIR", help="where --train writes")
    sc.add_argument("--limit", type=int, metavar="N", help="MiniLM: SST-2 test rows (default: all 872)")
    sc.add_argument(
        "--agnews-rows",
        type=int,
        default=1000,
        metavar="N",
        help="MiniLM: seeded AG News test subset (default: 1000)",
    )
    sc.add_argument(
        "--batch", type=int, default=8, metavar="N", help="MiniLM: texts per request (default: 8)"
    )
    sc.add_argument(
        "--concurrency", type=int, metavar="N", help="requests in flight (default: 32 SmolLM2, 8 MiniLM)"
    )
    sc.add_argument("--seed", type=int, default=0, help="seed of the AG News subset (default: 0)")
    sc.add_argument(
        "--quantize",
        choices=("auto", *QUANTIZE_CHOICES),
        default="auto",
        help="SmolLM2: the server's --quantize; auto (default): bf16 where the CPU multiplies bf16 "
        "natively (AMX or AVX512-BF16: about 1.8x faster here, the same accuracy), else none (float32); "
        "the base model it is compared with runs in the same precision",
    )
    sc.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="the server's torch CPU threads (default: SmolLM2 every usable core, as its prefill is "
        "compute-bound and the client mostly waits: 1.5x the requests/s of 1 thread on 2 cores; "
        "MiniLM 1, leaving a core to its client's batching)",
    )
    sc.set_defaults(func=run_command)


__all__ = ["Options", "ShowcaseError", "add_parser", "run"]
