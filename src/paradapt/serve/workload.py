"""S-LoRA-style synthetic serving workloads, shared by the load benchmark and the digital twin.

The definition follows S-LoRA's ``benchmarks/trace.py`` (Sheng et al. 2023):

* the adapter of each request is ``floor(u * N)`` with ``u ~ Power(alpha)`` on [0, 1)
  (density ``alpha * x**(alpha - 1)``): ``alpha = 1`` is uniform popularity, small ``alpha``
  (0.1) piles the traffic onto the first adapters. Adapter ``i`` therefore gets the share
  ``((i + 1) / N)**alpha - (i / N)**alpha`` (:func:`adapter_probabilities`), which is what the
  configurator of issue 6 needs as per-adapter rates (Agullo et al. describe workloads by the
  max/min/mean/std of those rates);
* gaps between arrivals are ``Gamma(shape=1/cv**2, scale=cv**2/rate)``: mean ``1/rate``,
  coefficient of variation ``cv`` (cv = 1 is Poisson, larger is burstier);
* input and output lengths are uniform integers from inclusive ranges (S-LoRA's ``[8, 512)``
  is ``[8, 511]`` here);
* unlike S-LoRA (a fixed count ``rate * duration``), requests arrive until ``duration`` is
  reached, Agullo et al.'s "by time" window, so the offered load of the window is exact;
* ``shared_prefix`` (not in S-LoRA): the first tokens of every prompt to the same adapter are
  the same (a system prompt, a task's instruction, few-shot examples), which the engine's
  prefix cache serves without running them again; the load client and the in-process replay
  draw those tokens once per adapter (:func:`shared_prefix_ids`), the twin models the cache.

Pure Python (``random.Random``): no torch, no numpy, so the twin can import it cheaply. Each
random stream (adapter mix, arrivals) has its own generator seeded from ``seed``, so a longer
``duration`` extends a workload without changing its prefix, and the adapter ranks/kinds do
not depend on the traffic.
"""

from __future__ import annotations

import difflib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..checks import is_int, is_number, read_structured
from ..errors import ConfigError

#: Adapter kinds a workload may ask for (the core's config kinds).
KNOWN_KINDS = ("ia3", "lora", "mam", "parallel", "prefix", "series", "ssf")

REQUIRED_FIELDS = ("num_adapters", "rate", "duration")


@dataclass(frozen=True)
class AdapterSpec:
    """One synthetic adapter: its name, kind and rank (the twin sizes it from these)."""

    name: str
    kind: str
    rank: int


