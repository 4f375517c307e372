"""Wiring of the generation service: :class:`~plaudit.services.common.model_server.ModelServer`
with the generation engine and servicer, the OpenAI-style HTTP API on ``http_port`` (same core,
batcher and live model, same guard), and the reward service as an optional reranker."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry

from plaudit.services.common.batching import BatchingConfig
from plaudit.services.common.errors import PlauditError
from plaudit.services.common.http import authenticator
from plaudit.services.common.model_server import ModelServer
from plaudit.services.common.security.guard import ServerSecurity
from plaudit.services.generation.access import CALL_ROLES, ROUTE_ROLES
from plaudit.services.generation.core import GenerationCore
from plaudit.services.generation.engine import GenerationEngine
from plaudit.services.generation.http import generation_http_server
from plaudit.services.generation.metrics import GenerationMetrics
from plaudit.services.generation.servicer import GenerationServicer
from plaudit.services.generation.settings import GenerationSettings
from plaudit.services.reward.client import AsyncRewardClient
from plaudit.services.runtime.policy_model import GenerateJob, GenerateResult, LoadedPolicy
from plaudit.v1 import generation_pb2, generation_pb2_grpc

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


class GenerationServer(ModelServer[LoadedPolicy, GenerateJob, GenerateResult | PlauditError]):
    """A running generation service; ``port``/``metrics_port`` are known after :meth:`start`."""

    def __init__(self, settings: GenerationSettings) -> None:
        self.metrics = GenerationMetrics(CollectorRegistry())
        engine = GenerationEngine(max_new_tokens=settings.max_new_tokens)
        security = ServerSecurity.from_settings(settings, call_roles=CALL_ROLES)
        super().__init__(
            settings,
            service_name=SERVICE_NAME,
            security=security,
            metrics=self.metrics,
            registry=settings.model_registry("policy"),
            model_cls=LoadedPolicy,
            engine=engine,
            process=engine.process,
            batching=BatchingConfig(
                max_batch_size=settings.max_batch_rows,
                max_batch_tokens=settings.max_batch_tokens,
                max_wait_s=settings.max_wait_ms / 1000.0,
                max_queue_items=settings.max_queue_items,
            ),
        )
        self.settings: GenerationSettings = settings
        self.engine: GenerationEngine = engine
        self._reward: AsyncRewardClient | None = None
        self.core = GenerationCore(engine, self.batcher, settings, self.metrics)
        self.http = generation_http_server(
            core=self.core,
            engine=engine,
            metrics=self.metrics,
            settings=settings,
            authenticate=authenticator(security.guard, ROUTE_ROLES),
            in_flight=security.guard.in_flight,
            ssl_context=security.tls.ssl_context() if security.tls else None,
        )

    @property
    def http_port(self) -> int:
        return self.http.port

    def add_servicers(self, server: grpc.aio.Server) -> None:
        if self.settings.reward_addr:  # the aio channel belongs to the running loop
            self._reward = AsyncRewardClient(
                self.settings.reward_addr,
                self.settings.reward_timeout_s,
                credentials=self.settings.credentials,
            )
        servicer = GenerationServicer(self.core, self.settings, self._reward)
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)

    async def start(self) -> None:
        """gRPC first (health NOT_SERVING until a policy is live), then HTTP beside it."""
        await super().start()
        try:
            await self.http.start()
        except BaseException:
            await super().stop(0)
            raise

    async def stop(self, grace: float | None = None) -> None:
        """HTTP stops taking requests and drains, then gRPC (see ModelServer.stop)."""
        await self.http.stop()
        await super().stop(grace)
        if self._reward is not None:
            await self._reward.close()


async def serve(settings: GenerationSettings) -> None:
    """Run the generation service until SIGTERM/SIGINT, then drain and return."""
    await GenerationServer(settings).serve()
