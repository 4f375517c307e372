"""Reward-service metrics beyond the per-RPC ones."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from plaudit.services.common.calibration import heldout_figures
from plaudit.services.common.metrics import LATENCY_BUCKETS, ModelMetrics
from plaudit.services.common.registry import ModelManifest
from plaudit.services.reward.shadow import ShadowStats


class RewardMetrics(ModelMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "plaudit_reward", "reward model")
        self._live_versions: dict[str, str] = {}
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
            ["model", "version"],
            registry=registry,
        )
        self.heldout_ece = Gauge(
            "plaudit_reward_model_heldout_ece",
            "Held-out expected calibration error of the live version's Compare probabilities.",
            ["model", "version"],
            registry=registry,
        )
        self.heldout_pairs = Gauge(
            "plaudit_reward_model_heldout_pairs",
            "Held-out pairs the live version's accuracy and ECE were measured on.",
            ["model", "version"],
            registry=registry,
        )
        self.calibration_temperature = Gauge(
            "plaudit_reward_model_calibration_temperature",
            "Temperature of the live version's Compare probabilities (1: uncalibrated).",
            ["model", "version"],
            registry=registry,
        )

        self.shadow_agreement = Gauge(
            "plaudit_reward_shadow_agreement",
            "Share of item pairs the shadow version orders as the live one does, by named model "
            "and shadow version.",
            ["model", "version"],
            registry=registry,
        )
        self.shadow_pairs = Gauge(
            "plaudit_reward_shadow_pairs",
            "Item pairs both the live and the shadow version ordered.",
            ["model", "version"],
            registry=registry,
        )
        self.shadow_requests = Gauge(
            "plaudit_reward_shadow_requests",
            "Live requests the shadow version also scored.",
            ["model", "version"],
            registry=registry,
        )
        self.shadow_rank_correlation = Gauge(
            "plaudit_reward_shadow_rank_correlation",
            "Mean Spearman correlation of shadow and live rewards over multi-item Scores.",
            ["model", "version"],
            registry=registry,
        )
        self.shadow_dropped = Gauge(
            "plaudit_reward_shadow_dropped",
            "Sampled requests not shadowed because the shadow queue was full.",
            ["model", "version"],
            registry=registry,
        )
        self.shadow_reward_mean = Gauge(
            "plaudit_reward_shadow_reward_mean",
            "Mean raw reward of the shadowed items, by version scoring them (role live/shadow).",
            ["model", "version", "role"],
            registry=registry,
        )
        self.shadow_reward_std = Gauge(
            "plaudit_reward_shadow_reward_std",
            "Standard deviation of the raw rewards of the shadowed items, by role.",
            ["model", "version", "role"],
            registry=registry,
        )
        self._shadow_versions: dict[str, str] = {}

    def shadow_changed(self, name: str, stats: ShadowStats | None) -> None:
        """Export the shadow of ``name`` (None: it stopped, its series go)."""
        previous = self._shadow_versions.pop(name, None)
        plain = [self.shadow_agreement, self.shadow_pairs, self.shadow_requests,
                 self.shadow_rank_correlation, self.shadow_dropped]  # fmt: skip
        by_role = [self.shadow_reward_mean, self.shadow_reward_std]
        if previous is not None and (stats is None or stats.version != previous):
            for gauge in plain:
                with contextlib.suppress(KeyError):
                    gauge.remove(name, previous)
            for gauge in by_role:
                for role in ("live", "shadow"):
                    with contextlib.suppress(KeyError):
                        gauge.remove(name, previous, role)
        if stats is None:
            return
        self._shadow_versions[name] = stats.version
        v = stats.version
        if stats.agreement is not None:
            self.shadow_agreement.labels(name, v).set(stats.agreement)
        self.shadow_pairs.labels(name, v).set(stats.pairs)
        self.shadow_requests.labels(name, v).set(stats.requests)
        if stats.rankings:
            self.shadow_rank_correlation.labels(name, v).set(stats.correlation_sum / stats.rankings)
        self.shadow_dropped.labels(name, v).set(stats.dropped)
        for role, moments in (("live", stats.live), ("shadow", stats.shadow)):
            if moments.n:
                self.shadow_reward_mean.labels(name, v, role).set(moments.mean)
                self.shadow_reward_std.labels(name, v, role).set(moments.std)

    def model_activated(self, name: str, manifest: ModelManifest) -> None:
        """Replace the named model's previous version's figures with ``manifest``'s."""
        figures = heldout_figures(manifest)
        previous = self._live_versions.get(name)
        values = [
            (self.heldout_accuracy, figures.accuracy),
            (self.heldout_ece, figures.ece),
            (self.heldout_pairs, float(figures.pairs) if figures.pairs else None),
            (self.calibration_temperature, manifest.temperature),
        ]
        for gauge, value in values:
            if previous is not None:
                with contextlib.suppress(KeyError):
                    gauge.remove(name, previous)
            if value is not None:
                gauge.labels(name, manifest.version).set(value)
        self._live_versions[name] = manifest.version
