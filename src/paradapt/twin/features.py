"""Interpretable features of a workload, the inputs of the configurator (``paradapt plan``).

Agullo et al. describe a workload by the statistics of its per-adapter request rates and of
its adapters' sizes; these are the same quantities, read off a
:class:`~paradapt.serve.workload.WorkloadSpec` without generating a single request, so a
feature vector is cheap, exact and the same for every seed of a spec. Stds are population
stds (``ddof=0``); rank statistics weigh each rank by its share of the mix (the generator
realises the mix exactly, so this is the adapters' own distribution up to rounding). Two
derived features are added: offered tokens/s, the effective number of adapters and the
expected distinct adapters in a full step of 32 requests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from ..serve.workload import KNOWN_KINDS, Workload, WorkloadSpec

#: Feature names, in the order of :func:`feature_vector` (models store them to check files).
FEATURE_NAMES: tuple[str, ...] = (
    "num_adapters",
    "rate_total",
    "rate_max",
    "rate_min",
    "rate_mean",
    "rate_std",
    "rank_max",
    "rank_min",
    "rank_mean",
    "rank_std",
    *(f"share_{k}" for k in KNOWN_KINDS),
    "input_mean",
    "output_mean",
    "cv",
    "offered_tokens",
    "effective_adapters",
    "batch_adapters",
)

#: Requests in a full step (the engine's default ``max_running``), for ``batch_adapters``.
FULL_BATCH = 32


def num_adapters(workload: WorkloadSpec | Workload) -> int:
    """The adapters of a spec, or of a workload (a trace's: the adapters its requests name)."""
    if isinstance(workload, WorkloadSpec):
        return workload.num_adapters
    return workload.spec.num_adapters if workload.spec is not None else max(1, len(workload.adapters))


def workload_features(spec: WorkloadSpec | Workload) -> dict[str, float]:
    """The features of ``spec`` by name (see :data:`FEATURE_NAMES`); a workload read from a trace
    has them measured from its requests (:func:`trace_features`)."""
    if isinstance(spec, Workload):
        if spec.spec is None:
            return trace_features(spec)
        spec = spec.spec
    rates = list(spec.adapter_rates().values())
    rank_mean, rank_std = _weighted_mean_std(spec.ranks)
    kind_total = sum(spec.kinds.values())
    feats: dict[str, float] = {
        "num_adapters": float(spec.num_adapters),
        "rate_total": float(spec.rate),
        "rate_max": max(rates),
        "rate_min": min(rates),
        "rate_mean": _mean(rates),
        "rate_std": _std(rates),
        "rank_max": float(max(spec.ranks)),
        "rank_min": float(min(spec.ranks)),
        "rank_mean": rank_mean,
        "rank_std": rank_std,
    }
    for kind in KNOWN_KINDS:
        feats[f"share_{kind}"] = spec.kinds.get(kind, 0.0) / kind_total
    feats["input_mean"] = (spec.input_len[0] + spec.input_len[1]) / 2
    feats["output_mean"] = (spec.output_len[0] + spec.output_len[1]) / 2
    feats["cv"] = float(spec.cv)
    # two derived features beyond Agullo et al.'s: the ideal throughput (tokens/s offered), and
    # how many adapters effectively share the traffic (inverse Simpson index 1 / sum p_i^2: N
    # under uniform popularity, ~1 when one adapter takes everything); slots track the latter
    feats["offered_tokens"] = spec.rate * (feats["input_mean"] + feats["output_mean"])
    feats["effective_adapters"] = spec.rate**2 / sum(r * r for r in rates)
    # expected distinct adapters among FULL_BATCH requests drawn from the popularity law: the
    # slots a full step would use, sum_i 1 - (1 - p_i)^32
    feats["batch_adapters"] = sum(1 - (1 - r / spec.rate) ** FULL_BATCH for r in rates)
    return feats


def trace_features(workload: Workload) -> dict[str, float]:
    """The features of a trace, measured: per-adapter rates are request counts over the window,
    ranks and kinds each adapter's, lengths their means, ``cv`` that of the gaps between
    arrivals (the first counted from 0), so a trace written from a spec has features close to
    the spec's."""
    reqs = workload.requests
    window = workload.duration
    counts = workload.requests_per_adapter()
    rates = [counts.get(a.name, 0) / window for a in workload.adapters] or [len(reqs) / window]
    rate = len(reqs) / window
    ranks = [a.rank for a in workload.adapters] or [0]
    arrivals = [0.0, *(r.arrival for r in reqs)]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    gap_mean = _mean(gaps) if gaps else 0.0
    feats: dict[str, float] = {
        "num_adapters": float(num_adapters(workload)),
        "rate_total": rate,
        "rate_max": max(rates),
        "rate_min": min(rates),
        "rate_mean": _mean(rates),
        "rate_std": _std(rates),
        "rank_max": float(max(ranks)),
        "rank_min": float(min(ranks)),
        "rank_mean": _mean(ranks),
        "rank_std": _std(ranks),
    }
    kinds = [a.kind for a in workload.adapters]
    for kind in KNOWN_KINDS:
        feats[f"share_{kind}"] = kinds.count(kind) / len(kinds) if kinds else 0.0
    feats["input_mean"] = _mean(r.prompt_len for r in reqs) if reqs else 0.0
    feats["output_mean"] = _mean(r.output_len for r in reqs) if reqs else 0.0
    feats["cv"] = _std(gaps) / gap_mean if gap_mean > 0 else 1.0
    feats["offered_tokens"] = rate * (feats["input_mean"] + feats["output_mean"])
    square = sum(r * r for r in rates)
    feats["effective_adapters"] = rate**2 / square if square else 1.0
    feats["batch_adapters"] = sum(1 - (1 - r / rate) ** FULL_BATCH for r in rates) if rate else 0.0
    return feats


def feature_vector(spec: WorkloadSpec | Workload) -> list[float]:
    """The features of ``spec`` as a list in :data:`FEATURE_NAMES` order (one model input row)."""
    feats = workload_features(spec)
    return [feats[name] for name in FEATURE_NAMES]


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _std(xs: Iterable[float]) -> float:
    xs = list(xs)
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def _weighted_mean_std(mix: Mapping[int, float]) -> tuple[float, float]:
    """Mean and std of the values of a ``{value: weight}`` mix."""
    total = sum(mix.values())
    mean = sum(v * w for v, w in mix.items()) / total
    var = sum(w * (v - mean) ** 2 for v, w in mix.items()) / total
    return mean, math.sqrt(var)
