"""Prometheus metrics shared by every gRPC service, each service on its own registry."""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from plaudit.services.common.batching import BatchMetrics
from plaudit.services.common.registry import ModelManifest

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class GrpcMetrics:
    """Request counts, error counts and latency by method and status code."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "plaudit_grpc_requests",
            "gRPC requests handled, by method and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.errors = Counter(
            "plaudit_grpc_errors",
            "gRPC requests that ended with a status other than OK, by method and code.",
            ["method", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "plaudit_grpc_request_duration_seconds",
            "Time from receiving a request to sending its final status, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        if code != "OK":
            self.errors.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)


class MetricsHttpServer:
    """The /metrics endpoint on its own port (0 picks a free one)."""

    def __init__(self, registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._server.server_port
        log.info("metrics endpoint listening", extra={"metrics_port": self.port})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class ModelMetrics:
    """What every model service exports under ``prefix`` (e.g. ``plaudit_reward``): batching
    and the live version; services subclass it to add their own counters."""

    def __init__(self, registry: CollectorRegistry, prefix: str, what: str) -> None:
        self.registry = registry
        self.prefix = prefix
        self.batch = BatchMetrics(registry, prefix)
        self.model_info = Info(
            f"{prefix}_model",
            f"The active {what} version, by named model.",
            ["model"],
            registry=registry,
        )
        self.model_loaded = Gauge(
            f"{prefix}_model_loaded",
            f"1 when a {what} is serving, by named model.",
            ["model"],
            registry=registry,
        )

    def model_activated(self, name: str, manifest: ModelManifest) -> None:
        """Called when ``manifest``'s version of the named model ``name`` goes live; services
        export its figures here."""
