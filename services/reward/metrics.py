"""Reward-service metrics beyond the per-RPC ones."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from plaudit.services.common.calibration import heldout_figures
from plaudit.services.common.metrics import LATENCY_BUCKETS, ModelMetrics
from plaudit.services.common.registry import ModelManifest


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
        # the live version's held-out figures, labelled by version like plaudit_reward_model_info;
        # a figure the version does not record is absent
        self.heldout_accuracy = Gauge(
            "plaudit_reward_model_heldout_accuracy",
            "Held-out preference accuracy of the live reward model version.",
            ["version"],
            registry=registry,
        )
        self.heldout_ece = Gauge(
            "plaudit_reward_model_heldout_ece",
            "Held-out expected calibration error of the live version's Compare probabilities.",
            ["version"],
            registry=registry,
        )
        self.heldout_pairs = Gauge(
            "plaudit_reward_model_heldout_pairs",
            "Held-out pairs the live version's accuracy and ECE were measured on.",
            ["version"],
            registry=registry,
        )
        self.calibration_temperature = Gauge(
            "plaudit_reward_model_calibration_temperature",
            "Temperature of the live version's Compare probabilities (1: uncalibrated).",
            ["version"],
            registry=registry,
        )

    def model_activated(self, manifest: ModelManifest) -> None:
        """Replace the previous version's figures with ``manifest``'s."""
        figures = heldout_figures(manifest)
        values = [
            (self.heldout_accuracy, figures.accuracy),
            (self.heldout_ece, figures.ece),
            (self.heldout_pairs, float(figures.pairs) if figures.pairs else None),
            (self.calibration_temperature, manifest.temperature),
        ]
        for gauge, value in values:
            gauge.clear()
            if value is not None:
                gauge.labels(manifest.version).set(value)
