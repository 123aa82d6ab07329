"""Prometheus metrics on a per-app :class:`CollectorRegistry` (no global state: many apps per process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _EngineCollector:
    """Scheduler counters read at scrape time (steps, rows per step, joins, rebuilds)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    _COUNTERS = (  # (metric name, help, attribute of engine.stats)
        ("llama_trt_scheduler_steps", "session.step calls made by the scheduler", "steps"),
        ("llama_trt_scheduler_rows_stepped", "active sequences summed over steps (divide by steps: mean batch)",
         "rows_stepped"),
        ("llama_trt_scheduler_joins", "steps that admitted requests into the running batch", "joins"),
        ("llama_trt_scheduler_rebuilds", "KV cache resets with re-prefill of active sequences", "rebuilds"),
        ("llama_trt_requests_cancelled", "requests freed because the client went away", "cancelled"),
    )
    _GAUGES = (  # (metric name, help, attribute of the engine)
        ("llama_trt_active_sequences", "sequences holding a decode slot", "active_count"),
        ("llama_trt_max_batch", "decode slots (--max-batch)", "max_batch"),
    )

    def collect(self):
        st = self.engine.stats
        for name, doc, attr in self._COUNTERS:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], getattr(st, attr))
            yield c
        for name, doc, attr in self._GAUGES:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], getattr(self.engine, attr))
            yield g


class Metrics:
    def __init__(self, engine) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("llama_trt_http_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("llama_trt_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("llama_trt_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("llama_trt_time_to_first_token_seconds",
                              "arrival to first sampled token (queueing + prefill)", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("llama_trt_time_per_output_token_seconds",
                              "interval between consecutive tokens of one sequence", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.e2e = Histogram("llama_trt_request_latency_seconds", "arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("llama_trt_queue_depth", "requests waiting for a decode slot", registry=r)
        self.queue_depth.set_function(lambda: engine.queue_depth)
        r.register(_EngineCollector(engine))


__all__ = ["Metrics"]