@dataclass(frozen=True)
class WorkloadRequest:
    """One request of a workload: which adapter (None: the base model), when, and how many tokens
    in and out; ``prompt`` holds its token ids when a trace gave them (replayed as they are);
    ``shared_prefix``: how many of its first prompt tokens every request to its adapter shares
    (0: none); ``prefix_hashes``: a request log's hashes of its first whole :data:`PREFIX_UNIT`
    token units (equal hashes, equal tokens). Both are ignored when ``prompt`` is given, whose
    own tokens say what they share."""

    id: int
    adapter: str | None
    arrival: float
    prompt_len: int
    output_len: int
    prompt: tuple[int, ...] | None = None
    shared_prefix: int = 0
    prefix_hashes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class WorkloadSpec:
    """Parameters of a synthetic workload; every field is checked on construction.

    ``ranks`` and ``kinds`` are mixes: ``{rank: weight}`` / ``{kind: weight}`` (a plain list
    means equal weights). The mix is realised exactly (largest remainder), then shuffled.
    """

    num_adapters: int
    rate: float
    duration: float
    alpha: float = 1.0
    cv: float = 1.0
    input_len: tuple[int, int] = (8, 511)
    output_len: tuple[int, int] = (8, 511)
    ranks: Mapping[int, float] = field(default_factory=lambda: {8: 1.0})
    kinds: Mapping[str, float] = field(default_factory=lambda: {"lora": 1.0})
    seed: int = 0
    max_requests: int | None = None
    adapter_prefix: str = "adapter"
    shared_prefix: int = 0

    def __post_init__(self) -> None:
        _check_int("num_adapters", self.num_adapters, minimum=1)
        _check_positive("rate", self.rate)
        _check_positive("duration", self.duration)
        _check_positive("alpha", self.alpha)
        _check_positive("cv", self.cv)
        object.__setattr__(self, "input_len", _check_range("input_len", self.input_len))
        object.__setattr__(self, "output_len", _check_range("output_len", self.output_len))
        ranks = _check_mix("ranks", self.ranks)
        for r in ranks:
            _check_int("ranks", r, minimum=1)
        object.__setattr__(self, "ranks", ranks)
        kinds = _check_mix("kinds", self.kinds)
        for k in kinds:
            if k not in KNOWN_KINDS:
                raise ConfigError("kinds", f"unknown adapter kind {k!r}; known: {list(KNOWN_KINDS)}")
        object.__setattr__(self, "kinds", kinds)
        _check_int("seed", self.seed, minimum=0)
        if self.max_requests is not None:
            _check_int("max_requests", self.max_requests, minimum=1)
        if not isinstance(self.adapter_prefix, str) or not self.adapter_prefix:
            raise ConfigError("adapter_prefix", f"must be a non-empty string, got {self.adapter_prefix!r}")
        _check_int("shared_prefix", self.shared_prefix, minimum=0)

    def __hash__(self) -> int:  # the mixes are dicts; hash a frozen view (specs key caches in the twin)
        return hash(tuple(_freeze(v) for v in self.to_dict().values()))

    # -- loading ----------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "workload") -> WorkloadSpec:
        """Build from a mapping; a missing or unknown field is an error naming it and ``source``."""
        if not isinstance(d, Mapping):
            raise ConfigError("workload", f"{source}: expected a mapping of fields, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            hint = difflib.get_close_matches(str(unknown[0]), names, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(str(unknown[0]), f"unknown workload field in {source}{extra}; known: {names}")
        for name in REQUIRED_FIELDS:
            if name not in d:
                raise ConfigError(name, f"missing required workload field in {source}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(e.field, f"{str(e).split(': ', 1)[1]} (in {source})") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> WorkloadSpec:
        """Load a YAML file holding one mapping of fields."""
        import yaml

        path = Path(path)
        data = read_structured(path, "workload", yaml.safe_load, "YAML")
        return cls.from_dict(data if data is not None else {}, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe fields (lists for ranges, dicts for mixes)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["input_len"] = list(self.input_len)
        d["output_len"] = list(self.output_len)
        d["ranks"] = dict(self.ranks)
        d["kinds"] = dict(self.kinds)
        return d

    # -- derived quantities -----------------------------------------------
    def adapter_names(self) -> list[str]:
        """Names ``<prefix>-0000 .. <prefix>-(N-1)``; index 0 is the most popular when alpha < 1."""
        width = max(4, len(str(self.num_adapters - 1)))
        return [f"{self.adapter_prefix}-{i:0{width}d}" for i in range(self.num_adapters)]

    def adapter_rates(self) -> dict[str, float]:
        """Expected requests/s of each adapter: ``rate`` times its power-law share."""
        probs = adapter_probabilities(self.num_adapters, self.alpha)
        return {n: self.rate * p for n, p in zip(self.adapter_names(), probs, strict=True)}

    def generate(self) -> Workload:
        """The workload this spec describes (same spec, same workload)."""
        return generate(self)


@dataclass(frozen=True)
class Workload:
    """A workload: the adapters and the requests, sorted by arrival, over a window of
    ``duration`` seconds (the spec's; a trace's from its header or its last arrival).

    ``spec`` is None for a workload read from a trace (:mod:`paradapt.serve.trace`).
    """

    spec: WorkloadSpec | None
    adapters: tuple[AdapterSpec, ...]
    requests: tuple[WorkloadRequest, ...]
    duration: float = 0.0

    def __post_init__(self) -> None:
        if self.spec is not None and not self.duration:
            object.__setattr__(self, "duration", float(self.spec.duration))

    def offered_tokens(self) -> int:
        """Input plus output tokens of every request (Agullo et al.'s ideal throughput x window)."""
        return sum(r.prompt_len + r.output_len for r in self.requests)

    def requests_per_adapter(self) -> dict[str, int]:
        """How many requests each adapter received (zero included)."""
        counts: dict[str | None, int] = {a.name: 0 for a in self.adapters}
        for r in self.requests:
            counts[r.adapter] = counts.get(r.adapter, 0) + 1
        return counts


def adapter_probabilities(num_adapters: int, alpha: float) -> list[float]:
    """Share of the traffic of each adapter under S-LoRA's power law (sums to 1)."""
    _check_int("num_adapters", num_adapters, minimum=1)
    _check_positive("alpha", alpha)
    n = num_adapters
    return [((i + 1) / n) ** alpha - (i / n) ** alpha for i in range(n)]


def generate(spec: WorkloadSpec) -> Workload:
    """Draw the adapters' ranks/kinds and the requests of ``spec`` (deterministic in ``spec.seed``)."""
    adapters = _draw_adapters(spec)
    names = [a.name for a in adapters]
    rng = random.Random(f"{spec.seed}:requests")
    shape = 1.0 / spec.cv**2
    scale = spec.cv**2 / spec.rate
    inv_alpha = 1.0 / spec.alpha
    requests: list[WorkloadRequest] = []
    t = 0.0
    while spec.max_requests is None or len(requests) < spec.max_requests:
        t += rng.gammavariate(shape, scale)
        if t > spec.duration:
            break
        u = rng.random() ** inv_alpha  # inverse CDF of Power(alpha): F(x) = x**alpha
        idx = min(int(u * spec.num_adapters), spec.num_adapters - 1)
        prompt_len = rng.randint(*spec.input_len)
        output_len = rng.randint(*spec.output_len)
        shared = min(spec.shared_prefix, prompt_len)
        requests.append(WorkloadRequest(len(requests), names[idx], t, prompt_len, output_len, None, shared))
    return Workload(spec, tuple(adapters), tuple(requests))


#: Prompt tokens per entry of a request log's ``prefix_hashes`` (the engine's default KV page).
PREFIX_UNIT = 16


def leading_ids(req: WorkloadRequest, seed: int | str, population: Sequence[int]) -> list[int]:
    """The first prompt ids of ``req`` that it shares with other requests: one unit per prefix
    hash (drawn from ``population`` by the hash, so equal hashes give equal ids), else its
    ``shared_prefix`` (:func:`shared_prefix_ids`), else none. The load client and the in-process
    replay add random ids for the rest of the prompt; a trace's own ``prompt`` needs none."""
    if req.prefix_hashes:
        return hash_ids(req.prefix_hashes[: req.prompt_len // PREFIX_UNIT], population)
    return shared_prefix_ids(req.adapter, min(req.shared_prefix, req.prompt_len), seed, population)


def hash_ids(hashes: Sequence[str], population: Sequence[int]) -> list[int]:
    """:data:`PREFIX_UNIT` ids per prefix hash, drawn from ``population`` by the hash: equal
    hashes give equal ids."""
    out: list[int] = []
    for h in hashes:
        out += random.Random(h).choices(population, k=PREFIX_UNIT)
    return out


def shared_prefix_ids(adapter: str | None, n: int, seed: int | str, population: Sequence[int]) -> list[int]:
    """The ``n`` prompt tokens every request to ``adapter`` starts with (its ``shared_prefix``):
    drawn from ``population`` by a generator seeded with ``seed`` and the adapter's name, so
    every request of the adapter gets the same ones and other adapters get others. The load
    client (:mod:`paradapt.bench`) and the in-process replay (:mod:`paradapt.twin.replay`) both
    build prompts with it: a request's remaining tokens are random, as before."""
    return random.Random(f"{seed}:prefix:{adapter}").choices(population, k=n) if n > 0 else []


def _draw_adapters(spec: WorkloadSpec) -> list[AdapterSpec]:
    """Assign ranks and kinds in the exact proportions of their mixes, shuffled by the seed."""
    rng = random.Random(f"{spec.seed}:adapters")
    ranks = _exact_mix(spec.ranks, spec.num_adapters, rng)
    kinds = _exact_mix(spec.kinds, spec.num_adapters, rng)
    return [AdapterSpec(n, k, r) for n, k, r in zip(spec.adapter_names(), kinds, ranks, strict=True)]


def _exact_mix(mix: Mapping[Any, float], n: int, rng: random.Random) -> list[Any]:
    """``n`` values in the proportions of ``mix`` (largest remainder), in a seeded random order."""
    total = sum(mix.values())
    quotas = {k: n * w / total for k, w in mix.items()}
    counts = {k: math.floor(q) for k, q in quotas.items()}
    by_remainder = sorted(mix, key=lambda k: (-(quotas[k] - counts[k]), list(mix).index(k)))
    for k in by_remainder[: n - sum(counts.values())]:
        counts[k] += 1
    values = [k for k in mix for _ in range(counts[k])]
    rng.shuffle(values)
    return values


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted(((k, _freeze(x)) for k, x in v.items()), key=repr))
    return tuple(v) if isinstance(v, list) else v


# -- validation helpers ---------------------------------------------------


def _check_int(name: str, v: Any, minimum: int) -> None:
    if not is_int(v) or v < minimum:
        raise ConfigError(name, f"must be an integer >= {minimum}, got {v!r}")


def _check_positive(name: str, v: Any) -> None:
    if not is_number(v) or not math.isfinite(v) or v <= 0:
        raise ConfigError(name, f"must be a positive number, got {v!r}")


def _check_range(name: str, v: Any) -> tuple[int, int]:
    """An inclusive ``[min, max]`` of token counts with ``1 <= min <= max``."""
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) != 2:
        raise ConfigError(name, f"must be a [min, max] pair of token counts, got {v!r}")
    lo, hi = v
    for x in (lo, hi):
        if not is_int(x):
            raise ConfigError(name, f"bounds must be integers, got {v!r}")
    if lo < 1 or hi < lo:
        raise ConfigError(name, f"impossible length range [{lo}, {hi}]: need 1 <= min <= max")
    return (lo, hi)


def _check_mix(name: str, v: Any) -> dict[Any, float]:
    """A ``{value: weight}`` mix (or a list of values, equal weights) with positive weights."""
    if isinstance(v, Mapping):
        mix = dict(v)
    elif isinstance(v, (list, tuple)):
        mix = {k: 1.0 for k in v}
        if len(mix) != len(v):
            raise ConfigError(name, f"repeated values in {list(v)!r}; give weights as a mapping instead")
    else:
        raise ConfigError(name, f"must be a mapping value -> weight or a list, got {v!r}")
    if not mix:
        raise ConfigError(name, "must not be empty")
    for k, w in mix.items():
        if not is_number(w) or not math.isfinite(w) or w <= 0:
            raise ConfigError(name, f"weight of {k!r} must be a positive number, got {w!r}")
    return mix
