"""Reward-service metrics beyond the per-RPC ones."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from plaudit.services.common.metrics import LATENCY_BUCKETS, ModelMetrics


class RewardMetrics(ModelMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "plaudit_reward", "reward model")
        self.items_scored = Counter(
            "plaudit_reward_items_scored", "Items scored.", registry=registry
        )
        self.tokens_scored = Counter(
            "plaudit_reward_tokens_scored", "Real (unpadded) tokens scored.", registry=registry
        )
        self.http_requests = Counter(
            "plaudit_reward_http_requests",
            "HTTP requests (native JSON and compatible routes) by route and status.",
            ["route", "status"],
            registry=registry,
        )
        self.http_duration = Histogram(
            "plaudit_reward_http_request_duration_seconds",
            "HTTP request handling time by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
