"""Reward-service metrics beyond the per-RPC ones."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from services.common.batching import BatchMetrics


class RewardMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch = BatchMetrics(registry, "plaudit_reward")
        self.items_scored = Counter(
            "plaudit_reward_items_scored", "Items scored.", registry=registry
        )
        self.tokens_scored = Counter(
            "plaudit_reward_tokens_scored", "Real (unpadded) tokens scored.", registry=registry
        )
        self.model_info = Info(
            "plaudit_reward_model", "The active reward model version.", registry=registry
        )
        self.model_loaded = Gauge(
            "plaudit_reward_model_loaded", "1 when a reward model is serving.", registry=registry
        )
