"""Generation-service metrics beyond the per-RPC ones."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from plaudit.services.common.metrics import LATENCY_BUCKETS, ModelMetrics


class GenerationMetrics(ModelMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "plaudit_generation", "policy")
        self.completions = Counter(
            "plaudit_generation_completions",
            "Completions generated, by finish reason.",
            ["finish_reason"],
            registry=registry,
        )
        self.tokens_generated = Counter(
            "plaudit_generation_tokens_generated", "Tokens generated.", registry=registry
        )
        self.prompt_tokens = Counter(
            "plaudit_generation_prompt_tokens", "Prompt tokens prefilled.", registry=registry
        )
        self.reranked = Counter(
            "plaudit_generation_reranked_requests",
            "Requests whose completions were scored by the reward service.",
            registry=registry,
        )
        self.http_requests = Counter(
            "plaudit_generation_http_requests",
            "HTTP requests (the OpenAI-style API) by route and status.",
            ["route", "status"],
            registry=registry,
        )
        self.http_duration = Histogram(
            "plaudit_generation_http_request_duration_seconds",
            "HTTP request handling time by route (a stream: until its last event).",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
