"""Wiring of the reward service: :class:`~plaudit.services.common.model_server.ModelServer` with
the reward engine and servicer, and (with ``http_port``) the HTTP front end on the same core
(:mod:`plaudit.services.reward.http`): same batcher, model snapshot, limits, metrics and keys."""

from __future__ import annotations

import asyncio

import grpc
from prometheus_client import CollectorRegistry

from plaudit.services.common.batching import BatchingConfig
from plaudit.services.common.errors import PlauditError
from plaudit.services.common.http import HttpServer, authenticator
from plaudit.services.common.model_server import LiveModel, ModelServer
from plaudit.services.common.security.guard import ServerSecurity
from plaudit.services.reward.access import CALL_ROLES, ROUTE_ROLES
from plaudit.services.reward.core import RewardCore
from plaudit.services.reward.engine import JobScores, RewardEngine, ScoreJob
from plaudit.services.reward.http import reward_http_server
from plaudit.services.reward.metrics import RewardMetrics
from plaudit.services.reward.objectives import load_objectives
from plaudit.services.reward.servicer import RewardServicer
from plaudit.services.reward.settings import RewardSettings
from plaudit.services.reward.shadow import ShadowScorer, ShadowStats
from plaudit.services.runtime.reward_model import LoadedRewardModel
from plaudit.v1 import reward_pb2, reward_pb2_grpc

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name


class RewardServer(ModelServer[LoadedRewardModel, ScoreJob, JobScores | PlauditError]):
    """A running reward service; ``port``/``metrics_port`` are known after :meth:`start`.

    Serves every named model of ``settings.models`` (each hot-swapped on its own), the
    objectives of ``settings.objectives`` over them, and each model's shadow when one is set."""

    def __init__(self, settings: RewardSettings) -> None:
        self.metrics = RewardMetrics(CollectorRegistry())
        names = settings.served_models()
        objectives = (
            load_objectives(settings.objectives, names) if settings.objectives else {}
        )  # validated at start: a bad file stops the service with the field named
        engine = RewardEngine(names, group_tokens=settings.group_tokens)
        security = ServerSecurity.from_settings(settings, call_roles=CALL_ROLES)
        shadows = (
            {name: LiveModel[LoadedRewardModel](f"shadow of {name!r}") for name in names}
            if settings.shadow
            else {}
        )
        super().__init__(
            settings,
            service_name=SERVICE_NAME,
            security=security,
            metrics=self.metrics,
            registries={name: settings.model_registry("reward", name) for name in names},
            model_cls=LoadedRewardModel,
            slots=engine.slots,
            shadows=shadows,
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
        self.shadow = ShadowScorer(
            engine.score_with,
            queue_size=settings.shadow_queue,
            queue_items=settings.shadow_queue_items,
            on_update=self._shadow_update,
        )
        self.core = RewardCore(
            engine,
            self.batcher,
            settings,
            self.metrics,
            lambda name: self.watchers[name].last_error,
            objectives=objectives,
            shadow=self.shadow,
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

    async def shadow_changed(self, name: str, model: LoadedRewardModel | None) -> None:
        """Install (or stop) the shadow of ``name`` with the fraction its pointer says now; a
        pointer already gone stops it (the watcher unloads it at its next check)."""
        if model is not None:
            try:
                record = await asyncio.to_thread(self.registries[name].shadow_record)
            except Exception:  # unreadable now: keep what runs; the next check tries again
                return
            if record is None or record.get("version") != model.version:
                model = None
        fraction = float(record["fraction"]) if model is not None and record else 0.0
        self.shadow.set_shadow(name, model, fraction)
        self.metrics.shadow_changed(name, self.shadow.stats.get(name))

    def _shadow_update(self, name: str, stats: ShadowStats) -> None:
        self.metrics.shadow_changed(name, stats)

    async def start(self) -> None:
        self.shadow.start()
        await super().start()
        if self.http is not None:
            await self.http.start()

    async def stop(self, grace: float | None = None) -> None:
        if self.http is not None:
            await self.http.stop()
        await super().stop(grace)
        await self.shadow.stop()


async def serve(settings: RewardSettings) -> None:
    """Run the reward service until SIGTERM/SIGINT, then drain and return."""
    await RewardServer(settings).serve()
