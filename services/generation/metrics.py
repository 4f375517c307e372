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
        self.time_to_first_token = Histogram(
            "plaudit_generation_time_to_first_token_seconds",
            "Per request: from its arrival at the core to its first sampled token (queue wait "
            "and prefill included).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.request_tokens_per_second = Histogram(
            "plaudit_generation_request_tokens_per_second",
            "Per request: tokens generated after each completion's first, over the time from "
            "the first token to the last (the decode rate the caller saw).",
            buckets=(1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000),
            registry=registry,
        )
        self.backend_adapters = Counter(
            "plaudit_generation_backend_adapter_operations",
            "LoRA adapter operations at an OpenAI-compatible backend (--backend-adapters), by "
            "outcome: loaded, unloaded, failed (retried next poll), refused (the version cannot "
            "be served as an adapter).",
            ["outcome"],
            registry=registry,
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
