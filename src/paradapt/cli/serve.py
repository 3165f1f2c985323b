"""``paradapt serve [--model NAME|PATH] [--adapter-root DIR] [--port P] ...``: the OpenAI-compatible
server (docs/serving.md) over every adapter folder under DIR; SIGTERM drains and exits 0.

:func:`build_server_app` is the app ``paradapt serve`` runs, also built in-process by tests.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import ConfigError, QuantizationError, one_line
from ..loading import load_model
from ..models import NAMED_MODELS, named_model, resolve_model
from ..quantized import describe, quantization
from ..serve.core import DECODE_ATTENTION, LAYER_GEMM, LM_HEAD_GEMM, EngineConfig
from ..serve.gil import SWITCH_INTERVAL, set_switch_interval
from .common import QUANTIZE_CHOICES, CLIError, non_negative_float, positive_int, usable_cores
from .engine_flags import add_engine_flags, knobs_from_args

DEFAULT_MODEL = "smollm2-135m-instruct"  # what `paradapt serve` serves with no --model


def add_parser(sub) -> None:
    """Register ``paradapt serve`` on the ``paradapt`` subparsers."""
    serve = sub.add_parser(
        "serve",
        help="OpenAI-compatible server: one base model, every adapter folder under a root",
        description="Serve the Hugging Face model at --model and every adapter folder under "
        "--adapter-root (named by its folder) over HTTP (docs/serving.md). Decoders generate "
        "(/v1/completions, /v1/chat/completions); encoders classify and embed (/classify, "
        "/v1/embeddings). With no --model: SmolLM2-135M-Instruct and its shipped chat adapters; "
        "--model all-minilm-l6-v2 serves the MiniLM encoder and its shipped classifiers. "
        f"Named models: {', '.join(NAMED_MODELS)}. "
        "SIGTERM lets running requests finish (up to 30 s), then exits 0.",
    )
    serve.add_argument(
        "--model",
        metavar="NAME|PATH",
        help=f"a named model ({', '.join(NAMED_MODELS)}; converted once and cached) "
        "or a local Hugging Face model folder",
    )
    serve.add_argument(
        "--adapter-root",
        metavar="DIR",
        help="folder of adapter folders (default: the adapters shipped for a named model, else none)",
    )
    serve.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the base model's `model` name (default: the model folder's name)",
    )
    serve.add_argument(
        "--chat-template",
        metavar="FILE",
        help="Jinja chat template for /v1/chat/completions (default: the tokenizer's; without "
        "either, chat is refused with a 400)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--max-served", type=positive_int, metavar="S", help="adapters kept in host memory")
    serve.add_argument(
        "--max-slots",
        type=positive_int,
        metavar="K",
        help="adapters on the model at once (distinct adapters per step)",
    )
    add_engine_flags(serve)  # --token-budget, --max-running, --kv-tokens, --device-memory-mb, ...
    serve.add_argument("--queue-bound", type=positive_int, metavar="N", help="waiting requests before 429")
    serve.add_argument(
        "--decode-attention",
        choices=DECODE_ATTENTION,
        default="auto",
        help="how decode steps read the paged KV cache on the CPU: kernel (paradapt's C++ kernel, "
        "built once per machine; needs a C++ compiler and ninja), compiled (torch.compile in place, "
        "compiled at startup; needs a C++ compiler), or gather + SDPA; auto: the first of these that "
        "works here (default: auto)",
    )
    serve.add_argument(
        "--lm-head-gemm",
        choices=LM_HEAD_GEMM,
        default="auto",
        help="how the LM head multiplies on the CPU: packed (its weight prepacked for oneDNN once, "
        "as vLLM's CPU backend does; costs a second copy of the head's weight), int8 (a head whose "
        "weights lie on a GGUF Q8_0 grid, as SmolLM2's, multiplied as int8: a quarter of the bytes), "
        "linear (F.linear), or auto: each where a measurement at startup finds it faster (default: auto)",
    )
    serve.add_argument(
        "--layer-gemm",
        choices=LAYER_GEMM,
        default="auto",
        help="how the model's other linear layers multiply a step's rows on the CPU: kernel "
        "(paradapt's C++ kernel, up to 32 rows; built once per machine, needs AVX2, a C++ compiler "
        "and ninja), packed (weights prepacked for oneDNN once, as vLLM's CPU backend keeps them; "
        "costs a second copy of the layers' weights), linear (F.linear), or auto: per weight shape "
        "and row count, whichever a measurement at startup finds faster (default: auto)",
    )
    serve.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="share the KV pages of a common prompt start (a system prompt, an instruction) between "
        "requests for the same adapter, and skip their prefill (vLLM's flag; default: on)",
    )
    serve.add_argument(
        "--switch-interval",
        type=non_negative_float,
        default=SWITCH_INTERVAL,
        metavar="SECONDS",
        help="how often Python hands the GIL between the engine thread and the HTTP event loop "
        "(sys.setswitchinterval; default 0.0002: the engine waits less for the loop, measured "
        "3.7 %% more requests/s; 0 keeps Python's 0.005)",
    )
    serve.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="torch CPU threads (default: torch's default but at most the usable cores minus one, "
        "at least 1; printed at startup)",
    )
    serve.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default="none",
        help="the base model's linear layers in this precision (CPU kernels, bf16 compute; "
        "int4: groups of 32, and smollm2-135m-instruct's comes straight from its GGUF's 4-bit "
        "blocks; the LM head stays float; default: none, float32)",
    )
    serve.add_argument(
        "--quantize-lm-head",
        choices=QUANTIZE_CHOICES,
        default="none",
        help="the LM head in this precision too (needs --quantize; int8 speeds a small model's "
        "decode at a small cost in agreement, int4 costs much more: docs/quantization.md)",
    )
    serve.add_argument(
        "--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"]
    )
    _add_security_flags(serve)
    _add_cluster_flags(serve)
    serve.set_defaults(func=run)


def _add_cluster_flags(serve) -> None:
    """``--replicas`` and its companions: Ray Serve replicas behind one port (docs/cluster.md)."""
    serve.add_argument(
        "--replicas",
        type=positive_int,
        metavar="N",
        help="run N engines as Ray Serve replicas behind this one endpoint, routed by adapter "
        "(needs the cluster extra: pip install 'paradapt[cluster]'; docs/cluster.md)",
    )
    serve.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="with --replicas: join this Ray cluster (every node must read --adapter-root and the model "
        "at the same paths) instead of starting a local Ray instance",
    )
    serve.add_argument(
        "--threads-per-replica",
        type=positive_int,
        metavar="T",
        help="with --replicas: torch threads (and Ray CPUs) per replica (default: the usable cores minus "
        "one, shared among the replicas, at least 1)",
    )
    from ..cluster.router import ROUTERS  # pure Python: no Ray import

    serve.add_argument(
        "--router",
        choices=list(ROUTERS),
        help="with --replicas: how requests pick a replica: adapter (default: sticky, residency, bounded "
        "spill, fewest adapters), multiplex (a model of Ray Serve's default multiplexing) or random; "
        "the last two are baselines (docs/cluster.md)",
    )
    serve.add_argument(
        "--placement",
        metavar="PLAN.json",
        help="with --replicas: start from the placement of `paradapt plan --replicas N --json PLAN.json`: "
        "each replica loads its adapters ahead and the router sends them there",
    )


def _add_security_flags(serve) -> None:
    """API key, Host check, body bound, access log, shutdown drain (docs/serving.md, Security)."""
    from ..serve.security import DEFAULT_MAX_REQUEST_BYTES

    serve.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("PARADAPT_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every endpoint but /health "
        "(default: $PARADAPT_API_KEY; none when unset)",
    )
    serve.add_argument(
        "--metrics-without-key", action="store_true", help="serve /metrics without the API key (for a scraper)"
    )
    serve.add_argument(
        "--allowed-hosts",
        metavar="H1,H2",
        help="Host header values accepted ('*': any; default: localhost,127.0.0.1,[::1] when --host is "
        "loopback, else any)",
    )
    serve.add_argument(
        "--max-request-bytes",
        type=positive_int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="B",
        help=f"largest request body, else 413 (default: {DEFAULT_MAX_REQUEST_BYTES})",
    )
    serve.add_argument(
        "--no-access-log", action="store_true", help="no access-log line per request (on by default, on stderr)"
    )
    serve.add_argument(
        "--request-log",
        metavar="FILE",
        help="append one trace line per finished request (its lengths, adapter, ttft, e2e, cached tokens, "
        "hashes of what its prompt shared; docs/twin.md): "
        "replay it with paradapt twin FILE or paradapt bench FILE",
    )
    serve.add_argument(
        "--request-log-no-hashes",
        action="store_true",
        help="leave the prompts' prefix hashes out of --request-log (they link requests that "
        "started alike; a replay then shares no prompt starts)",
    )
    serve.add_argument(
        "--access-log-health",
        action="store_true",
        help="log /health requests that answer 200 too (off by default: probes every few seconds)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, seconds running requests may take to finish before they are cancelled "
        "(their clients get an error / finish_reason 'abort'); default 30",
    )


def guard_config(args: argparse.Namespace):
    """The :class:`~paradapt.serve.security.GuardConfig` of the flags."""
    from ..serve.security import GuardConfig, default_allowed_hosts

    hosts = getattr(args, "allowed_hosts", None)
    if hosts is None:
        allowed = default_allowed_hosts(args.host)
    elif hosts.strip() == "*":
        allowed = None
    else:
        allowed = tuple(h.strip() for h in hosts.split(",") if h.strip())
    return GuardConfig(
        api_key=args.api_key or None,
        metrics_without_key=args.metrics_without_key,
        allowed_hosts=allowed,
        max_request_bytes=args.max_request_bytes,
        access_log=not args.no_access_log,
        access_log_health=getattr(args, "access_log_health", False),
    )


def _configure_logs(args: argparse.Namespace) -> None:
    """paradapt's log lines on stderr at --log-level; the access log at info (its own switch)."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root = logging.getLogger("paradapt")
    root.addHandler(handler)
    root.setLevel(args.log_level.upper())
    access = logging.getLogger("paradapt.access")
    access.propagate = False
    if not args.no_access_log:
        plain = logging.StreamHandler(sys.stderr)
        plain.setFormatter(logging.Formatter("%(asctime)s access %(message)s"))
        access.addHandler(plain)
        access.setLevel(logging.INFO)


