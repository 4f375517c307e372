"""Wiring of the generation service: :class:`~plaudit.services.common.model_server.ModelServer`
with the generation backend and servicer, the OpenAI-style HTTP API on ``http_port`` (same core
and backend, same guard), and the reward service as an optional reranker.

The backend (:mod:`.backend`) is Plaudit's engine on the promoted policy (``--backend onnx``,
the default: continuous or static batcher, registry watcher, hot swap, AdminService) or an
OpenAI-compatible server (``--backend openai``: AdminService is not served; health follows the
backend's answers, see :mod:`.openai_backend`; with ``--backend-adapters vllm`` the registry's
promoted policy is loaded into it as a LoRA adapter, see :mod:`.adapters`)."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry

from plaudit.services.common.batching import BatchingConfig
from plaudit.services.common.errors import PlauditError
from plaudit.services.common.http import authenticator
from plaudit.services.common.model_server import ModelServer
from plaudit.services.common.registry import DEFAULT_MODEL_NAME
from plaudit.services.common.security.guard import ServerSecurity
from plaudit.services.generation.access import CALL_ROLES, ROUTE_ROLES
from plaudit.services.generation.backend import GenerationBackend, LiveVersion
from plaudit.services.generation.continuous import ContinuousBatcher
from plaudit.services.generation.core import GenerationCore
from plaudit.services.generation.engine import GenerationEngine, OnnxBackend
from plaudit.services.generation.http import generation_http_server
from plaudit.services.generation.metrics import GenerationMetrics
from plaudit.services.generation.openai_backend import OpenAIBackend
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
        batching = BatchingConfig(
            max_batch_size=settings.max_batch_rows,
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue_items=settings.max_queue_items,
        )
        continuous = (
            ContinuousBatcher(
                engine,
                batching,
                prefill_tokens=settings.max_prefill_tokens,
                metrics=self.metrics.batch,
            )
            if settings.batching == "continuous"
            else None
        )
        super().__init__(
            settings,
            service_name=SERVICE_NAME,
            security=security,
            metrics=self.metrics,
            registries={DEFAULT_MODEL_NAME: settings.model_registry("policy")},
            model_cls=LoadedPolicy,
            slots={DEFAULT_MODEL_NAME: engine},
            process=engine.process,
            batching=batching,
            batcher=continuous,
        )
        self.settings: GenerationSettings = settings
        self.engine: GenerationEngine = engine
        self._reward: AsyncRewardClient | None = None
        self.remote: OpenAIBackend | None = None
        backend: GenerationBackend
        if settings.backend == "openai":
            backend = self.remote = OpenAIBackend(
                settings,
                self._backend_changed,
                lambda outcome: self.metrics.backend_adapters.labels(outcome).inc(),
            )
        else:
            backend = OnnxBackend(engine, self.batcher)
        self.core = GenerationCore(backend, settings, self.metrics)
        self.http = generation_http_server(
            core=self.core,
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
        """gRPC first (health NOT_SERVING until a policy is live), then HTTP beside it. With a
        remote backend: gRPC, then the backend's first probe and its probing, then HTTP."""
        if self.remote is None:
            await super().start()
        else:
            self.add_servicers(self.grpc.server)
            await self.grpc.start()
            await self.remote.start()
        try:
            await self.http.start()
        except BaseException:
            await self.stop(0)
            raise

    async def wait_until_serving(self, timeout: float) -> None:
        if self.remote is None:
            await super().wait_until_serving(timeout)
        else:
            await self.remote.wait_ready(timeout)

    async def _backend_changed(self, live: LiveVersion | None) -> None:
        """The remote backend's version changed or it went away: health and the model gauges
        say so."""
        if live is not None:
            self.metrics.model_info.labels(DEFAULT_MODEL_NAME).info(
                {
                    "version": live.version,
                    "backbone": live.version,
                    "execution_provider": f"openai:{self.settings.backend_url}",
                    "precision": "backend",
                }
            )
        self.metrics.model_loaded.labels(DEFAULT_MODEL_NAME).set(1 if live is not None else 0)
        await self.grpc.set_serving(live is not None)

    async def stop(self, grace: float | None = None) -> None:
        """HTTP stops taking requests and drains, then gRPC (see ModelServer.stop)."""
        await self.http.stop()
        if self.remote is not None:
            await self.remote.stop_probing()
        await super().stop(grace)
        if self.remote is not None:
            await self.remote.close()
        if self._reward is not None:
            await self._reward.close()


async def serve(settings: GenerationSettings) -> None:
    """Run the generation service until SIGTERM/SIGINT, then drain and return."""
    await GenerationServer(settings).serve()
