"""Which torch thread count should ``paradapt serve`` default to? Served tokens/s at 1, 2, ... threads.

One server process holds the engine thread (torch ops) and the uvicorn event loop (HTTP, JSON,
tokenizer) on the same cores; torch's intra-op threads compete with the loop and with the
clients. This benchmark serves a decoder with ``paradapt serve --threads T`` for each T, in
interleaved rounds (T1, T2, T1, T2, ...) so machine drift hits every T alike, and drives it
with C closed-loop clients sending non-streamed completions (``ignore_eos``: every request
generates exactly ``--max-tokens``), alternating the base model and two LoRA adapters.

    python benchmarks/serve_threads.py --threads 1,2 --concurrency 1,8 --rounds 2

Models: stories260K (the real 293k-parameter Llama in the shared assets), a random
Llama-style decoder (hidden 512, 4 layers, stories260K's tokenizer) as in serve_load.py, and
``minilm``: what ``paradapt serve --model all-minilm-l6-v2`` serves (MiniLM with its shipped SST-2
and AG News classifiers), driven with ``/classify`` requests of 8 texts alternating the adapters.
Reported per (model, concurrency, threads), median over rounds and the range: output tokens/s
(texts/s for minilm), and the server's CPU seconds per 1,000 tokens (texts): on a shared machine
the scheduler shares CPU per thread, so a 2-thread server can take more than its share of a
busy machine; CPU per token shows what each token really costs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402  (builds the hidden-512 Llama the load benchmark uses)

from paradapt.serve.process import ServerProcess  # noqa: E402

ADAPTERS = ("lo-a", "lo-b")


def build(work: Path, spec: str) -> tuple[str, Path | None, Path | None]:
    """(label, model folder, adapter root with two random LoRA r8 adapters); None, None for minilm."""
    import torch

    import paradapt as pa
    from paradapt.loading import find_assets, load_model

    if spec == "minilm":
        return "MiniLM (bundled)", None, None
    hidden_layers = None if spec == "stories" else tuple(int(x) for x in spec.split("x"))
    if hidden_layers is None:
        label, model_dir = "stories260K", find_assets() / "models" / "stories260k-hf"
    else:
        hidden, layers = hidden_layers
        label = f"llama h{hidden} L{layers}"
        model_dir = serve_load.build_model(work / f"llama-{hidden}-{layers}", layers, hidden, seed=0)
    root = work / f"adapters-{label.replace(' ', '-')}"
    root.mkdir()
    _, model = load_model(model_dir)
    torch.manual_seed(0)
    for name in ADAPTERS:
        pa.add_adapter(model, name, pa.LoRAConfig(r=8, init="random"))
        pa.save_adapter(model, name, root / name)
    return label, model_dir, root


async def drive(
    url: str, requests: int, concurrency: int, prompt_len: int, max_tokens: int
) -> tuple[int, float]:
    """(output tokens, seconds) of ``requests`` completions sent by ``concurrency`` closed-loop clients."""
    models = ["base", *ADAPTERS]
    todo = list(range(requests))
    body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}

    async def client(c: httpx.AsyncClient) -> int:
        made = 0
        while todo:
            i = todo.pop()
            prompt = [1 + (7 * i + 13 * j) % 500 for j in range(prompt_len)]
            r = await c.post(f"{url}/v1/completions", json={**body, "model": models[i % 3], "prompt": prompt})
            r.raise_for_status()
            made += r.json()["usage"]["completion_tokens"]
        return made

    async with httpx.AsyncClient(timeout=600) as c:
        r = await c.post(
            f"{url}/v1/completions", json={**body, "model": "base", "prompt": [1, 2, 3]}
        )  # warm-up
        r.raise_for_status()
        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(client(c) for _ in range(concurrency))))
        return tokens, time.perf_counter() - t0


TEXTS = [
    "a charming and affecting journey",
    "it 's slow -- very , very slow .",
    "Wall St. Bears Claw Back Into the Black (Reuters) Short-sellers are seeing green again.",
    "the film is a masterpiece of quiet observation and restraint",
]


async def drive_classify(url: str, requests: int, concurrency: int, batch: int = 8) -> tuple[int, float]:
    """(texts, seconds) of ``requests`` /classify calls of ``batch`` texts from ``concurrency`` clients."""
    todo = list(range(requests))
    adapters = ("sst2-parallel", "agnews-parallel")

    async def client(c: httpx.AsyncClient) -> int:
        made = 0
        while todo:
            i = todo.pop()
            texts = [TEXTS[(i + j) % len(TEXTS)] + f" {i} {j}" for j in range(batch)]
            r = await c.post(f"{url}/classify", json={"model": adapters[i % 2], "input": texts})
            r.raise_for_status()
            made += len(r.json()["data"])
        return made

    async with httpx.AsyncClient(timeout=600) as c:
        for a in adapters:  # warm-up: loads both adapters
            (await c.post(f"{url}/classify", json={"model": a, "input": TEXTS})).raise_for_status()
        t0 = time.perf_counter()
        done = sum(await asyncio.gather(*(client(c) for _ in range(concurrency))))
        return done, time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(model_dir: Path | None, root: Path | None, threads: int, args) -> dict[int, tuple[float, float]]:
    """(tokens/s, server CPU s per 1,000 tokens) per concurrency for one fresh server at ``threads``."""
    flags = (
        ["--model", "all-minilm-l6-v2"]
        if model_dir is None
        else ["--model", str(model_dir), "--adapter-root", str(root)]
    )
    flags += [] if model_dir is None else ["--served-model-name", "base", "--max-slots", "3"]
    server = ServerProcess([*flags, "--threads", str(threads)])
    out = {}
    try:
        server.wait_healthy(300)
        for c in args.concurrency:
            cpu0 = cpu_seconds(server.proc.pid)  # the warm-up's few requests count too: negligible
            if model_dir is None:
                n, secs = asyncio.run(drive_classify(server.url, args.requests, c))
            else:
                n, secs = asyncio.run(drive(server.url, args.requests, c, args.prompt_len, args.max_tokens))
            out[c] = (n / secs, 1000 * (cpu_seconds(server.proc.pid) - cpu0) / n)
        return out
    finally:
        server.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    csv = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--threads", type=csv, default=[1, 2])
    p.add_argument("--concurrency", type=csv, default=[1, 8])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=24, help="requests per measurement")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--models", default="minilm,stories,512x4", help="minilm, stories and/or HIDDENxLAYERS")
    args = p.parse_args(argv)
    print(f"cores {os.cpu_count()}, load {open('/proc/loadavg').read().split()[:3]}", flush=True)
    with tempfile.TemporaryDirectory(prefix="serve_threads-") as tmp:
        for spec in args.models.split(","):
            label, model_dir, root = build(Path(tmp), spec)
            got: dict[tuple[int, int], list[tuple[float, float]]] = {}
            for rnd in range(args.rounds):
                order = args.threads if rnd % 2 == 0 else args.threads[::-1]
                for t in order:
                    for c, (tps, cpu) in measure(model_dir, root, t, args).items():
                        got.setdefault((c, t), []).append((tps, cpu))
                        print(
                            f"  {label} round {rnd} threads {t} concurrency {c}: {tps:.0f}/s, "
                            f"{cpu:.2f} CPU s per 1k",
                            flush=True,
                        )
            for c in args.concurrency:
                cells = []
                for t in args.threads:
                    v = [x for x, _ in got[(c, t)]]
                    cpu = statistics.median(y for _, y in got[(c, t)])
                    cells.append(
                        f"threads {t}: {statistics.median(v):6.0f}/s ({min(v):.0f}-{max(v):.0f}), "
                        f"{cpu:.2f} CPU s/1k"
                    )
                print(f"{label:<16} concurrency {c:>2}  " + "  ".join(cells), flush=True)
    print(f"load after {open('/proc/loadavg').read().split()[:3]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
