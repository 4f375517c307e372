"""Generation-service metrics beyond the per-RPC ones."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from services.common.batching import BatchMetrics


class GenerationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch = BatchMetrics(registry, "plaudit_generation")
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
        self.model_info = Info(
            "plaudit_generation_model", "The active policy version.", registry=registry
        )
        self.model_loaded = Gauge(
            "plaudit_generation_model_loaded", "1 when a policy is serving.", registry=registry
        )
