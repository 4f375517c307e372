"""Feedback-service metrics beyond the per-RPC ones."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from plaudit.services.common.batching import BatchMetrics


class FeedbackMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.commit = BatchMetrics(registry, "plaudit_feedback_commit")
        self.events = Counter(
            "plaudit_feedback_events",
            "Feedback events by kind and outcome (accepted, duplicate, rejected).",
            ["kind", "status"],
            registry=registry,
        )
        self.commit_latency = Histogram(
            "plaudit_feedback_commit_seconds",
            "Time to validate and durably commit one write transaction.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.transaction_events = Histogram(
            "plaudit_feedback_transaction_events",
            "Events per write transaction.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 10000),
            registry=registry,
        )
        self.storage_errors = Counter(
            "plaudit_feedback_storage_errors",
            "Database operations that failed (the caller got UNAVAILABLE).",
            registry=registry,
        )
        self.database_up = Gauge(
            "plaudit_feedback_database_up",
            "1 when the last database probe answered.",
            registry=registry,
        )
        self.pairs_exported = Counter(
            "plaudit_feedback_pairs_exported", "Preference pairs streamed out.", registry=registry
        )
        self.http_requests = Counter(
            "plaudit_feedback_http_requests",
            "HTTP requests (labelling page and JSON API) by route and status.",
            ["route", "status"],
            registry=registry,
        )
        self.http_duration = Histogram(
            "plaudit_feedback_http_request_duration_seconds",
            "HTTP request handling time by route.",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