def _serve_sources(args) -> tuple[Path, Path | None, str]:
    """Model folder, adapter root and the base model's served name.

    With no ``--model``: SmolLM2-135M-Instruct (:data:`DEFAULT_MODEL`). A named model is served
    under its name and, with no ``--adapter-root``, with the adapters shipped for it
    (:func:`paradapt.bundled.bundled_root`): SmolLM2's chat adapters, MiniLM's classifiers.
    """
    from ..bundled import bundled_root

    root = Path(args.adapter_root).expanduser() if args.adapter_root else None
    spec = args.model or DEFAULT_MODEL
    model_dir = resolve_model(spec)  # a name: its (cached) folder, converted on first use
    entry = named_model(spec)
    name = args.served_model_name or (entry.name if entry else model_dir.resolve().name)
    if root is None and entry is not None:
        root = bundled_root(entry.name)
    if root is not None and not root.is_dir():
        raise CLIError(f"--adapter-root: {root} is not a folder")
    if root is not None and (root / name).is_dir():
        raise CLIError(f"--served-model-name: {name!r} is also an adapter folder under {root}; rename one")
    return model_dir, root, name


def _adapter_count(root: Path | None) -> int:
    return 0 if root is None else sum(1 for p in root.iterdir() if p.is_dir())


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from the flags; the engine knobs mean what they mean to ``paradapt twin``/``plan``.

    ``--device-memory-mb`` goes to the engine whole: it sets aside ``--max-slots`` slots of the
    largest adapter under the root and gives the rest to KV pages (``serve.core.memory_split``).
    """
    base = EngineConfig()
    knobs = knobs_from_args(args)
    max_slots = args.max_slots or base.max_slots
    knobs["max_running"] = min(knobs["max_running"], knobs.get("token_budget", base.token_budget))
    return EngineConfig(
        **knobs,
        max_slots=max_slots,
        max_served=args.max_served or max(base.max_served, max_slots),
        queue_bound=args.queue_bound or base.queue_bound,
        decode_attention=getattr(args, "decode_attention", base.decode_attention),
        lm_head_gemm=getattr(args, "lm_head_gemm", base.lm_head_gemm),
        layer_gemm=getattr(args, "layer_gemm", base.layer_gemm),
        prefix_caching=getattr(args, "enable_prefix_caching", base.prefix_caching),
    )


def default_threads() -> int:
    """Torch threads for the server: torch's own default, but leaving one usable core, at least 1.

    The engine thread's torch ops share the cores with the HTTP event loop (JSON, tokenizer) and
    the clients; on a 2-core machine 1 thread serves faster than 2 (benchmarks/serve_threads.py).
    """
    return max(1, min(torch.get_num_threads(), usable_cores() - 1))


def build_server_app(args: argparse.Namespace):
    """The FastAPI app ``paradapt serve`` runs, and what it prints at startup (tests build it in-process)."""
    try:  # the HTTP layer, through the package's lazy names (whichever module holds it)
        from ..serve import EncoderEngine, Engine, create_app
    except ImportError as e:
        raise CLIError(f"serve needs fastapi and uvicorn: pip install 'paradapt[serve]' ({e})") from None
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    from ..serve.malloc import keep_freed_memory, release_freed_memory

    heap = keep_freed_memory()  # large step temporaries stay in the heap (serve/malloc.py says why)
    switch = set_switch_interval(getattr(args, "switch_interval", SWITCH_INTERVAL))  # serve/gil.py says why
    model_dir, root, name = _serve_sources(args)
    tok, model = load_base(
        args.model or DEFAULT_MODEL, getattr(args, "quantize", "none"), getattr(args, "quantize_lm_head", "none")
    )
    release_freed_memory()  # what loading freed goes back to the system, not kept for the steps
    config = engine_config(args)
    if model.can_generate():
        engine = Engine(model, root, config, tokenizer=tok)
    else:
        engine = EncoderEngine(model, root, config, pad_token_id=tok.pad_token_id)
    info = {
        "model": str(model_dir),
        "name": name,
        "kind": "decoder" if model.can_generate() else "encoder",
        "root": root,
        "adapters": _adapter_count(root),
        "config": config,
        "threads": threads,
        "heap": heap,
        "switch_interval": switch,
        "quantization": describe(quantization(model)),
        "decode_attention": getattr(engine, "decode_attention", None),
        "lm_head_gemm": getattr(engine, "lm_head_gemm", None),
        "layer_gemm": getattr(engine, "layer_gemm", None),
    }
    template = _chat_template(args)
    app = create_app(engine, model_name=name, tokenizer=tok, chat_template=template, guard=guard_config(args))
    if getattr(args, "request_log", None):
        from ..serve.request_log import RequestLog

        try:
            hashes = not getattr(args, "request_log_no_hashes", False)
            app.state.loop.metrics.request_log = RequestLog(
                args.request_log,
                base=name,
                clock=engine.clock,
                prefix_hashes=hashes,
                key=getattr(args, "request_log_key", None),  # a cluster's replicas share one
            )
        except OSError as e:
            raise CLIError(f"--request-log: cannot append to {args.request_log} ({e.strerror})") from None
    return app, info


def _chat_template(args: argparse.Namespace) -> str | None:
    """The text of ``--chat-template FILE`` (None without the flag)."""
    path = getattr(args, "chat_template", None)
    if not path:
        return None
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--chat-template: cannot read {path} ({e.__class__.__name__})") from None


def check_port(host: str, port: int) -> None:
    """Bind (host, port) once and let it go, as uvicorn will (``SO_REUSEADDR``), so that a port in
    use is a one-line error before the start banner rather than after it."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError:
        raise CLIError(f"--port: cannot listen on {host}:{port} (in use?)") from None


