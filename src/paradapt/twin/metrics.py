"""Serving metrics of one replay, computed the same way for the twin and the real engine.

The measurement window is ``[0, T]`` with ``T = spec.duration``: requests arrive during it.

* **throughput** (tokens/s): prompt tokens done (prefilled, or served by the prefix cache)
  plus output tokens sampled by the steps that *ended* by ``T``, divided by ``T``. Partial progress counts (a request half done at
  ``T`` contributes its processed half), so overload is measured, not hidden;
* **ideal throughput**: every token of every request that arrived in the window (prompt plus
  output) divided by ``T`` (Agullo et al.);
* **starvation-free**: throughput >= 90% of the ideal (Agullo et al.'s definition);
* **requests/s**: requests finished by ``T``, divided by ``T``;
* **TTFT**: first token time minus the request's arrival time in the workload, over requests
  that got a first token before the run stopped; **TPOT**: (finish - first token) /
  (output tokens - 1) over requests that finished, with more than one output token;
* **served fraction** of an adapter: its processed tokens in the window over its offered tokens;
* **loads**: host -> device adapter loads (``disk_loads``: disk -> host, on demand or prefetched);
* **output throughput** (tokens/s): output tokens sampled by ``T``, divided by ``T``;
* **ITL** (inter-token latency): the gaps between consecutive output tokens of a request, over
  every request that got a first token (vLLM's definition);
* **goodput** (requests/s): requests finished by ``T`` whose TTFT and TPOT meet the SLOs
  (``slo_ttft``/``slo_tpot`` seconds; a missing SLO is no limit), divided by ``T``.

The load client (:mod:`paradapt.bench`) measures a server over HTTP and computes its metrics
with :func:`summarize` too, so ``paradapt bench --json`` and ``paradapt twin --json`` carry the
same keys with the same meaning.

Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .replay import ReplayLog

STARVATION_SHARE = 0.9


@dataclass
class TwinResult:
    """Metrics of one run (simulated by the twin, or measured on the real engine).

    ``sim_seconds`` is the wall time the run took (the simulation's cost in the twin, the
    window plus drain on the real engine).
    """

    throughput: float
    requests_per_s: float
    ttft_p50: float
    ttft_p90: float
    tpot_p50: float
    tpot_p90: float
    loads: int
    disk_loads: int
    served_fraction: dict[str, float]
    ideal_throughput: float
    starvation_free: bool
    sim_seconds: float
    window: float
    requests: int
    finished: int
    steps: int
    min_served_fraction: float
    output_throughput: float = 0.0
    ttft_p99: float = float("nan")
    tpot_p99: float = float("nan")
    itl_p50: float = float("nan")
    itl_p90: float = float("nan")
    itl_p99: float = float("nan")
    goodput: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def row(self) -> dict[str, float]:
        """The scalar metrics the accuracy benchmark compares."""
        return {
            "throughput": self.throughput,
            "requests_per_s": self.requests_per_s,
            "ttft_p50": self.ttft_p50,
            "ttft_p90": self.ttft_p90,
            "tpot_p50": self.tpot_p50,
            "tpot_p90": self.tpot_p90,
            "loads": float(self.loads),
        }

    def table(self) -> str:
        """A printable summary."""
        ok = "yes" if self.starvation_free else "NO"
        lines = [
            f"window              {self.window:g} s, {self.requests} requests, {self.finished} finished, {self.steps} steps",
            f"throughput          {self.throughput:.1f} tok/s  ({self.requests_per_s:.2f} req/s)",
            f"ideal throughput    {self.ideal_throughput:.1f} tok/s  -> starvation-free: {ok} "
            f"({self.throughput / self.ideal_throughput:.1%} of ideal, >= {STARVATION_SHARE:.0%} needed)"
            if self.ideal_throughput
            else "ideal throughput    0 (no requests)",
            f"TTFT p50 / p90      {self.ttft_p50:.3f} / {self.ttft_p90:.3f} s",
            f"TPOT p50 / p90      {1e3 * self.tpot_p50:.1f} / {1e3 * self.tpot_p90:.1f} ms",
            f"ITL p50 / p90 / p99 {1e3 * self.itl_p50:.1f} / {1e3 * self.itl_p90:.1f} / {1e3 * self.itl_p99:.1f} ms",
            f"output throughput   {self.output_throughput:.1f} tok/s;  goodput {self.goodput:.2f} req/s",
            f"adapter loads       {self.loads} host->device, {self.disk_loads} disk->host",
            *(
                [f"prefix cache        {self.extra['cached_input_tokens']} prompt tokens found cached"]
                if self.extra.get("cached_input_tokens")
                else []
            ),
            f"served fraction     min {self.min_served_fraction:.2f} over {len(self.served_fraction)} adapters with requests",
            f"run time            {self.sim_seconds:.3f} s",
        ]
        return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1), linear between order statistics; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(log: ReplayLog, slo_ttft: float | None = None, slo_tpot: float | None = None) -> TwinResult:
    """Metrics of a replay (see the module docstring for the definitions); ``log.steps`` in
    order of their end times."""
    T = log.window
    reqs = log.requests
    done_tokens: dict[str, int] = {}
    prompt_done: dict[str, int] = {}  # per request: prompt tokens done (events carry the running total)
    out_tokens = 0
    token_times: dict[str, list[float]] = {}
    for ev in log.steps:
        for rid in ev.sampled:
            if ev.end <= log.stop:
                token_times.setdefault(rid, []).append(ev.end)
        if ev.end > T:
            continue
        for rid, n in ev.prompt:
            done_tokens[rid] = done_tokens.get(rid, 0) + n - prompt_done.get(rid, 0)
            prompt_done[rid] = n
        for rid in ev.sampled:
            done_tokens[rid] = done_tokens.get(rid, 0) + 1
        out_tokens += len(ev.sampled)
    offered_all = log.workload.offered_tokens()
    offered: dict[str, int] = {}
    served: dict[str, int] = {}
    for r in log.workload.requests:
        offered[r.adapter] = offered.get(r.adapter, 0) + r.prompt_len + r.output_len
    for rid, n in done_tokens.items():
        a = reqs[rid].adapter
        served[a] = served.get(a, 0) + n
    fractions = {a: served.get(a, 0) / n for a, n in offered.items() if n}
    ttft = [log.first[rid] - reqs[rid].arrival for rid in log.first if log.first[rid] <= log.stop]
    tpot_of = {
        rid: (log.finished[rid] - log.first[rid]) / (reqs[rid].output_len - 1)
        for rid in log.finished
        if log.finished[rid] <= log.stop and reqs[rid].output_len > 1 and rid in log.first
    }
    tpot = list(tpot_of.values())
    itl = [b - a for times in token_times.values() for a, b in zip(times, times[1:], strict=False)]
    good = sum(
        1
        for rid, t in log.finished.items()
        if t <= T
        and rid in log.first
        and (slo_ttft is None or log.first[rid] - reqs[rid].arrival <= slo_ttft)
        and (slo_tpot is None or tpot_of.get(rid, 0.0) <= slo_tpot)
    )
    throughput = sum(done_tokens.values()) / T
    ideal = offered_all / T
    return TwinResult(
        throughput=throughput,
        requests_per_s=sum(1 for t in log.finished.values() if t <= T) / T,
        ttft_p50=percentile(ttft, 0.5),
        ttft_p90=percentile(ttft, 0.9),
        tpot_p50=percentile(tpot, 0.5),
        tpot_p90=percentile(tpot, 0.9),
        loads=log.stats.device_loads,
        disk_loads=log.stats.host_loads + log.stats.prefetch_loads,
        served_fraction=fractions,
        ideal_throughput=ideal,
        starvation_free=throughput >= STARVATION_SHARE * ideal,
        sim_seconds=log.wall_seconds,
        window=T,
        requests=len(log.workload.requests),
        finished=len(log.finished),
        steps=sum(1 for ev in log.steps if ev.end <= T),
        min_served_fraction=min(fractions.values(), default=float("nan")),
        output_throughput=out_tokens / T,
        ttft_p99=percentile(ttft, 0.99),
        tpot_p99=percentile(tpot, 0.99),
        itl_p50=percentile(itl, 0.5),
        itl_p90=percentile(itl, 0.9),
        itl_p99=percentile(itl, 0.99),
        goodput=good / T,
    )
