#!/usr/bin/env python3
"""llama.cpp as a peer for paradapt's int4 benchmarks, on the same GGUF file.

Run it with the Python of the llama.cpp virtual environment (``/work/venvs/llamacpp``, built as
``benchmarks/peers/README.md`` says), never with paradapt's: it imports only the standard library
and what that environment has (llama-cpp-python, numpy), so the peer's numbers carry none of
paradapt's code. Every mode prints ONE JSON line on stdout; diagnostics go to stderr.

Modes:

``--mode decode``
    Greedy decoding at batch 1: prefill tokens/s for a ``--prompt-tokens`` prompt, then decode
    tokens/s for ``--new-tokens`` tokens, ``--repeats`` times after one untimed warm-up run.
    ``--engine python`` (default) drives llama-cpp-python's ``Llama.eval``/``Llama.sample`` and
    reports both the wall clock and llama.cpp's own eval timings (``llama_perf_context``: the
    numbers llama.cpp prints as "prompt eval time" and "eval time"); ``--engine llama-bench``
    runs llama.cpp's ``llama-bench`` (its ``pp`` and ``tg`` tests), the tool llama.cpp's users
    quote.

``--mode stream``
    Starts the upstream ``llama-server`` on a free loopback port with every ``--loras`` adapter
    loaded at scale 0 and ``--parallel`` slots (continuous batching), sends the requests of a
    JSONL file at ``--concurrency`` in flight, each with its own adapter selected per request
    (``"lora": [{"id": i, "scale": 1.0}]``), greedy, and reports requests/s, output tokens/s,
    errors and every request's output. The server is stopped with SIGTERM at the end.

``--lora-convert PEFT_DIR OUT.gguf``
    Converts a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``) to a
    GGUF LoRA with llama.cpp's own ``convert_lora_to_gguf.py`` (vendored in llama-cpp-python's
    source), after folding what that script ignores (rsLoRA's scale) into ``lora_alpha``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

VENV = Path(sys.prefix)
DEFAULT_BASE_HF = Path.home() / ".cache/paradapt/models/smollm2-135m-instruct"
# A fixed English text, so every run prefills the same tokens (llama-bench uses random ones).
FILLER = (
    "The history of the printing press begins in the fifteenth century, when movable metal type "
    "made books cheap enough for merchants, students and craftsmen to own. Within fifty years "
    "presses were running in more than two hundred European towns, and the number of books in "
    "circulation grew from thousands to millions. "
)


def log(msg: str) -> None:
    """Diagnostics go to stderr so stdout stays one JSON line."""
    print(f"[llamacpp_peer] {msg}", file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    """The one JSON line a caller parses."""
    print(json.dumps(result, ensure_ascii=False), flush=True)


# ---------------------------------------------------------------------------------------------
# locating llama.cpp's pieces inside the virtual environment


def llama_cpp_src() -> Path:
    """The vendored llama.cpp tree of the llama-cpp-python source kept in the venv (the README's
    build step leaves it at ``$VENV/src/llama_cpp_python-*/vendor/llama.cpp``)."""
    hits = sorted(glob.glob(str(VENV / "src" / "llama_cpp_python-*" / "vendor" / "llama.cpp")))
    if not hits:
        raise SystemExit(f"no vendored llama.cpp under {VENV / 'src'}; see benchmarks/peers/README.md")
    return Path(hits[-1])


def find_binary(name: str, explicit: str | None) -> Path:
    """A llama.cpp tool: the path given, else the venv's bin/ (where the README links them), else
    the venv's CMake build tree, else $PATH."""
    if explicit:
        return Path(explicit)
    candidates = [
        VENV / "bin" / name,
        *map(Path, glob.glob(str(VENV / "build" / "**" / "bin" / name), recursive=True)),
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    found = shutil.which(name)
    if found:
        return Path(found)
    raise SystemExit(f"{name} not found (looked in {VENV / 'bin'}, {VENV / 'build'} and $PATH); see README")


def versions() -> dict[str, str]:
    """What produced the numbers: llama-cpp-python's version and the vendored llama.cpp build."""
    out: dict[str, str] = {}
    try:
        import llama_cpp

        out["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        out["llama_cpp_python"] = "not installed"
    return out


# ---------------------------------------------------------------------------------------------
# decode mode


def summary(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation and range of per-repeat rates (the stdev is 0 for one repeat)."""
    return {
        "mean": round(statistics.fmean(values), 3),
        "stdev": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def prompt_tokens(llm: Any, n: int) -> list[int]:
    """Exactly ``n`` prompt tokens (BOS, if the model adds one, counts), from a fixed text."""
    text = FILLER
    while True:
        toks = llm.tokenize(text.encode(), add_bos=True, special=False)
        if len(toks) >= n:
            return list(toks[:n])
        text += FILLER


def python_run(llm: Any, prompt: list[int], new_tokens: int) -> dict[str, float]:
    """One greedy generation at batch 1 from an empty KV cache: prefill the prompt in one batch,
    then ``new_tokens`` single-token decodes (no stop on EOS, so every run decodes the same count).

    Wall times include llama-cpp-python's per-token overhead (sampling, ctypes); the engine
    times are llama.cpp's own counters around its graph compute, as its perf printout gives them.
    """
    import llama_cpp

    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    t0 = time.perf_counter()
    llm.eval(prompt)
    # llama.cpp books queued tokens into its counters at a synchronize; without one here and at
    # the end, the last decode of a run would be counted in the next run's prefill
    llama_cpp.llama_synchronize(llm.ctx)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    llama_cpp.llama_synchronize(llm.ctx)
    t2 = time.perf_counter()
    perf = llama_cpp.llama_perf_context(llm.ctx)
    return {
        "prefill_wall_tok_s": len(prompt) / (t1 - t0),
        "decode_wall_tok_s": new_tokens / (t2 - t1),
        "prefill_engine_tok_s": perf.n_p_eval / (perf.t_p_eval_ms / 1e3),
        "decode_engine_tok_s": perf.n_eval / (perf.t_eval_ms / 1e3),
        "engine_counts": [perf.n_p_eval, perf.n_eval],
    }


def decode_python(args: argparse.Namespace) -> dict[str, Any]:
    """``--engine python``: llama-cpp-python on the GGUF, repeated runs after a warm-up."""
    from llama_cpp import Llama

    n_ctx = args.prompt_tokens + args.new_tokens + 16
    llm = Llama(
        model_path=args.gguf,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=n_ctx,
        n_batch=max(args.prompt_tokens, 8),
        n_ubatch=max(args.prompt_tokens, 8),
        flash_attn=args.flash_attn != "off",
        no_perf=False,
        verbose=False,
    )
    prompt = prompt_tokens(llm, args.prompt_tokens)
    python_run(llm, prompt, args.new_tokens)  # warm-up, not timed
    runs = [python_run(llm, prompt, args.new_tokens) for _ in range(args.repeats)]
    for r in runs:
        if r["engine_counts"] != [args.prompt_tokens, args.new_tokens]:
            raise SystemExit(
                f"llama.cpp counted {r['engine_counts']} tokens, expected "
                f"[{args.prompt_tokens}, {args.new_tokens}]"
            )
    out: dict[str, Any] = {}
    for key in ("prefill_wall_tok_s", "decode_wall_tok_s", "prefill_engine_tok_s", "decode_engine_tok_s"):
        out[key] = summary([r[key] for r in runs])
    out["per_repeat"] = [{k: round(v, 3) for k, v in r.items() if k != "engine_counts"} for r in runs]
    out["flash_attn"] = "on" if args.flash_attn != "off" else "off"
    return out


def decode_llama_bench(args: argparse.Namespace) -> dict[str, Any]:
    """``--engine llama-bench``: llama.cpp's benchmark tool, ``pp`` (prefill of a random prompt in
    one batch) and ``tg`` (``n`` single-token decodes from an empty cache), each ``-r`` times after
    llama-bench's own warm-up run."""
    exe = find_binary("llama-bench", args.bench_bin)
    cmd = [
        str(exe),
        "-m",
        args.gguf,
        "-t",
        str(args.threads),
        "-p",
        str(args.prompt_tokens),
        "-n",
        str(args.new_tokens),
        "-r",
        str(args.repeats),
        "-fa",
        args.flash_attn,
        "-o",
        "json",
    ]
    log(" ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"llama-bench failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rows = json.loads(proc.stdout)
    out: dict[str, Any] = {"llama_bench_cmd": cmd}
    for row in rows:
        key = "prefill_engine_tok_s" if row["n_gen"] == 0 else "decode_engine_tok_s"
        out[key] = {
            "mean": round(row["avg_ts"], 3),
            "stdev": round(row["stddev_ts"], 3),
            "samples_ts": [round(x, 3) for x in row.get("samples_ts", [])],
        }
        out["build_commit"] = row.get("build_commit")
        out["build_number"] = row.get("build_number")
        out["cpu_info"] = row.get("cpu_info")
        out["flash_attn"] = row.get("flash_attn")
    return out


def mode_decode(args: argparse.Namespace) -> dict[str, Any]:
    """Batch-1 greedy prefill and decode rates; see the module docstring."""
    if args.batch != 1:
        raise SystemExit(
            "--mode decode measures batch 1 only (llama.cpp's batched decoding is the stream mode)"
        )
    body = decode_python(args) if args.engine == "python" else decode_llama_bench(args)
    return {
        "mode": "decode",
        "engine": args.engine,
        "gguf": args.gguf,
        "threads": args.threads,
        "batch": 1,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        **body,
        **versions(),
    }


# ---------------------------------------------------------------------------------------------
# stream mode: llama-server with several LoRA adapters


def free_port() -> int:
    """A loopback port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: Any = None, timeout: float = 600.0) -> tuple[int, Any]:
    """GET (no body) or POST JSON; returns (status, parsed JSON or text). Errors are returned, not
    raised, so one failed request is counted rather than ending the stream."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as e:
        raw, status = e.read().decode(errors="replace"), e.code
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def parse_loras(specs: list[str]) -> list[tuple[str, Path]]:
    """``name=PATH`` pairs, in order: the order fixes llama-server's adapter ids (0, 1, ...)."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--loras wants name=GGUF_PATH, got {spec!r}")
        if not Path(path).is_file():
            raise SystemExit(f"LoRA GGUF not found: {path}")
        out.append((name, Path(path)))
    if len({n for n, _ in out}) != len(out):
        raise SystemExit("--loras names must be unique")
    return out


def start_server(
    args: argparse.Namespace, loras: list[tuple[str, Path]], port: int, log_path: Path
) -> subprocess.Popen:
    """llama-server with every adapter loaded, ``--parallel`` slots, ``-c`` = slots x context.

    ``--lora-init-without-apply`` keeps the adapters out of the warm-up run; which adapters a
    request gets is set by its own ``lora`` list (``request_body``) and, for a request without
    one, by the global scales that ``zero_global_scales`` sets to 0."""
    exe = find_binary("llama-server", args.server_bin)
    cmd = [
        str(exe),
        "-m",
        args.gguf,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        str(args.threads),
        "-tb",
        str(args.threads),
        "--parallel",
        str(args.parallel),
        "-c",
        str(args.parallel * args.ctx_per_slot),
        "-fa",
        args.flash_attn,
        "--no-webui",
        # the host-memory prompt cache restores a slot's KV by matching tokens only, not the
        # LoRA it was computed with; off by default so no request reuses another adapter's KV
        "--cache-ram",
        str(args.cache_ram),
    ]
    for _, path in loras:
        cmd += ["--lora", str(path)]
    if loras:
        cmd.append("--lora-init-without-apply")
    cmd += args.server_arg
    log(" ".join(cmd))
    logf = open(log_path, "w")  # noqa: SIM115 - closed when the server stops
    # a new session, so a Ctrl-C at the terminal reaches us first and we stop the server ourselves
    return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, base_url: str, log_path: Path, timeout: float) -> None:
    """Poll /health until 200 (it answers 503 while the model loads)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited with {proc.returncode}: {tail(log_path)}")
        try:
            status, _ = http_json(f"{base_url}/health", timeout=2)
            if status == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"llama-server not ready after {timeout:.0f} s: {tail(log_path)}")


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM (llama-server finishes its loop and frees the model), SIGKILL after 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def tail(path: Path, n: int = 1500) -> str:
    """The end of the server's log, for error messages."""
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def lora_ids(base_url: str, loras: list[tuple[str, Path]]) -> dict[str, int]:
    """Adapter name -> llama-server id, checked against GET /lora-adapters (ids follow --lora
    order; the check catches a server that loaded them otherwise)."""
    status, listing = http_json(f"{base_url}/lora-adapters", timeout=10)
    if status != 200:
        raise SystemExit(f"GET /lora-adapters: {status} {listing}")
    by_path = {os.path.realpath(e["path"]): e["id"] for e in listing}
    ids = {}
    for name, path in loras:
        key = os.path.realpath(path)
        if key not in by_path:
            raise SystemExit(f"llama-server did not list {path}: {listing}")
        ids[name] = by_path[key]
    return ids


def zero_global_scales(base_url: str, ids: dict[str, int]) -> None:
    """Set every adapter's global scale to 0 and check it took. ``--lora-init-without-apply``
    only skips applying them at load (common/common.cpp); their scales stay 1, and a request
    without a ``lora`` field would get all of them. Every request here names its scales anyway
    (``request_body``); this makes a stray request the base model rather than all adapters."""
    if not ids:
        return
    status, reply = http_json(f"{base_url}/lora-adapters", [{"id": i, "scale": 0.0} for i in ids.values()])
    if status != 200:
        raise SystemExit(f"POST /lora-adapters: {status} {reply}")
    _, listing = http_json(f"{base_url}/lora-adapters", timeout=10)
    if any(e["scale"] != 0.0 for e in listing):
        raise SystemExit(f"adapter scales not zeroed: {listing}")


PASS_THROUGH = ("id", "label")  # request fields copied into the per-request records


def load_requests(path: str) -> list[dict[str, Any]]:
    """The JSONL request file: ``{"adapter": name|null, "prompt": str}`` or ``{"adapter": ...,
    "messages": [...]}``, each with ``max_tokens``."""
    reqs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if ("prompt" in r) == ("messages" in r):
                raise SystemExit(f"{path}:{n}: give exactly one of prompt, messages")
            if "max_tokens" not in r:
                raise SystemExit(f"{path}:{n}: no max_tokens")
            reqs.append(r)
    return reqs


def request_body(
    req: dict[str, Any], ids: dict[str, int], args: argparse.Namespace
) -> tuple[str, dict[str, Any]]:
    """The endpoint and JSON body of one request: greedy, its adapter (if any) at scale 1.

    The ``lora`` list always names every loaded adapter (the request's at 1, the rest at 0; all
    at 0 for the base model), never ``[]``: an empty or missing list makes the slot use the
    server's global adapter list, whose scales ``--lora-init-without-apply`` leaves at 1, and that
    switch does not clear the slot's KV cache (server-context.cpp, ``launch_slot_with_task``).
    """
    adapter = req.get("adapter")
    if adapter not in (None, "", "base") and adapter not in ids:
        raise SystemExit(f"request names adapter {adapter!r}, not among --loras {sorted(ids)}")
    body: dict[str, Any] = {
        "max_tokens": int(req["max_tokens"]),
        "temperature": 0.0,
        "top_k": 1,
        "seed": 0,
        "stream": False,
    }
    if ids:
        body["lora"] = [{"id": i, "scale": 1.0 if name == adapter else 0.0} for name, i in ids.items()]
    if args.cache_prompt is not None:
        body["cache_prompt"] = args.cache_prompt
    if args.ignore_eos:  # generate exactly max_tokens, for a peer that does the same
        body["ignore_eos"] = True
    if "messages" in req:
        body["messages"] = req["messages"]
        return "/v1/chat/completions", body
    body["prompt"] = req["prompt"]
    return "/v1/completions", body


def send_one(
    i: int, req: dict[str, Any], base_url: str, ids: dict[str, int], args: argparse.Namespace
) -> dict[str, Any]:
    """One request, timed; the answer text and token counts come from the OpenAI-style reply."""
    endpoint, body = request_body(req, ids, args)
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"i": i, "adapter": req.get("adapter"), "start_s": t0}
    rec.update({k: req[k] for k in PASS_THROUGH if k in req})  # so answers can be checked
    try:
        status, reply = http_json(base_url + endpoint, body, timeout=args.request_timeout)
    except Exception as e:  # a dropped connection is a failed request, not a crashed benchmark
        status, reply = -1, f"{type(e).__name__}: {e}"
    rec["end_s"] = time.perf_counter()
    rec["latency_s"] = round(rec["end_s"] - t0, 4)
    if status != 200 or not isinstance(reply, dict) or "choices" not in reply:
        rec["error"] = f"{status}: {str(reply)[:500]}"
        return rec
    choice = reply["choices"][0]
    rec["output"] = choice["message"]["content"] if "message" in choice else choice.get("text", "")
    rec["finish_reason"] = choice.get("finish_reason")
    usage = reply.get("usage", {})
    rec["prompt_tokens"] = usage.get("prompt_tokens")
    rec["completion_tokens"] = usage.get("completion_tokens", 0)
    return rec


def run_stream(
    reqs: list[dict[str, Any]], base_url: str, ids: dict[str, int], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], float]:
    """All requests at ``--concurrency`` in flight (a closed loop: a worker sends the next request
    in file order as soon as its last one returns). Returns the records and the wall time."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        recs = list(pool.map(lambda ir: send_one(ir[0], ir[1], base_url, ids, args), enumerate(reqs)))
    wall = time.perf_counter() - t0
    for r in recs:  # times relative to the stream's start
        r["start_s"] = round(r["start_s"] - t0, 4)
        r["end_s"] = round(r["end_s"] - t0, 4)
    return recs, wall


def warm_up(base_url: str, ids: dict[str, int], args: argparse.Namespace) -> None:
    """One short untimed request per adapter and for the base model, so the first timed requests
    do not pay for first-use costs (graph allocation with each adapter)."""
    for name in [None, *ids]:
        rec = send_one(-1, {"adapter": name, "prompt": "Hello", "max_tokens": 2}, base_url, ids, args)
        if "error" in rec:
            raise SystemExit(f"warm-up request for {name or 'base'} failed: {rec['error']}")


def per_adapter(recs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Requests, output tokens and errors per adapter (the base model as "base")."""
    out: dict[str, dict[str, Any]] = {}
    for r in recs:
        a = out.setdefault(r["adapter"] or "base", {"requests": 0, "output_tokens": 0, "errors": 0})
        a["requests"] += 1
        a["output_tokens"] += r.get("completion_tokens") or 0
        a["errors"] += "error" in r
    return out


