"""Wiring of the reward service: registry -> engine -> batcher -> servicer -> gRPC server."""

from __future__ import annotations

import numpy as np
from plaudit.v1 import admin_pb2, admin_pb2_grpc, reward_pb2, reward_pb2_grpc

from services.common.admin import AdminServicer
from services.common.batching import BatchingConfig, DynamicBatcher
from services.common.hotswap import FollowedModel
from services.common.security import ServerSecurity
from services.common.server import GrpcService, wait_for_termination
from services.reward.engine import LoadedRewardModel, RewardEngine, ScoreJob, ScoreResult
from services.reward.metrics import RewardMetrics
from services.reward.servicer import RewardServicer
from services.reward.settings import RewardSettings

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
SMOKE_BATCH = (["What is the capital of France?"] * 2, ["Paris.", "I would rather not say."])


class RewardServer:
    """A running reward service; ``port``/``metrics_port`` are known after :meth:`start`."""

    def __init__(self, settings: RewardSettings) -> None:
        self.settings = settings
        self.grpc = GrpcService(
            service_names=[SERVICE_NAME, ADMIN_SERVICE_NAME],
            security=ServerSecurity.from_settings(settings),
            host=settings.host,
            port=settings.port,
            metrics_port=settings.metrics_port,
        )
        self.metrics = RewardMetrics(self.grpc.registry)
        self.engine = RewardEngine(group_tokens=settings.group_tokens)
        self.registry = settings.model_registry("reward")
        self.batcher: DynamicBatcher[ScoreJob, ScoreResult] = DynamicBatcher(
            self.engine.process,
            BatchingConfig(
                max_batch_size=settings.max_batch_size,
                max_batch_tokens=settings.max_batch_tokens,
                max_wait_s=settings.max_wait_ms / 1000.0,
                max_queue_items=settings.max_queue_items,
            ),
            metrics=self.metrics.batch,
            name="reward-batcher",
        )
        self.following = FollowedModel(
            self.registry,
            self._load_and_check,
            self.engine,
            self.grpc,
            info=self.metrics.model_info,
            loaded=self.metrics.model_loaded,
            metrics_prefix="plaudit_reward",
            poll_interval_s=settings.poll_interval_s,
        )
        self.watcher = self.following.watcher
        reward_pb2_grpc.add_RewardServiceServicer_to_server(
            RewardServicer(
                self.engine, self.batcher, settings, self.metrics, lambda: self.watcher.last_error
            ),
            self.grpc.server,
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(self.watcher), self.grpc.server
        )

    @property
    def port(self) -> int:
        return self.grpc.port

    @property
    def metrics_port(self) -> int | None:
        return self.grpc.metrics_port

    async def start(self) -> None:
        """Serve at once (health NOT_SERVING); load the promoted model and follow the registry."""
        self.batcher.start()
        await self.grpc.start()
        self.following.start()

    async def wait_until_serving(self, timeout: float) -> None:
        await self.following.wait_until_serving(timeout)

    def _load_and_check(self, version: str) -> LoadedRewardModel:
        """Load ``version`` beside the live model (hashes verified), warm it up, smoke-test it."""
        model = LoadedRewardModel.load(
            self.registry,
            version,
            precision=self.settings.precision,
            provider=self.settings.execution_provider,
            intra_op_threads=self.settings.intra_op_threads,
        )
        raw, _, _ = model.score_raw(*SMOKE_BATCH)
        if not np.all(np.isfinite(raw)):
            raise ValueError(f"version {version} scores the smoke batch as {raw.tolist()}")
        return model

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new calls, finish in-flight ones, stop the batcher."""
        await self.following.stop()
        await self.grpc.stop(self.settings.grace_period_s if grace is None else grace)
        await self.batcher.close()


async def serve(settings: RewardSettings) -> None:
    """Run the reward service until SIGTERM/SIGINT, then drain and return."""
    server = RewardServer(settings)
    await server.start()
    await wait_for_termination()
    await server.stop()
