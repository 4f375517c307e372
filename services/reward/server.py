"""Wiring of the reward service: :class:`~plaudit.services.common.model_server.ModelServer` with
the reward engine and servicer, and (with ``http_port``) the HTTP front end on the same core
(:mod:`plaudit.services.reward.http`): same batcher, model snapshot, limits, metrics and keys."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry

from plaudit.services.common.batching import BatchingConfig
from plaudit.services.common.http import HttpServer, authenticator
from plaudit.services.common.model_server import ModelServer
from plaudit.services.common.security.guard import ServerSecurity
from plaudit.services.reward.access import CALL_ROLES, ROUTE_ROLES
from plaudit.services.reward.core import RewardCore
from plaudit.services.reward.engine import RewardEngine, ScoreJob, ScoreResult
from plaudit.services.reward.http import reward_http_server
from plaudit.services.reward.metrics import RewardMetrics
from plaudit.services.reward.servicer import RewardServicer
from plaudit.services.reward.settings import RewardSettings
from plaudit.services.runtime.reward_model import LoadedRewardModel
from plaudit.v1 import reward_pb2, reward_pb2_grpc

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name


class RewardServer(ModelServer[LoadedRewardModel, ScoreJob, ScoreResult]):
    """A running reward service; ``port``/``metrics_port`` are known after :meth:`start`."""

    def __init__(self, settings: RewardSettings) -> None:
        self.metrics = RewardMetrics(CollectorRegistry())
        engine = RewardEngine(group_tokens=settings.group_tokens)
        security = ServerSecurity.from_settings(settings, call_roles=CALL_ROLES)
        super().__init__(
            settings,
            service_name=SERVICE_NAME,
            security=security,
            metrics=self.metrics,
            registry=settings.model_registry("reward"),
            model_cls=LoadedRewardModel,
            engine=engine,
            process=engine.process,
            batching=BatchingConfig(
                max_batch_size=settings.max_batch_size,
                max_batch_tokens=settings.max_batch_tokens,
                max_wait_s=settings.max_wait_ms / 1000.0,
                max_queue_items=settings.max_queue_items,
            ),
        )
        self.settings: RewardSettings = settings
        self.engine: RewardEngine = engine
        self.core = RewardCore(
            engine, self.batcher, settings, self.metrics, lambda: self.watcher.last_error
        )
        self.http: HttpServer | None = None
        if settings.http_port is not None:
            self.http = reward_http_server(
                self.core,
                metrics=self.metrics,
                settings=settings,
                authenticate=authenticator(security.guard, ROUTE_ROLES),
                in_flight=security.guard.in_flight,
                ssl_context=security.tls.ssl_context() if security.tls else None,
            )

    @property
    def http_port(self) -> int | None:
        """The bound HTTP port after :meth:`start`; None without ``http_port``."""
        return None if self.http is None else self.http.port

    def add_servicers(self, server: grpc.aio.Server) -> None:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(RewardServicer(self.core), server)

    async def start(self) -> None:
        await super().start()
        if self.http is not None:
            await self.http.start()

    async def stop(self, grace: float | None = None) -> None:
        if self.http is not None:
            await self.http.stop()
        await super().stop(grace)


async def serve(settings: RewardSettings) -> None:
    """Run the reward service until SIGTERM/SIGINT, then drain and return."""
    await RewardServer(settings).serve()