def draining_server(config, loop, drain: float):
    """A uvicorn server whose SIGTERM starts ``loop.drain(drain)`` at once (uvicorn is imported
    here: it is the serve extra's)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, but SIGTERM starts the engine's drain at once: uvicorn itself waits
        for open connections and then kills their handlers (a plain-text 500, streams cut
        without ``[DONE]``), and only afterwards runs the app's shutdown. Draining as the signal
        arrives lets running requests finish for ``drain`` seconds and answers the rest with an
        error in OpenAI's shape (streams: ``finish_reason: "abort"`` then ``[DONE]``)."""

        def __init__(self, config, loop, drain: float):
            super().__init__(config)
            self._loop, self._drain, self._draining = loop, drain, False

        def handle_exit(self, sig, frame) -> None:
            if not self._draining:
                self._draining = True
                threading.Thread(target=self._loop.drain, args=(self._drain,), daemon=True).start()
            super().handle_exit(sig, frame)

    return DrainingServer(config, loop, drain)


@contextlib.contextmanager
def serve_engine(engine, request_log=None, *, name: str = "base") -> Iterator[str]:
    """``engine`` behind the app ``paradapt serve`` runs (its default guard for a loopback bind),
    under uvicorn on a free 127.0.0.1 port in a thread of this process; yields the base URL and
    stops the server (draining the engine thread) on exit. ``request_log`` (anything with
    ``record(handle)`` and ``close()``) gets every finished generation, as ``--request-log``'s
    file does. ``paradapt profile --server`` measures the server through it
    (:data:`paradapt.twin.server_cost.Serve`)."""
    import uvicorn

    from ..serve import create_app
    from ..serve.process import free_port
    from ..serve.security import GuardConfig, default_allowed_hosts

    app = create_app(engine, model_name=name, guard=GuardConfig(allowed_hosts=default_allowed_hosts("127.0.0.1")))
    app.state.loop.metrics.request_log = request_log
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="paradapt-profile-http", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise CLIError(f"the in-process server did not start on 127.0.0.1:{port}")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.state.loop.shutdown()  # the lifespan did, unless the server never started


