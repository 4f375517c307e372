"""One wiring for every model-serving service (reward, generation): a registry, the hot-swapped
live model, a dynamic batcher, the service's servicer, AdminService, health and metrics on a
:class:`~plaudit.services.common.server.GrpcService`. Kept apart from the plain gRPC server so a
service without a model (feedback) never loads ONNX Runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import grpc

from plaudit.services.common.admin import AdminServicer
from plaudit.services.common.batching import BatchingConfig, DynamicBatcher
from plaudit.services.common.errors import UnavailableError
from plaudit.services.common.hotswap import ModelWatcher, SwapMetrics
from plaudit.services.common.metrics import ModelMetrics
from plaudit.services.common.onnx_runtime import OnnxModel
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.common.security.guard import ServerSecurity
from plaudit.services.common.server import GrpcService, wait_for_termination
from plaudit.services.common.settings import ModelServingSettings
from plaudit.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
M = TypeVar("M", bound=OnnxModel)
J = TypeVar("J")
R = TypeVar("R")


class LiveModel(Generic[M]):
    """The model version a process serves now. Swapping is one reference assignment, so a batch
    that took :meth:`require_model` keeps the version it started with until it finishes."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._model: M | None = None

    @property
    def model(self) -> M | None:
        return self._model

    def set_model(self, model: M) -> None:
        """Make ``model`` live."""
        self._model = model

    def require_model(self) -> M:
        model = self._model
        if model is None:
            raise UnavailableError(f"no {self._what} loaded yet")
        return model


class ModelServer(Generic[M, J, R]):
    """A model service: ``engine`` holds the live version of ``model_cls`` (hot-swapped from
    ``registry``), ``process`` runs a flushed batch of jobs on it. Health stays NOT_SERVING until
    the first version is live; ``port``/``metrics_port`` are known after :meth:`start`.
    Subclasses register their servicer in :meth:`add_servicers`."""

    def __init__(
        self,
        settings: ModelServingSettings,
        *,
        service_name: str,
        security: ServerSecurity,
        metrics: ModelMetrics,
        registry: ModelRegistry,
        model_cls: type[M],
        engine: LiveModel[M],
        process: Callable[[Sequence[J]], Sequence[R]],
        batching: BatchingConfig,
    ) -> None:
        self.settings = settings
        self.grpc = GrpcService(
            service_names=[service_name, ADMIN_SERVICE_NAME],
            security=security,
            host=settings.host,
            port=settings.port,
            metrics_port=settings.metrics_port,
            registry=metrics.registry,
        )
        self.registry = registry
        self.engine = engine
        self._model_cls = model_cls
        self.batcher: DynamicBatcher[J, R] = DynamicBatcher(
            process,
            batching,
            metrics=metrics.batch,
            name=f"{metrics.prefix.removeprefix('plaudit_')}-batcher",
        )
        self._metrics = metrics
        self.watcher: ModelWatcher[M] = ModelWatcher(
            registry,
            self._load_and_check,
            self._activate,
            poll_interval_s=settings.poll_interval_s,
            metrics=SwapMetrics(metrics.registry, metrics.prefix),
        )
        self._following: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return self.grpc.port

    @property
    def metrics_port(self) -> int | None:
        return self.grpc.metrics_port

    def add_servicers(self, server: grpc.aio.Server) -> None:
        """Register the service's own servicer (called by :meth:`start`, inside the loop)."""
        raise NotImplementedError

    async def start(self) -> None:
        """Serve at once (health NOT_SERVING); load the promoted version and follow the registry."""
        self.add_servicers(self.grpc.server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(self.watcher), self.grpc.server
        )
        self.batcher.start()
        await self.grpc.start()
        self._following = asyncio.get_running_loop().create_task(self.watcher.run())

    async def wait_until_serving(self, timeout: float) -> None:
        await self.watcher.wait_for_first_model(timeout)

    async def _activate(self, model: M) -> None:
        """The atomic switch: batches already running keep the version they started with; the
        first version made live turns health SERVING."""
        first = self.engine.model is None
        self.engine.set_model(model)
        self._metrics.model_info.info(
            {
                "version": model.version,
                "backbone": model.manifest.backbone,
                "execution_provider": model.provider,
                "precision": model.precision,
                "data_cursor": model.manifest.data_cursor or "",
            }
        )
        self._metrics.model_activated(model.manifest)
        self._metrics.model_loaded.set(1)
        if first:
            await self.grpc.set_serving(True)
            log.info("serving", extra={"version": model.version, "port": self.grpc.port})

    def _load_and_check(self, version: str) -> M:
        """Load ``version`` beside the live one (hashes verified), warm it up, smoke-test it."""
        return self._model_cls.load(
            self.registry,
            version,
            precision=self.settings.precision,
            provider=self.settings.execution_provider,
            intra_op_threads=self.settings.intra_op_threads,
            smoke=True,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new calls, finish in-flight ones, stop the batcher."""
        if self._following is not None:
            self._following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._following
        await self.grpc.stop(self.settings.grace_period_s if grace is None else grace)
        await self.batcher.close()

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT, then drain and return."""
        await self.start()
        await wait_for_termination()
        await self.stop()
