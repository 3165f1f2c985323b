"""The server's metrics: token counts, a tokens/s gauge, TTFT/TPOT histograms, and their
Prometheus text (``GET /metrics``), in plain Python (no client library).

The engine thread (:class:`~paradapt.serve.engine_thread.EngineLoop`) feeds a
:class:`ServerMetrics` as requests run; :func:`prometheus_text` reads it and the engine's public
counters between two steps.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import EncoderEngine, Engine, RequestHandle


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count) in plain Python."""

    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_, buckets
        self.counts = [0] * len(buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def text(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        lines += [
            f'{self.name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)
        ]
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum}"]
        lines.append(f"{self.name}_count {self.count}")
        return "\n".join(lines) + "\n"


BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW = 10.0  # seconds over which the tokens/s gauge averages


class TokenRate:
    """Generated tokens per second over the last ``window`` seconds (a gauge that decays when idle)."""

    def __init__(self, window: float = RATE_WINDOW, clock=time.monotonic):
        self.window, self.clock = window, clock
        self.started = clock()
        self.points: collections.deque[tuple[float, int]] = collections.deque([(self.started, 0)])

    def record(self, total: int) -> None:
        """Note the running total after a step; keeps one point older than the window as its anchor."""
        now = self.clock()
        self.points.append((now, total))
        while len(self.points) > 1 and self.points[1][0] <= now - self.window:
            self.points.popleft()

    def rate(self, total: int) -> float:
        now = self.clock()
        start = max(now - self.window, self.started)
        anchor = 0
        for t, n in self.points:  # the last total recorded at or before the window's start
            if t > start:
                break
            anchor = n
        return (total - anchor) / (now - start) if now > start else 0.0


class ServerMetrics:
    """What the engine thread counts as requests run: tokens out, their rate, TTFT and TPOT."""

    def __init__(self) -> None:
        self.tokens_out = 0
        self.token_rate = TokenRate()
        self.ttft = Histogram("paradapt_time_to_first_token_seconds", "queued to first token", BUCKETS)
        self.tpot = Histogram("paradapt_time_per_output_token_seconds", "mean gap between tokens", BUCKETS)

    def count_token(self) -> None:
        self.tokens_out += 1

    def end_step(self) -> None:
        """Note the running total after a step (the tokens/s gauge)."""
        self.token_rate.record(self.tokens_out)

    def observe(self, h: RequestHandle) -> None:
        """Time to first token and mean time per output token of a finished request."""
        if h.first_token_at is None or h.arrival is None:
            return
        self.ttft.observe(h.first_token_at - h.arrival)
        if len(h.tokens) > 1 and h.finished_at is not None:
            self.tpot.observe((h.finished_at - h.first_token_at) / (len(h.tokens) - 1))


def prometheus_text(engine: Engine | EncoderEngine, m: ServerMetrics) -> str:
    """Prometheus text: queue, running, adapters resident/served, loads, tokens out.

    Run it on the engine thread (``EngineLoop.call``), so it reads the engine between steps.
    """
    s = engine.cache.stats
    rows = [
        ("paradapt_queue_length", "gauge", engine.num_waiting),
        ("paradapt_running_requests", "gauge", engine.num_running),
        ("paradapt_resident_adapters", "gauge", len(engine.cache.on_device)),
        ("paradapt_served_adapters", "gauge", len(engine.served_adapters())),
        ("paradapt_adapter_device_loads_total", "counter", s.device_loads),
        ("paradapt_adapter_host_loads_total", "counter", s.host_loads + s.prefetch_loads),
        ("paradapt_adapter_evictions_total", "counter", s.device_evictions + s.host_evictions),
        ("paradapt_generated_tokens_total", "counter", m.tokens_out),
        ("paradapt_generation_tokens_per_second", "gauge", round(m.token_rate.rate(m.tokens_out), 3)),
        *(
            (f"paradapt_adapter_{op}_seconds_total", "counter", round(sec, 6))
            for op, sec in sorted(engine.store.seconds.items())
        ),
    ]
    hist = m.ttft.text() + m.tpot.text()
    return "".join(f"# TYPE {n} {t}\n{n} {v}\n" for n, t, v in rows) + hist