def load_base(model: str, precision: str, lm_head: str = "none"):
    """Tokenizer and base model, by name (so a damaged cache is rebuilt), with ``--quantize``'s
    precision: a named GGUF model's int4 comes from its own 4-bit blocks, anything else is
    quantised after loading; a model that cannot take it stops the server with the layer's name."""
    if lm_head != "none" and precision == "none":
        raise CLIError("--quantize-lm-head needs --quantize (the base quantised first)")
    try:
        return load_model(model, quantize=precision, lm_head=None if lm_head == "none" else lm_head)
    except QuantizationError as e:
        raise CLIError(f"--quantize {precision}: {one_line(e)}") from None


def run(args: argparse.Namespace) -> int:
    """``paradapt serve``: 0 after SIGTERM (running requests drained), 130 after SIGINT."""
    if getattr(args, "replicas", None):
        return run_cluster(args)
    alone = [f for f in ("ray_address", "threads_per_replica", "router", "placement") if getattr(args, f, None)]
    if alone:
        raise CLIError(f"--{alone[0].replace('_', '-')} needs --replicas N")
    import uvicorn

    app, info = build_server_app(args)
    check_port(args.host, args.port)
    _configure_logs(args)
    c = info["config"]
    print(
        f"paradapt serve: {info['name']} ({info['kind']}, {info['model']}); "
        f"{info['adapters']} adapters under {info['root'] or '(none)'}; "
        f"kv {c.num_blocks * c.page_size} tokens, {c.max_slots} slots, {c.max_served} served; "
        f"{info['threads']} torch threads{', large blocks kept in the heap' if info['heap'] else ''}; "
        f"GIL switch interval {info['switch_interval'] * 1e3:.2g} ms; "
        f"base weights {info['quantization']}; "
        f"{'decode attention ' + info['decode_attention'] + '; ' if info['decode_attention'] else ''}"
        f"{'LM head ' + info['lm_head_gemm'] + '; ' if info.get('lm_head_gemm') else ''}"
        f"{'layers ' + info['layer_gemm'] + '; ' if info.get('layer_gemm') else ''}"
        f"{'prefix caching ' + ('on' if c.prefix_caching else 'off') + '; ' if info['kind'] == 'decoder' else ''}"
        f"http://{args.host}:{args.port}",
        flush=True,
    )
    got: list[int] = []
    previous = {
        s: signal.signal(s, lambda sig, frame: got.append(sig)) for s in (signal.SIGTERM, signal.SIGINT)
    }
    try:  # uvicorn handles the signal (drain via the app's lifespan), then re-raises it to these handlers
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=args.shutdown_timeout + 10,  # the drain's cancellations get answered
        )
        server = draining_server(config, app.state.loop, args.shutdown_timeout)
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind (taken since check_port)
        raise CLIError(f"--port: cannot listen on {args.host}:{args.port} (in use?)") from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if app.state.loop.metrics.request_log is not None:
            app.state.loop.metrics.request_log.close()
    if signal.SIGINT in got:
        print("paradapt serve: interrupted; running requests drained", file=sys.stderr)
        return 130
    print("paradapt serve: stopped; running requests drained", file=sys.stderr)
    return 0


