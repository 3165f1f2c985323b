"""Request traces: one JSON object per line, one request a line, replayed by the twin and the load client.

A request line is ``{"t": seconds from the start, "adapter": name (or the base model's served
name, or null for the base), "input_len": int, "output_len": int}`` with an optional
``"prompt"`` (its token ids, ``input_len`` of them) and an optional ``"shared_prefix"`` (how
many of its first tokens every request to its adapter shares, at most ``input_len``: a system
prompt; the load client sends such prompts and the twin prices the prefix cache's hits).
A server's request log adds ``"prefix_hashes"`` (:mod:`paradapt.serve.request_log`: one keyed
hash per whole :data:`~paradapt.serve.workload.PREFIX_UNIT` prompt tokens, equal where prompts
started alike): a replay gives equal hashes equal token ids
(:func:`~paradapt.serve.workload.leading_ids`), so the twin's prefix cache and a server that
``paradapt bench`` replays the log to share what the logged server shared. Other keys are kept out of the way: a
server's request log (:mod:`paradapt.serve.request_log`) adds its measured ``ttft``, ``e2e``
and ``finish_reason`` to each line, and the log replays as it is.

An optional first line ``{"trace": {...}}`` says what a line cannot: ``window`` (the arrival
window in seconds; default: the last arrival), ``base`` (the base model's served name: its
requests run without an adapter), ``adapters`` (``{name: {"kind", "rank"}}``, for the twin's
sizes; default: LoRA rank 8 each) and ``start`` (the Unix time of ``t = 0``, in a request log).
``paradapt workload SPEC.yaml --out trace.jsonl`` writes one, so spec -> trace -> twin gives
the spec's own result.

Why a library module here (next to :mod:`.workload`): the twin, the server's request log, the
load client and the command line all read or write it, and it needs neither torch nor HTTP.
Every problem is a :class:`~paradapt.errors.ConfigError` naming the file, the line and the
field, raised before anything runs.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..checks import is_int, is_number
from ..errors import ConfigError
from ..files import write_text_atomic
from .workload import KNOWN_KINDS, PREFIX_UNIT, AdapterSpec, Workload, WorkloadRequest, WorkloadSpec

#: Fields of a request line: name -> what it must be.
REQUIRED = ("t", "adapter", "input_len", "output_len")
HEADER_KEY = "trace"
#: The header ``source`` of a server's request log: its lines come in finish order, sorted silently.
REQUEST_LOG_SOURCE = "paradapt serve"
DEFAULT_KIND, DEFAULT_RANK = "lora", 8
SUFFIXES = (".jsonl", ".ndjson")


def shapes_in(root: str | Path) -> dict[str, tuple[str, int]]:
    """Every folder under an adapter root -> ``(kind, rank)`` from its ``adapter_config.json``.

    What the twin prices a trace's adapters by when the trace's header does not say (a server's
    request log names its adapters, not their sizes). The rank is ``r``, else ``hidden_size /
    reduction_factor`` (a bottleneck given by its factor), else the prefix length, else 1 ((IA)^3,
    SSF). A folder whose config cannot be read, or of a kind the twin does not price (a
    mixture), gets the default (LoRA rank 8); the server itself says what is wrong with it.
    """
    out: dict[str, tuple[str, int]] = {}
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        out[folder.name] = _shape(folder)
    return out


def _shape(folder: Path) -> tuple[str, int]:
    from ..errors import ParadaptError
    from ..io import read_config  # here, not at the top: reading a trace needs no torch

    try:
        meta = read_config(folder)
        cfg = meta["config"]
        kind = cfg["kind"]
    except (ParadaptError, OSError, KeyError, TypeError):
        return DEFAULT_KIND, DEFAULT_RANK
    if kind not in KNOWN_KINDS:
        return DEFAULT_KIND, DEFAULT_RANK
    rank = cfg.get("r")
    if not is_int(rank):
        factor, hidden = cfg.get("reduction_factor"), (meta.get("base_model") or {}).get("hidden_size")
        rank = int(hidden / factor) if is_number(factor) and factor > 0 and is_int(hidden) else None
    if not is_int(rank):
        rank = cfg.get("num_virtual_tokens") if is_int(cfg.get("num_virtual_tokens")) else 1
    return kind, max(int(rank), 1)


def is_trace(path: str | Path) -> bool:
    """True for a trace (a ``.jsonl``/``.ndjson`` file, or one whose first non-blank character is
    ``{`` on a line of its own object); False for a YAML workload spec."""
    path = Path(path)
    if path.suffix.lower() in SUFFIXES:
        return True
    if path.suffix.lower() in (".yaml", ".yml"):
        return False
    try:
        with path.open(encoding="utf-8") as f:
            first = next((ln for ln in f if ln.strip()), "")
    except (OSError, UnicodeDecodeError):
        return False
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def load_workload(
    path: str | Path,
    *,
    adapters: Collection[str] | None = None,
    context: int | None = None,
    window: float | None = None,
) -> Workload:
    """The workload of a YAML spec (generated) or of a trace (read and checked); see :func:`read_trace`."""
    if is_trace(path):
        return read_trace(path, adapters=adapters, context=context, window=window)
    workload = WorkloadSpec.from_yaml(path).generate()
    check_requests(workload, str(path), adapters=adapters, context=context)
    return workload


# -- writing -----------------------------------------------------------------------------------------


def request_record(req: WorkloadRequest, base: str | None = None) -> dict[str, Any]:
    """One request line as a dict (base-model requests under ``base``'s name, or null)."""
    d: dict[str, Any] = {
        "t": req.arrival,
        "adapter": req.adapter if req.adapter is not None else base,
        "input_len": req.prompt_len,
        "output_len": req.output_len,
    }
    if req.prompt is not None:
        d["prompt"] = list(req.prompt)
    if req.shared_prefix:
        d["shared_prefix"] = req.shared_prefix
    if req.prefix_hashes:
        d["prefix_hashes"] = list(req.prefix_hashes)
    return d


def header_record(workload: Workload, base: str | None = None) -> dict[str, Any]:
    """The header line of ``workload``: its window and its adapters' kinds and ranks."""
    head: dict[str, Any] = {
        "window": workload.duration,
        "adapters": {a.name: {"kind": a.kind, "rank": a.rank} for a in workload.adapters},
    }
    if base is not None:
        head["base"] = base
    return {HEADER_KEY: head}


def trace_lines(workload: Workload, base: str | None = None, header: bool = True) -> Iterator[str]:
    """The lines of ``workload``'s trace (each ends with a newline)."""
    if header:
        yield json.dumps(header_record(workload, base)) + "\n"
    for req in workload.requests:
        yield json.dumps(request_record(req, base)) + "\n"


def write_trace(path: str | Path, workload: Workload, base: str | None = None, header: bool = True) -> Path:
    """Write ``workload`` as a trace, atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, "".join(trace_lines(workload, base, header)))


# -- reading -----------------------------------------------------------------------------------------


def read_trace(
    path: str | Path,
    *,
    adapters: Collection[str] | None = None,
    context: int | None = None,
    window: float | None = None,
    base: str | None = None,
) -> Workload:
    """The workload of the trace at ``path``, every line checked first.

    ``adapters``: the names a request may use (an ``--adapter-root``'s folders; None: any); a
    mapping (:func:`shapes_in`) also gives their kinds and ranks, over the header's;
    ``context``: the model's context length (input + output must fit); ``window``: overrides the
    header's; ``base``: the base model's served name (overrides the header's). Unsorted arrival
    times are sorted, with a warning naming the file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("trace", f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError("trace", f"{path}: not UTF-8 text") from None
    return parse_trace(
        text.splitlines(), str(path), adapters=adapters, context=context, window=window, base=base
    )


def parse_trace(
    lines: Iterable[str],
    source: str,
    *,
    adapters: Collection[str] | None = None,
    context: int | None = None,
    window: float | None = None,
    base: str | None = None,
) -> Workload:
    """:func:`read_trace` over lines already read (``source`` names them in errors)."""
    head: dict[str, Any] = {}
    rows: list[tuple[int, dict[str, Any]]] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError("trace", f"{source}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ConfigError("trace", f"{source}:{n}: expected a JSON object, got {type(obj).__name__}")
        if HEADER_KEY in obj:
            if rows or head:
                raise ConfigError(HEADER_KEY, f"{source}:{n}: the header line must be the first line")
            head = _check_header(obj[HEADER_KEY], f"{source}:{n}")
            continue
        rows.append((n, obj))
    base = base if base is not None else head.get("base")
    reqs = [_check_line(obj, f"{source}:{n}", base) for n, obj in rows]
    if any(b.arrival < a.arrival for a, b in zip(reqs, reqs[1:], strict=False)):
        if head.get("source") != REQUEST_LOG_SOURCE:
            warnings.warn(f"{source}: arrival times are not sorted; sorted them", stacklevel=2)
        reqs.sort(key=lambda r: r.arrival)
    if not reqs:
        raise ConfigError("trace", f"{source}: no requests")
    reqs = [
        WorkloadRequest(
            i, r.adapter, r.arrival, r.prompt_len, r.output_len, r.prompt, r.shared_prefix, r.prefix_hashes
        )
        for i, r in enumerate(reqs)
    ]
    kinds = head.get("adapters", {})
    names = list(kinds) + sorted({r.adapter for r in reqs if r.adapter is not None} - set(kinds))
    kinds = {**kinds, **(dict(adapters) if isinstance(adapters, Mapping) else {})}  # the folders win
    specs = tuple(AdapterSpec(a, *kinds.get(a, (DEFAULT_KIND, DEFAULT_RANK))) for a in names)
    duration = window if window is not None else head.get("window", reqs[-1].arrival if reqs else 0.0)
    if not (isinstance(duration, (int, float)) and math.isfinite(duration) and duration > 0):
        raise ConfigError(
            "window", f"{source}: the window must be positive (give --window S), got {duration!r}"
        )
    workload = Workload(None, specs, tuple(reqs), float(duration))
    check_requests(workload, source, adapters=adapters, context=context, lines=[n for n, _ in rows])
    return workload


def check_requests(
    workload: Workload,
    source: str,
    *,
    adapters: Collection[str] | None = None,
    context: int | None = None,
    lines: list[int] | None = None,
) -> None:
    """Requests against what is known of the server: adapter names and the model's context."""
    for i, r in enumerate(workload.requests):
        where = f"{source}:{lines[i]}" if lines else f"{source}: request {r.id}"
        if adapters is not None and r.adapter is not None and r.adapter not in adapters:
            raise ConfigError("adapter", f"{where}: unknown adapter {r.adapter!r} (not in the adapter root)")
        if context is not None and r.prompt_len + r.output_len > context:
            raise ConfigError(
                "output_len",
                f"{where}: input_len + output_len = {r.prompt_len + r.output_len} exceeds the model's "
                f"context of {context} tokens",
            )


def _check_header(head: Any, where: str) -> dict[str, Any]:
    if not isinstance(head, dict):
        raise ConfigError(HEADER_KEY, f"{where}: the header must be an object")
    out: dict[str, Any] = {}
    unknown = sorted(set(head) - {"window", "base", "adapters", "start", "source"})
    if unknown:
        raise ConfigError(
            unknown[0], f"{where}: unknown header field; known: window, base, adapters, start, source"
        )
    if "window" in head:
        w = head["window"]
        if not is_number(w) or not math.isfinite(w) or w <= 0:
            raise ConfigError("window", f"{where}: must be a positive number of seconds, got {w!r}")
        out["window"] = float(w)
    if isinstance(head.get("source"), str):
        out["source"] = head["source"]
    if head.get("base") is not None:
        if not isinstance(head["base"], str):
            raise ConfigError("base", f"{where}: must be a string, got {head['base']!r}")
        out["base"] = head["base"]
    if "adapters" in head:
        if not isinstance(head["adapters"], dict):
            raise ConfigError("adapters", f"{where}: must be an object name -> {{kind, rank}}")
        kinds = {}
        for name, a in head["adapters"].items():
            if not isinstance(a, dict):
                raise ConfigError(
                    "adapters", f"{where}: adapter {name!r} must be an object with kind and rank"
                )
            kind, rank = a.get("kind", DEFAULT_KIND), a.get("rank", DEFAULT_RANK)
            if kind not in KNOWN_KINDS:
                raise ConfigError(
                    "kind", f"{where}: adapter {name!r}: unknown kind {kind!r}; known: {list(KNOWN_KINDS)}"
                )
            if not is_int(rank) or rank < 1:
                raise ConfigError(
                    "rank", f"{where}: adapter {name!r}: rank must be an integer >= 1, got {rank!r}"
                )
            kinds[name] = (kind, rank)
        out["adapters"] = kinds
    return out


def _check_line(obj: dict[str, Any], where: str, base: str | None) -> WorkloadRequest:
    """One request line as a request (id set later); an error names the line and the field."""
    for name in REQUIRED:
        if name not in obj:
            raise ConfigError(name, f"{where}: missing field {name!r}")
    t = obj["t"]
    if not is_number(t) or not math.isfinite(t) or t < 0:
        raise ConfigError("t", f"{where}: 't' must be a finite number of seconds >= 0, got {t!r}")
    adapter = obj["adapter"]
    if adapter is not None and (not isinstance(adapter, str) or not adapter):
        raise ConfigError(
            "adapter", f"{where}: 'adapter' must be a name (or null for the base), got {adapter!r}"
        )
    for name in ("input_len", "output_len"):
        if not is_int(obj[name]) or obj[name] < 1:
            raise ConfigError(name, f"{where}: {name!r} must be an integer >= 1, got {obj[name]!r}")
    prompt = obj.get("prompt")
    if prompt is not None:
        if not isinstance(prompt, list) or not all(is_int(x) and x >= 0 for x in prompt):
            raise ConfigError("prompt", f"{where}: 'prompt' must be a list of token ids (integers >= 0)")
        if len(prompt) != obj["input_len"]:
            raise ConfigError(
                "prompt",
                f"{where}: 'prompt' has {len(prompt)} token ids but 'input_len' is {obj['input_len']}",
            )
        prompt = tuple(prompt)
    hashes = obj.get("prefix_hashes")
    if hashes is not None:
        if not isinstance(hashes, list) or not all(isinstance(h, str) and 0 < len(h) <= 64 for h in hashes):
            raise ConfigError(
                "prefix_hashes", f"{where}: 'prefix_hashes' must be a list of hash strings (1-64 characters)"
            )
        if len(hashes) > obj["input_len"] // PREFIX_UNIT:
            raise ConfigError(
                "prefix_hashes",
                f"{where}: {len(hashes)} prefix hashes for {obj['input_len']} prompt tokens "
                f"(one per whole {PREFIX_UNIT})",
            )
        hashes = tuple(hashes)
    shared = obj.get("shared_prefix", 0)
    if not is_int(shared) or not 0 <= shared <= obj["input_len"]:
        raise ConfigError(
            "shared_prefix",
            f"{where}: 'shared_prefix' must be an integer from 0 to input_len ({obj['input_len']}), "
            f"got {repr(shared)[:40]}",
        )
    name = None if adapter == base else adapter
    return WorkloadRequest(0, name, float(t), obj["input_len"], obj["output_len"], prompt, shared, hashes)
