"""A gRPC aio server with the plumbing every Plaudit service needs.

Health (``grpc.health.v1``) starts NOT_SERVING for every service and is flipped by the owner
when it can really answer; server reflection lists every service; one interceptor (API keys,
roles, rate and in-flight limits, each method's request size and field count, see
:mod:`plaudit.services.common.security`; errors and metrics) wraps every other method; gRPC itself
bounds the request size (the largest method's), the calls open at once (``max_concurrent_rpcs``,
health and reflection included) and per connection (``max_concurrent_streams``); TLS or mutual
TLS is served when configured; ``/metrics`` is served on its own port.
:func:`wait_for_termination` turns SIGTERM/SIGINT into a graceful stop: health goes NOT_SERVING,
new calls are refused, in-flight calls finish (up to the grace period), then the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from plaudit.services.common.interceptors import ServiceInterceptor
from plaudit.services.common.metrics import GrpcMetrics, MetricsHttpServer
from plaudit.services.common.security.guard import ServerSecurity

log = logging.getLogger(__name__)


class GrpcService:
    """Owns a grpc.aio.Server plus health, reflection, interceptors and metrics endpoint.

    ``security`` (:meth:`ServerSecurity.from_settings`) is required: every server enforces it.
    """

    def __init__(
        self,
        *,
        service_names: Sequence[str],
        security: ServerSecurity,
        host: str = "0.0.0.0",
        port: int = 0,
        metrics_port: int | None = 0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.service_names = list(service_names)
        self.security = security
        self.registry = registry or CollectorRegistry()
        self.metrics = GrpcMetrics(self.registry)
        self.health = health.aio.HealthServicer()
        self._host = host
        self._requested_port = port
        self._metrics_port = metrics_port
        self._metrics_server: MetricsHttpServer | None = None
        options: list[tuple[str, Any]] = [
            # the largest request any method takes; each method's own limit is checked before
            # its request is parsed (ServiceInterceptor)
            ("grpc.max_receive_message_length", security.receive_limit),
            ("grpc.max_send_message_length", security.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        if security.max_concurrent_streams is not None:
            options.append(("grpc.max_concurrent_streams", security.max_concurrent_streams))
        if security.max_connection_age_s > 0:  # clients reconnect, re-resolving DNS
            options += [
                ("grpc.max_connection_age_ms", int(security.max_connection_age_s * 1000)),
                (
                    "grpc.max_connection_age_grace_ms",
                    int(security.max_connection_age_grace_s * 1000),
                ),
            ]
        self.server = grpc.aio.server(
            interceptors=[
                ServiceInterceptor(
                    self.metrics, security.guard, security.message_limit, security.field_limit
                )
            ],
            options=options,
            maximum_concurrent_rpcs=security.max_concurrent_rpcs,  # health included
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0
        self.metrics_port: int | None = None

    async def start(self) -> None:
        """Bind, enable reflection, report NOT_SERVING and start serving requests."""
        names = [
            *self.service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, self.server)
        address = f"{self._host}:{self._requested_port}"
        tls = self.security.tls
        if tls is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, tls.server_credentials())
        if self.port == 0:
            raise OSError(f"could not bind {self._host}:{self._requested_port}")
        await self.set_serving(False)
        await self.server.start()
        if self._metrics_port is not None:
            self._metrics_server = MetricsHttpServer(self.registry, self._metrics_port)
            self.metrics_port = self._metrics_server.port
        log.info(
            "grpc server started",
            extra={"port": self.port, "services": self.service_names, **self.security.describe()},
        )

    async def set_serving(self, serving: bool) -> None:
        """Report the truth: SERVING only when every service can answer."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Graceful stop: NOT_SERVING, refuse new calls, let in-flight calls finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        log.info("grpc server stopped", extra={"port": self.port})


async def wait_for_termination() -> None:
    """Return when the process gets SIGTERM or SIGINT (the caller then stops gracefully)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutdown requested; draining in-flight requests")
