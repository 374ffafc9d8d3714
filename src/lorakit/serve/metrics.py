"""Prometheus metrics of a server (``prometheus_client``), fed by the engine's observer hooks.

Each server gets its own ``CollectorRegistry``, so several servers (tests) in one process do not clash.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lorakit.serve.engine import EngineObserver

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics(EngineObserver):
    """The server's metrics: request counts, tokens, latencies, batch and queue sizes, slot traffic."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorakit_requests", "Requests by model (adapter) and outcome",
                                ["model", "status"], registry=r)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("lorakit_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lorakit_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("lorakit_running_requests", "Rows in the running batch", registry=r)
        self.waiting = Gauge("lorakit_waiting_requests", "Requests queued for admission", registry=r)
        self.slots = Counter("lorakit_adapter_slot", "Adapter slot lookups by outcome (hit, miss, eviction)",
                             ["outcome"], registry=r)
        self.load_time = Histogram("lorakit_adapter_load_seconds", "Reading and checking an adapter",
                                   buckets=_LATENCY_BUCKETS, registry=r)

    def request_finished(self, model: str, status: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests.labels(model, status).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)

    def rejected(self, model: str, status: int) -> None:
        """A request refused before it reached the engine (HTTP status)."""
        self.requests.labels(model, str(status)).inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def batch(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def slot(self, outcome: str) -> None:
        self.slots.labels(outcome).inc()

    def adapter_loaded(self, seconds: float) -> None:
        self.load_time.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