# -- paradapt serve --replicas N (Ray Serve; docs/cluster.md) -----------------------------------------


def replica_app(args: argparse.Namespace):
    """What each Ray replica runs to build its app: the single-process server's own app and logs.

    Module-level, so Ray pickles it by reference and the replica imports it (every node needs
    paradapt installed)."""
    _configure_logs(args)
    return build_server_app(args)


def _replica_args(args: argparse.Namespace) -> tuple[argparse.Namespace, int]:
    """The flags each replica builds its app from (its own torch threads; with ``--request-log``,
    the log's hash key, the same for every replica), and those threads."""
    threads = args.threads_per_replica or args.threads or max(1, default_threads() // args.replicas)
    one = argparse.Namespace(**vars(args))
    one.threads = threads
    if getattr(args, "request_log", None) and not getattr(args, "request_log_no_hashes", False):
        # one secret for the log all replicas append to, so their prefix hashes compare (a
        # replay links what production shared across replicas); in memory only, never written
        one.request_log_key = os.urandom(16)
    return one, threads


def _placement(args: argparse.Namespace, root: Path | None) -> tuple[tuple[str, ...], ...] | None:
    """``--placement``'s adapters per replica, each a folder under the adapter root (checked here,
    on the driver: the replicas read the same root, docs/cluster.md)."""
    if not args.placement:
        return None
    from ..cluster.placement import read_placement, unknown_adapters

    try:
        placement = read_placement(args.placement, args.replicas)
    except ConfigError as e:
        raise CLIError(f"--placement {e.message}") from None
    folders = {p.name for p in root.iterdir() if p.is_dir()} if root is not None else set()
    missing = unknown_adapters(placement, folders)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CLIError(
            f"--placement {Path(args.placement).name} places adapters with no folder under --adapter-root: "
            f"{', '.join(missing[:3])}{more}"
        )
    return placement


def _note(got: list[int], stop: threading.Event):
    """A signal handler that records the signal and wakes the waiting main thread."""

    def handler(sig, frame) -> None:
        got.append(sig)
        stop.set()

    return handler


def run_cluster(args: argparse.Namespace) -> int:
    """``paradapt serve --replicas N``: start (or join) Ray, run N replicas behind one port, wait
    for SIGTERM/SIGINT, then stop Serve and Ray (0 after SIGTERM, 130 after SIGINT)."""
    import functools

    try:  # the cluster extra; only this path imports ray
        from ..cluster.ray_serve import ClusterOptions, RayCluster
    except ImportError as e:
        raise CLIError(f"--replicas needs Ray Serve: pip install 'paradapt[cluster]' ({e})") from None
    model_dir, root, name = _serve_sources(args)  # named models convert here once, not in every replica
    one, threads = _replica_args(args)
    placement = _placement(args, root)
    if args.request_log:  # the header first, so every replica appends on its time axis
        from ..serve.request_log import start_log

        try:
            start_log(args.request_log, name)
        except OSError as e:
            raise CLIError(f"--request-log: cannot append to {args.request_log} ({e.strerror})") from None
    if args.ray_address is None:
        check_port(args.host, args.port)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report from an offline server
    options = ClusterOptions(
        replicas=args.replicas,
        host=args.host,
        port=args.port,
        address=args.ray_address,
        cpus_per_replica=float(threads),
        drain_s=args.shutdown_timeout,
        router=args.router or "adapter",
        placement=placement,
    )
    cluster = RayCluster(functools.partial(replica_app, one), options)
    got: list[int] = []
    stop = threading.Event()
    try:
        cluster.start()  # ray.init replaces the SIGTERM handler: ours go in after it
        previous = {s: signal.signal(s, _note(got, stop)) for s in (signal.SIGTERM, signal.SIGINT)}
        print(
            f"paradapt serve: {name} ({model_dir}); {_adapter_count(root)} adapters under {root or '(none)'}; "
            f"{args.replicas} Ray Serve replicas x {threads} torch threads "
            f"({'joined ' + args.ray_address if args.ray_address else 'local Ray, dashboard off'}); "
            f"http://{args.host}:{args.port}",
            flush=True,
        )
        try:
            while not stop.wait(0.5):
                pass
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    except Exception as e:  # a replica that cannot build its app fails the deployment
        raise CLIError(f"--replicas: the cluster did not start ({one_line(e)})") from None
    finally:
        cluster.stop()
    if signal.SIGINT in got:
        print("paradapt serve: interrupted; replicas stopped", file=sys.stderr)
        return 130
    print("paradapt serve: stopped; replicas drained", file=sys.stderr)
    return 0
