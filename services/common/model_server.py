"""One wiring for every model-serving service (reward, generation): one or more named models,
each followed in its registry and hot-swapped into its own slot (and, optionally, a shadow
candidate beside it), a dynamic batcher, the service's servicer, AdminService, health and metrics
on a :class:`~plaudit.services.common.server.GrpcService`. Kept apart from the plain gRPC server
so a service without a model (feedback) never loads ONNX Runtime.

Health turns SERVING once every named model has a live version; a shadow never affects it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Generic, TypeVar

import grpc

from plaudit.services.common.admin import AdminServicer
from plaudit.services.common.batching import Batcher, BatchingConfig, DynamicBatcher
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

    def clear(self) -> None:
        """Serve nothing (a shadow stopped); batches holding the model finish with it."""
        self._model = None

    def require_model(self) -> M:
        model = self._model
        if model is None:
            raise UnavailableError(f"no {self._what} loaded yet")
        return model


class ModelServer(Generic[M, J, R]):
    """A model service: ``slots[name]`` holds the live version of ``model_cls`` for each named
    model (hot-swapped from ``registries[name]``), ``shadows[name]`` (optional) the shadow
    candidate of that model, ``process`` runs a flushed batch of jobs on them (a
    :class:`DynamicBatcher` on ``batching``, unless the service brings its own ``batcher``).
    Health stays NOT_SERVING until every named model has a live version; ``port`` and
    ``metrics_port`` are known after :meth:`start`. Subclasses register their servicer in
    :meth:`add_servicers`."""

    def __init__(
        self,
        settings: ModelServingSettings,
        *,
        service_name: str,
        security: ServerSecurity,
        metrics: ModelMetrics,
        registries: Mapping[str, ModelRegistry],
        model_cls: type[M],
        slots: Mapping[str, LiveModel[M]],
        process: Callable[[Sequence[J]], Sequence[R]],
        batching: BatchingConfig,
        shadows: Mapping[str, LiveModel[M]] | None = None,
        batcher: Batcher[J, R] | None = None,
    ) -> None:
        if not registries or set(registries) != set(slots):
            raise ValueError("one registry per named model slot, at least one")
        self.settings = settings
        self.grpc = GrpcService(
            service_names=[service_name, ADMIN_SERVICE_NAME],
            security=security,
            host=settings.host,
            port=settings.port,
            metrics_port=settings.metrics_port,
            registry=metrics.registry,
        )
        self.registries = dict(registries)
        self.registry = next(iter(self.registries.values()))  # the first (default) model's
        self.slots = dict(slots)
        self.shadows = dict(shadows or {})
        self._model_cls = model_cls
        self.batcher: Batcher[J, R] = batcher or DynamicBatcher(
            process,
            batching,
            metrics=metrics.batch,
            name=f"{metrics.prefix.removeprefix('plaudit_')}-batcher",
        )
        self._metrics = metrics
        swap_metrics = SwapMetrics(metrics.registry, metrics.prefix)
        self.watchers: dict[str, ModelWatcher[M]] = {
            name: ModelWatcher(
                registry,
                self._loader(registry),
                self._activator(name),
                poll_interval_s=settings.poll_interval_s,
                metrics=swap_metrics,
            )
            for name, registry in self.registries.items()
        }
        self.watcher = next(iter(self.watchers.values()))  # the first (default) model's
        for name in self.registries:  # a model not loaded yet says so (alerts: no model)
            metrics.model_loaded.labels(name).set(0)
            swap_metrics.swap_failing.labels(name).set(0)
        # a shadow follows its own registry instance: its checkouts never displace the live
        # model's from the cache's protected set; one ONNX Runtime thread, beside live traffic
        self.shadow_watchers: dict[str, ModelWatcher[M]] = {}
        for name in self.shadows:
            registry = self.registries[name].named(name)
            self.shadow_watchers[name] = ModelWatcher(
                registry,
                self._loader(registry, threads=1),
                self._shadow_activator(name),
                poll_interval_s=settings.poll_interval_s,
                pointer=registry.shadow_record,
                unload=self._shadow_unloader(name),
                refresh=self._shadow_refresher(name),
            )
        self._following: list[asyncio.Task[None]] = []

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
            AdminServicer(self.watchers, self.shadow_watchers), self.grpc.server
        )
        self.batcher.start()
        await self.grpc.start()
        loop = asyncio.get_running_loop()
        for watcher in [*self.watchers.values(), *self.shadow_watchers.values()]:
            self._following.append(loop.create_task(watcher.run()))

    async def wait_until_serving(self, timeout: float) -> None:
        """Until every named model has a live version."""
        async with asyncio.timeout(timeout):
            for watcher in self.watchers.values():
                await watcher.wait_for_first_model(timeout)

    def _activator(self, name: str) -> Callable[[M], Awaitable[None]]:
        async def activate(model: M) -> None:
            """The atomic switch: batches already running keep the version they started with;
            the first version of the last named model made live turns health SERVING."""
            slot = self.slots[name]
            first = slot.model is None
            slot.set_model(model)
            self._metrics.model_info.labels(name).info(
                {
                    "version": model.version,
                    "backbone": model.manifest.backbone,
                    "execution_provider": model.provider,
                    "precision": model.precision,
                    "data_cursor": model.manifest.data_cursor or "",
                }
            )
            self._metrics.model_activated(name, model.manifest)
            self._metrics.model_loaded.labels(name).set(1)
            if first and all(s.model is not None for s in self.slots.values()):
                await self.grpc.set_serving(True)
                log.info("serving", extra={"version": model.version, "port": self.grpc.port})

        return activate

    async def shadow_changed(self, name: str, model: M | None) -> None:
        """Called after the shadow of ``name`` was loaded (``model``), re-pointed at the same
        version (new settings: ``model`` again), or unloaded (None)."""

    def _shadow_refresher(self, name: str) -> Callable[[], Awaitable[None]]:
        async def refresh() -> None:
            model = self.shadows[name].model
            if model is not None:
                await self.shadow_changed(name, model)

        return refresh

    def _shadow_activator(self, name: str) -> Callable[[M], Awaitable[None]]:
        async def activate(model: M) -> None:
            self.shadows[name].set_model(model)
            await self.shadow_changed(name, model)
            log.info("shadow live", extra={"model": name, "version": model.version})

        return activate

    def _shadow_unloader(self, name: str) -> Callable[[], Awaitable[None]]:
        async def unload() -> None:
            self.shadows[name].clear()
            await self.shadow_changed(name, None)
            log.info("shadow unloaded", extra={"model": name})

        return unload

    def _loader(self, registry: ModelRegistry, threads: int | None = None) -> Callable[[str], M]:
        def load(version: str) -> M:
            """Load ``version`` beside the live one (hashes verified), warm it up, smoke-test
            it."""
            return self._model_cls.load(
                registry,
                version,
                precision=self.settings.precision,
                provider=self.settings.execution_provider,
                intra_op_threads=threads or self.settings.intra_op_threads,
                smoke=True,
            )

        return load

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new calls, finish in-flight ones, stop the batcher."""
        for task in self._following:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._following = []
        await self.grpc.stop(self.settings.grace_period_s if grace is None else grace)
        await self.batcher.close()

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT, then drain and return."""
        await self.start()
        await wait_for_termination()
        await self.stop()
