"""Reward-service metrics beyond the per-RPC ones."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from plaudit.services.common.metrics import ModelMetrics


class RewardMetrics(ModelMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "plaudit_reward", "reward model")
        self.items_scored = Counter(
            "plaudit_reward_items_scored", "Items scored.", registry=registry
        )
        self.tokens_scored = Counter(
            "plaudit_reward_tokens_scored", "Real (unpadded) tokens scored.", registry=registry
        )