def mode_stream(args: argparse.Namespace) -> dict[str, Any]:
    """Mixed-adapter stream against llama-server; see the module docstring."""
    loras = parse_loras(args.loras)
    reqs = load_requests(args.requests)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_dir = Path(tempfile.mkdtemp(prefix="llamacpp_peer_"))
    log_path = Path(args.server_log) if args.server_log else log_dir / "llama-server.log"
    proc = start_server(args, loras, port, log_path)
    try:
        wait_ready(proc, base_url, log_path, args.startup_timeout)
        ids = lora_ids(base_url, loras)
        zero_global_scales(base_url, ids)
        _, props = http_json(f"{base_url}/props", timeout=10)
        if not args.no_warmup:
            warm_up(base_url, ids, args)
        recs, wall = run_stream(reqs, base_url, ids, args)
    finally:
        code = stop_server(proc)
        log(f"llama-server stopped (exit {code}); log: {log_path}")
    out_tokens = sum(r.get("completion_tokens") or 0 for r in recs)
    errors = sum("error" in r for r in recs)
    build = props.get("build_info") if isinstance(props, dict) else None
    return {
        "mode": "stream",
        "engine": "llama-server",
        "gguf": args.gguf,
        "threads": args.threads,
        "parallel": args.parallel,
        "concurrency": args.concurrency,
        "ctx_per_slot": args.ctx_per_slot,
        "flash_attn": args.flash_attn,
        "cache_prompt": "server default" if args.cache_prompt is None else args.cache_prompt,
        "ignore_eos": args.ignore_eos,
        "cache_ram_mib": args.cache_ram,
        "loras": {n: {"id": ids[n], "path": str(p)} for n, p in loras},
        "requests_file": args.requests,
        "n_requests": len(recs),
        "errors": errors,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(recs) / wall, 4),
        "output_tokens": out_tokens,
        "output_tokens_per_s": round(out_tokens / wall, 3),
        "per_adapter": per_adapter(recs),
        "server_build": build,
        "server_exit_code": code,
        "server_log": str(log_path),
        **versions(),
        "requests": recs,
    }


