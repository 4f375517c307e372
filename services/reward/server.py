"""Wiring of the reward service: :class:`~plaudit.services.common.model_server.ModelServer` with
the reward engine and servicer."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry

from plaudit.services.common.batching import BatchingConfig
from plaudit.services.common.model_server import ModelServer
from plaudit.services.common.security.guard import ServerSecurity
from plaudit.services.reward.access import CALL_ROLES
from plaudit.services.reward.engine import RewardEngine, ScoreJob, ScoreResult
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
        super().__init__(
            settings,
            service_name=SERVICE_NAME,
            security=ServerSecurity.from_settings(settings, call_roles=CALL_ROLES),
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

    def add_servicers(self, server: grpc.aio.Server) -> None:
        servicer = RewardServicer(
            self.engine, self.batcher, self.settings, self.metrics, lambda: self.watcher.last_error
        )
        reward_pb2_grpc.add_RewardServiceServicer_to_server(servicer, server)


async def serve(settings: RewardSettings) -> None:
    """Run the reward service until SIGTERM/SIGINT, then drain and return."""
    await RewardServer(settings).serve()
