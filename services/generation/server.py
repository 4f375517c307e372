"""Wiring of the generation service: registry -> engine -> batcher -> servicer -> gRPC server,
with the reward service as an optional reranker."""

from __future__ import annotations

from plaudit.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc

from services.common.admin import AdminServicer
from services.common.batching import BatchingConfig, DynamicBatcher
from services.common.errors import PlauditError
from services.common.hotswap import FollowedModel
from services.common.security import ServerSecurity
from services.common.server import GrpcService, wait_for_termination
from services.generation.engine import (
    GenerateJob,
    GenerateResult,
    GenerationEngine,
    LoadedPolicy,
)
from services.generation.metrics import GenerationMetrics
from services.generation.rerank import RewardScorer
from services.generation.servicer import GenerationServicer
from services.generation.settings import GenerationSettings

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


class GenerationServer:
    """A running generation service; ``port``/``metrics_port`` are known after :meth:`start`."""

    def __init__(self, settings: GenerationSettings) -> None:
        self.settings = settings
        self.grpc = GrpcService(
            service_names=[SERVICE_NAME, ADMIN_SERVICE_NAME],
            security=ServerSecurity.from_settings(settings),
            host=settings.host,
            port=settings.port,
            metrics_port=settings.metrics_port,
        )
        self.metrics = GenerationMetrics(self.grpc.registry)
        self.engine = GenerationEngine(max_new_tokens=settings.max_new_tokens)
        self.registry = settings.model_registry("policy")
        self.batcher: DynamicBatcher[GenerateJob, GenerateResult | PlauditError] = DynamicBatcher(
            self.engine.process,
            BatchingConfig(
                max_batch_size=settings.max_batch_rows,
                max_batch_tokens=settings.max_batch_tokens,
                max_wait_s=settings.max_wait_ms / 1000.0,
                max_queue_items=settings.max_queue_items,
            ),
            metrics=self.metrics.batch,
            name="generation-batcher",
        )
        self.following = FollowedModel(
            self.registry,
            self._load_and_check,
            self.engine,
            self.grpc,
            info=self.metrics.model_info,
            loaded=self.metrics.model_loaded,
            metrics_prefix="plaudit_generation",
            poll_interval_s=settings.poll_interval_s,
        )
        self.watcher = self.following.watcher
        self._reward: RewardScorer | None = None

    @property
    def port(self) -> int:
        return self.grpc.port

    @property
    def metrics_port(self) -> int | None:
        return self.grpc.metrics_port

    async def start(self) -> None:
        """Serve at once (health NOT_SERVING); load the promoted policy and follow the registry."""
        if self.settings.reward_addr:  # the aio channel belongs to the running loop
            self._reward = RewardScorer(
                self.settings.reward_addr,
                self.settings.reward_timeout_s,
                credentials=self.settings.credentials,
            )
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(
                self.engine, self.batcher, self.settings, self.metrics, self._reward
            ),
            self.grpc.server,
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(self.watcher), self.grpc.server
        )
        self.batcher.start()
        await self.grpc.start()
        self.following.start()

    async def wait_until_serving(self, timeout: float) -> None:
        await self.following.wait_until_serving(timeout)

    def _load_and_check(self, version: str) -> LoadedPolicy:
        """Load ``version`` beside the live policy (hashes verified) and smoke-test it."""
        model = LoadedPolicy.load(
            self.registry,
            version,
            precision=self.settings.precision,
            provider=self.settings.execution_provider,
            intra_op_threads=self.settings.intra_op_threads,
        )
        model.smoke_test()
        return model

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new calls, finish in-flight ones, stop the batcher."""
        await self.following.stop()
        await self.grpc.stop(self.settings.grace_period_s if grace is None else grace)
        await self.batcher.close()
        if self._reward is not None:
            await self._reward.close()


async def serve(settings: GenerationSettings) -> None:
    """Run the generation service until SIGTERM/SIGINT, then drain and return."""
    server = GenerationServer(settings)
    await server.start()
    await wait_for_termination()
    await server.stop()