# ---------------------------------------------------------------------------------------------
# LoRA conversion: PEFT folder -> GGUF LoRA


def prepared_peft_copy(peft_dir: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    """A copy of the PEFT folder whose config llama.cpp's converter reads as PEFT means it.

    llama.cpp scales a LoRA by ``alpha / rank`` (src/llama-graph.cpp) and the converter copies
    ``lora_alpha`` as is, so an rsLoRA (scale ``alpha / sqrt(r)``) gets ``alpha * sqrt(r)``.
    What llama.cpp cannot express is refused rather than converted wrongly.
    """
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise SystemExit(f"{peft_dir}: peft_type {cfg.get('peft_type')!r}, only LORA converts")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if cfg.get(key) == bad:
            raise SystemExit(f"{peft_dir}: {key}={bad} is not supported by llama.cpp's LoRA")
    if cfg.get("alpha_pattern"):
        raise SystemExit(f"{peft_dir}: alpha_pattern (per-module alpha) is not supported by llama.cpp's LoRA")
    if cfg.get("use_rslora"):
        if cfg.get("rank_pattern"):
            raise SystemExit(f"{peft_dir}: rsLoRA with rank_pattern cannot be folded into one alpha")
        cfg["lora_alpha"] = float(cfg["lora_alpha"]) * math.sqrt(int(cfg["r"]))
        cfg["use_rslora"] = False
    cfg.setdefault("lora_alpha", 8)  # PEFT's default
    weights = peft_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise SystemExit(f"{peft_dir}: no adapter_model.safetensors")
    work.mkdir(parents=True, exist_ok=True)
    (work / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    os.symlink(weights.resolve(), work / "adapter_model.safetensors")
    return work, cfg


def check_gguf_lora(path: Path) -> dict[str, Any]:
    """Read the written file back with llama.cpp's gguf-py: type, alpha, tensor count, ranks."""
    sys.path.insert(0, str(llama_cpp_src() / "gguf-py"))
    import gguf

    reader = gguf.GGUFReader(path)

    def field(name: str) -> Any:
        f = reader.fields[name]
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v.tolist()[0]

    ranks = sorted({int(t.shape[1]) for t in reader.tensors if t.name.endswith(".lora_a")})
    kinds = sorted({t.name.split(".")[2] for t in reader.tensors if t.name.startswith("blk.")})
    return {
        "general_type": field("general.type"),
        "adapter_type": field("adapter.type"),
        "alpha": field("adapter.lora.alpha"),
        "architecture": field("general.architecture"),
        "tensors": len(reader.tensors),
        "ranks": ranks,
        "targets": kinds,
    }


def mode_lora_convert(args: argparse.Namespace) -> dict[str, Any]:
    """PEFT LoRA folder -> GGUF LoRA with llama.cpp's convert_lora_to_gguf.py, then read back.

    The converter needs torch, transformers and safetensors (installed in this venv, see the
    README) and the base model's Hugging Face config: ``--base`` (default: paradapt's cached
    SmolLM2 folder). It only reads config.json there, never the weights.
    """
    peft_dir, out = Path(args.lora_convert[0]), Path(args.lora_convert[1])
    base = Path(args.base)
    if not (base / "config.json").is_file():
        raise SystemExit(f"--base {base}: no config.json (give the base model's Hugging Face folder)")
    script = llama_cpp_src() / "convert_lora_to_gguf.py"
    with tempfile.TemporaryDirectory(prefix="peft_") as tmp:
        folder, cfg = prepared_peft_copy(peft_dir, Path(tmp) / peft_dir.name)
        cmd = [
            sys.executable,
            str(script),
            str(folder),
            "--base",
            str(base),
            "--outfile",
            str(out),
            "--outtype",
            args.outtype,
        ]
        log(" ".join(cmd))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"convert_lora_to_gguf.py failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return {
        "mode": "lora-convert",
        "peft_dir": str(peft_dir),
        "out": str(out),
        "outtype": args.outtype,
        "peft_r": cfg.get("r"),
        "peft_alpha_written": cfg["lora_alpha"],
        **check_gguf_lora(out),
    }


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", help="the base model GGUF (the same file paradapt converts)")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads (-t and -tb)")
    p.add_argument("--mode", choices=["decode", "stream"])
    p.add_argument(
        "--flash-attn",
        choices=["auto", "on", "off"],
        default="auto",
        help="llama.cpp's default is auto (on where the backend supports it, as the CPU does); "
        "the python engine maps auto to on",
    )
    g = p.add_argument_group("decode")
    g.add_argument("--engine", choices=["python", "llama-bench"], default="python")
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--prompt-tokens", type=int, default=64)
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--repeats", type=int, default=5)
    g.add_argument("--bench-bin", help="llama-bench binary (default: the venv's)")
    s = p.add_argument_group("stream")
    s.add_argument("--loras", nargs="*", default=[], metavar="NAME=GGUF", help="LoRA adapters, in id order")
    s.add_argument("--requests", help="JSONL: {adapter, prompt|messages, max_tokens} per line")
    s.add_argument("--concurrency", type=int, default=8)
    s.add_argument("--parallel", type=int, default=8, help="llama-server slots (--parallel)")
    s.add_argument(
        "--ctx-per-slot", type=int, default=1024, help="KV context per slot; -c is parallel x this"
    )
    s.add_argument(
        "--cache-prompt",
        type=lambda v: v.lower() in ("1", "true", "yes"),
        default=None,
        help="send cache_prompt true/false with each request (default: the server's default, true)",
    )
    s.add_argument(
        "--cache-ram",
        type=int,
        default=0,
        help="llama-server --cache-ram MiB (default 0: off, see start_server)",
    )
    s.add_argument("--no-warmup", action="store_true", help="skip the untimed request per adapter")
    s.add_argument(
        "--ignore-eos", action="store_true", help="send ignore_eos: every request makes max_tokens"
    )
    s.add_argument("--server-bin", help="llama-server binary (default: the venv's)")
    s.add_argument(
        "--server-arg", action="append", default=[], help="extra llama-server argument (repeatable)"
    )
    s.add_argument("--server-log", help="keep llama-server's log here (default: a temp file)")
    s.add_argument("--startup-timeout", type=float, default=120.0)
    s.add_argument("--request-timeout", type=float, default=600.0)
    c = p.add_argument_group("lora conversion")
    c.add_argument("--lora-convert", nargs=2, metavar=("PEFT_DIR", "OUT_GGUF"))
    c.add_argument("--base", default=str(DEFAULT_BASE_HF), help="base model HF folder (config.json)")
    c.add_argument(
        "--outtype",
        choices=["f32", "f16", "bf16", "q8_0"],
        default="f32",
        help="LoRA tensor type (f32 keeps paradapt's float32 adapters exact)",
    )
    args = p.parse_args(argv)
    if not args.lora_convert:
        if not args.mode or not args.gguf:
            p.error("give --gguf and --mode, or --lora-convert PEFT_DIR OUT.gguf")
        if args.mode == "stream" and not args.requests:
            p.error("--mode stream needs --requests FILE.jsonl")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.lora_convert:
        result = mode_lora_convert(args)
    elif args.mode == "decode":
        result = mode_decode(args)
    else:
        result = mode_stream(args)
    emit(result)
    return 1 if result.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
