"""The server's metrics (``GET /metrics``, Prometheus text) with ``prometheus-client``.

The engine thread (:class:`~paradapt.serve.engine_thread.EngineLoop`) feeds a
:class:`ServerMetrics` as requests run (tokens out, TTFT/TPOT histograms); everything else is
read from the engine when scraped (:class:`EngineCollector`), so :func:`prometheus_text` runs
on the engine thread, between two steps. Each app has its own registry (several servers in
one process, as the tests run them, never share counts).

Adapter residency is exported the way vLLM does, so LoRA-affinity routers built for vLLM
(llm-d, the Gateway API Inference Extension) can read it: ``paradapt:lora_requests_info``
carries vLLM's ``vllm:lora_requests_info`` labels (``running_lora_adapters``,
``waiting_lora_adapters``: comma-separated names; ``max_lora``: device slots) with the scrape
time as its value, and ``paradapt_adapters{tier=disk|host|device}`` counts the adapters each
cache tier holds. docs/serving.md lists every name.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from .engine import EncoderEngine, Engine, RequestHandle

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
    """What the engine thread counts as requests run: tokens out, their rate, TTFT and TPOT, in
    a registry of their own (:attr:`registry`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.engine_registered = False  # the engine's collector joins on the first scrape
        self.tokens_out = 0
        self.token_rate = TokenRate()
        self.request_log = None  # a serve.request_log.RequestLog (paradapt serve --request-log)
        self.ttft = Histogram(
            "paradapt_time_to_first_token_seconds", "queued to first token", buckets=BUCKETS, registry=self.registry
        )
        self.tpot = Histogram(
            "paradapt_time_per_output_token_seconds",
            "mean gap between tokens",
            buckets=BUCKETS,
            registry=self.registry,
        )

    def count_token(self) -> None:
        self.tokens_out += 1

    def end_step(self) -> None:
        """Note the running total after a step (the tokens/s gauge)."""
        self.token_rate.record(self.tokens_out)

    def observe(self, h: RequestHandle) -> None:
        """Time to first token and mean time per output token of a finished request."""
        if self.request_log is not None:
            self.request_log.record(h)
        if h.first_token_at is None or h.arrival is None:
            return
        self.ttft.observe(h.first_token_at - h.arrival)
        if len(h.tokens) > 1 and h.finished_at is not None:
            self.tpot.observe((h.finished_at - h.first_token_at) / (len(h.tokens) - 1))


class EngineCollector:
    """The engine's state as metrics, read when scraped (on the engine thread)."""

    def __init__(self, engine: Engine | EncoderEngine, m: ServerMetrics):
        self.engine, self.m = engine, m

    def collect(self):
        e, m = self.engine, self.m
        s = e.cache.stats
        yield _gauge("paradapt_queue_length", "requests waiting to be admitted", e.num_waiting)
        yield _gauge("paradapt_running_requests", "requests admitted and not finished", e.num_running)
        yield _gauge("paradapt_resident_adapters", "adapters on the device", len(e.cache.on_device))
        yield _gauge("paradapt_served_adapters", "adapters in host memory", len(e.served_adapters()))
        yield _counter("paradapt_adapter_device_loads", "adapter loads onto the device", s.device_loads)
        yield _counter(
            "paradapt_adapter_host_loads", "adapter reads into host memory", s.host_loads + s.prefetch_loads
        )
        yield _counter(
            "paradapt_adapter_evictions", "adapters evicted from device or host", s.device_evictions + s.host_evictions
        )
        yield _counter("paradapt_generated_tokens", "tokens generated", m.tokens_out)
        prefix = getattr(e, "prefix_stats", None)  # decoders only
        if prefix is not None:  # vLLM's prefix_cache_queries / prefix_cache_hits, in tokens
            yield _counter("paradapt_prefix_cache_queries", "prompt tokens looked up in the prefix cache", prefix["queries"])
            yield _counter("paradapt_prefix_cache_hits", "prompt tokens found in the prefix cache", prefix["hits"])
        yield _gauge(
            "paradapt_generation_tokens_per_second",
            f"tokens generated per second over the last {RATE_WINDOW:.0f} s",
            round(m.token_rate.rate(m.tokens_out), 3),
        )
        for op, sec in sorted(e.store.seconds.items()):
            yield _counter(f"paradapt_adapter_{op}_seconds", f"wall seconds spent in {op} moves", round(sec, 6))
        tiers = GaugeMetricFamily("paradapt_adapters", "adapters each cache tier holds", labels=["tier"])
        tiers.add_metric(["disk"], len(e.store.names()))
        tiers.add_metric(["host"], len(e.cache.on_host))
        tiers.add_metric(["device"], len(e.cache.on_device))
        yield tiers
        yield lora_requests_info(e)
        yield base_weights_info(e)


def lora_requests_info(engine: Engine | EncoderEngine) -> GaugeMetricFamily:
    """vLLM's ``vllm:lora_requests_info`` under paradapt's prefix: the adapters of running and
    of waiting requests (comma-separated, sorted) and the device slots, valued at the time."""
    running, waiting = engine.adapters_in_flight()
    info = GaugeMetricFamily(
        "paradapt:lora_requests_info",
        "Running stats on LoRA requests (vllm:lora_requests_info's labels).",
        labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
    )
    info.add_metric([str(engine.config.max_slots), ",".join(running), ",".join(waiting)], time.time())
    return info


def base_weights_info(engine: Engine | EncoderEngine) -> GaugeMetricFamily:
    """``paradapt_base_weights_info{precision="int4-g32"} 1``: how the base model's weights are
    stored (``paradapt serve --quantize``; ``none`` for float), as ``/v1/models`` says it."""
    from ..quantized import describe, quantization

    info = GaugeMetricFamily(
        "paradapt_base_weights_info", "the base model's weight precision (--quantize)", labels=["precision"]
    )
    info.add_metric([describe(quantization(engine.model))], 1)
    return info


def _gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_, value=value)


def _counter(name: str, help_: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_, value=value)


def prometheus_text(engine: Engine | EncoderEngine, m: ServerMetrics) -> str:
    """Prometheus text of ``m``'s registry plus the engine's state.

    Run it on the engine thread (``EngineLoop.call``), so it reads the engine between steps.
    """
    if not m.engine_registered:
        m.registry.register(EngineCollector(engine, m))
        m.engine_registered = True
    return generate_latest(m.registry).decode()
