"""The feedback service process: store, group-commit batcher, servicer, health that tells the truth.

Beside gRPC it serves the labelling page and a JSON API over HTTP (``http_port``) on the same
event loop, through the same store and batcher (see :mod:`plaudit.services.feedback.http`).

Health is NOT_SERVING until the database answers and its schema is migrated; a probe keeps it
honest afterwards (a database outage flips it to NOT_SERVING and back when the database returns),
while calls during an outage fail fast with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from plaudit.services.common.batching import BatchingConfig, DynamicBatcher
from plaudit.services.common.errors import PlauditError, UnavailableError
from plaudit.services.common.http import authenticator
from plaudit.services.common.security.guard import ServerSecurity
from plaudit.services.common.server import GrpcService, wait_for_termination
from plaudit.services.feedback.access import CALL_ROLES, ROUTE_ROLES
from plaudit.services.feedback.core import Outcome, commit_events
from plaudit.services.feedback.domain import FeedbackEvent
from plaudit.services.feedback.http import feedback_http_server
from plaudit.services.feedback.metrics import FeedbackMetrics
from plaudit.services.feedback.servicer import FeedbackServicer
from plaudit.services.feedback.settings import FeedbackSettings
from plaudit.services.feedback.store import FeedbackStore
from plaudit.services.feedback.tasks import TaskPicker
from plaudit.v1 import feedback_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "plaudit.v1.FeedbackService"


class FeedbackServer:
    """A running feedback service; ``port``/``metrics_port`` are known after :meth:`start`."""

    def __init__(self, settings: FeedbackSettings) -> None:
        self.settings = settings
        security = ServerSecurity.from_settings(settings, call_roles=CALL_ROLES)
        self.grpc = GrpcService(
            service_names=[SERVICE_NAME],
            security=security,
            host=settings.host,
            port=settings.port,
            metrics_port=settings.metrics_port,
        )
        self.metrics = FeedbackMetrics(self.grpc.registry)
        self.store: FeedbackStore | None = None
        self.batcher: DynamicBatcher[FeedbackEvent, Outcome] = DynamicBatcher(
            functools.partial(commit_events, self.require_store, self.metrics),
            BatchingConfig(
                max_batch_size=settings.commit_batch_size,
                max_batch_tokens=settings.commit_batch_size,
                max_wait_s=settings.commit_wait_ms / 1000.0,
                max_queue_items=settings.max_queue_items,
            ),
            metrics=self.metrics.commit,
            name="feedback-commit",
        )
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(
            FeedbackServicer(self.require_store, self.batcher, settings, self.metrics),
            self.grpc.server,
        )
        self._prober: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.database_up = False
        self.tasks = TaskPicker.from_settings(self.require_store, settings)
        self.http = feedback_http_server(
            store=self.require_store,
            batcher=self.batcher,
            picker=self.tasks,
            metrics=self.metrics,
            is_serving=lambda: self.database_up,
            settings=settings,
            authenticate=authenticator(security.guard, ROUTE_ROLES),
            in_flight=security.guard.in_flight,
            ssl_context=security.tls.ssl_context() if security.tls else None,
        )

    @property
    def port(self) -> int:
        return self.grpc.port

    @property
    def metrics_port(self) -> int | None:
        return self.grpc.metrics_port

    @property
    def http_port(self) -> int:
        return self.http.port

    def require_store(self) -> FeedbackStore:
        store = self.store
        if store is None:
            raise UnavailableError("the feedback database is not reachable yet")
        return store

    def _open_store(self) -> FeedbackStore:
        return FeedbackStore(
            self.settings.database_url,
            limits=self.settings.feedback_limits(),
            connect_timeout_s=self.settings.database_connect_timeout_s,
            rating_pairs_across_annotators=self.settings.rating_pairs_across_annotators,
            max_pairs_per_rating=self.settings.max_pairs_per_rating,
            max_rating_pairs_per_group=self.settings.max_rating_pairs_per_group,
            outlier_alpha=self.settings.outlier_alpha,
        )

    async def start(self) -> None:
        """Serve at once (health NOT_SERVING); open the database and probe it in the background."""
        self.batcher.start()
        await self.grpc.start()
        await self.http.start()
        self._prober = asyncio.get_running_loop().create_task(self._probe_forever())

    async def wait_until_serving(self, timeout: float) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def _probe_once(self) -> bool:
        try:
            if self.store is None:
                self.store = await asyncio.to_thread(self._open_store)
                log.info("feedback database ready", extra={"url": repr(self.store)})
            else:
                await asyncio.to_thread(self.store.ping)
        except PlauditError as exc:
            log.warning("feedback database unavailable", extra={"error": exc.message})
            return False
        return True

    async def _probe_forever(self) -> None:
        serving: bool | None = None
        while True:
            up = await self._probe_once()
            self.database_up = up
            self.metrics.database_up.set(1 if up else 0)
            if up != serving:
                await self.grpc.set_serving(up)
                serving = up
                if up:
                    self._ready.set()
                    log.info("serving", extra={"port": self.port})
            await asyncio.sleep(self.settings.health_interval_s)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new calls, finish in-flight ones, then close."""
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        await self.http.stop()
        await self.grpc.stop(self.settings.grace_period_s if grace is None else grace)
        await self.batcher.close()
        await self.tasks.close()
        if self.store is not None:
            self.store.close()


async def serve(settings: FeedbackSettings) -> None:
    """Run the feedback service until SIGTERM/SIGINT, then drain and return."""
    server = FeedbackServer(settings)
    await server.start()
    await wait_for_termination()
    await server.stop()
