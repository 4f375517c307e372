"""HTTP beside gRPC: the labelling page and a JSON API over the same store, batcher and checks.

Routes (JSON in and out; ``docs/labelling.md`` has examples):

* ``GET /`` - the labelling page; ``/static/*`` its script and style sheet.
* ``GET /healthz`` - 200 ``{"status": "SERVING"}`` while the database answers, else 503.
* ``POST /api/v1/comparisons | rankings | ratings | corrections`` - one feedback event each, with
  the fields of the gRPC request of the same kind, plus an optional ``task_id`` (the labelled task,
  which must contain the prompt and completions; it is recorded as ``metadata["task_id"]`` and
  counts towards the task's labels). 201 ``{"feedback_id": "7", "duplicate": false}``; a retry
  with the same ``idempotency_key`` is 200 with ``"duplicate": true``.
* ``POST /api/v1/tasks`` - queue tasks: ``{"tasks": [{"prompt", "completions", "key"?,
  "metadata"?, "source"?}]}``; all or nothing.
* ``GET /api/v1/tasks/next?annotator_id=A`` - the next task for A (see
  :mod:`plaudit.services.feedback.tasks`), ``{"task": null, ...}`` when there is none.
* ``GET /api/v1/tasks/{id}``, ``POST /api/v1/tasks/{id}/skip`` (``{"annotator_id"}``).
* ``GET /api/v1/stats`` - what gRPC ``GetStats`` reports, plus the task queue's counts.

Submissions are read through the proto's JSON mapping into the gRPC request of their kind and go
through the same :class:`~plaudit.services.feedback.core.FeedbackCore` as gRPC (same validation,
same group-commit batcher), so idempotency and durability are the same. Errors are the domain's
:class:`PlauditError` s, mapped to HTTP in one place (:func:`error_response`):
``{"error": {"code": "INVALID_ARGUMENT", "field": "chosen", "message": "chosen: must not be
empty or whitespace only"}}`` with 400, and likewise 404, 409, 429, 503. Every ``/api/``
request first passes the authenticator: :func:`api_key_authenticator` (the
``Authorization: Bearer <key>`` header, checked by the gRPC server's own
:class:`~plaudit.services.common.security.guard.AccessGuard`: same keys and rate limits, roles from
:data:`~plaudit.services.feedback.access.ROUTE_ROLES`), or :func:`allow_all` with ``auth_disabled``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from plaudit.services.common.batching import DynamicBatcher
from plaudit.services.common.errors import HTTP_STATUS, InvalidArgumentError, PlauditError
from plaudit.services.common.security.guard import AccessGuard
from plaudit.services.common.security.keys import Principal
from plaudit.services.feedback.access import ROUTE_ROLES
from plaudit.services.feedback.core import (
    REQUEST_OF_KIND,
    FeedbackCore,
    event_from_json,
    stats_json,
)
from plaudit.services.feedback.domain import (
    Comparison,
    FeedbackEvent,
    FeedbackKind,
    LabellingTask,
    NewTask,
    Ranking,
    SubmitResult,
)
from plaudit.services.feedback.metrics import FeedbackMetrics
from plaudit.services.feedback.settings import FeedbackSettings
from plaudit.services.feedback.store import FeedbackStore
from plaudit.services.feedback.task_store import TaskStats
from plaudit.services.feedback.tasks import TaskPick, TaskPicker

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATIC_DIR = Path(__file__).resolve().with_name("static")
MAX_BODY_BYTES = 32 * 1024 * 1024

_CODE_OF_HTTP = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    409: "ALREADY_EXISTS",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}
_RETRY_AFTER_S = {429: "1", 503: "2"}

_TASK_FIELDS = frozenset({"prompt", "completions", "key", "metadata", "source"})


# -- errors: the one place domain errors become HTTP ----------------------------------------------
def error_json(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    response = web.json_response(
        {"error": {"code": code, "field": field, "message": message}}, status=status
    )
    if status in _RETRY_AFTER_S:
        response.headers["Retry-After"] = _RETRY_AFTER_S[status]
    return response


def error_response(exc: PlauditError) -> web.Response:
    """The HTTP answer to a domain error: its status from
    :data:`~plaudit.services.common.errors.HTTP_STATUS`, JSON body."""
    field = exc.field if isinstance(exc, InvalidArgumentError) else None
    return error_json(HTTP_STATUS.get(exc.code, 500), exc.code.name, exc.message, field)


# -- authentication -------------------------------------------------------------------------------
Authenticator = Callable[[web.Request], Awaitable[None]]
PRINCIPAL = web.RequestKey("principal", Principal)
"""Who is calling, recorded by the authenticator for the handlers."""


async def allow_all(request: web.Request) -> None:
    """The authenticator of a service started with ``auth_disabled``: every request passes.

    :func:`make_app` runs the authenticator before every ``/api/`` handler (the page, its
    static files and ``/healthz`` stay public). An authenticator refuses by raising a
    :class:`PlauditError` whose code is ``UNAUTHENTICATED`` (401) or ``PERMISSION_DENIED``
    (403), and may record who is calling in ``request[PRINCIPAL]`` for the handlers.
    """


def api_key_authenticator(guard: AccessGuard) -> Authenticator:
    """Admit requests through ``guard`` (the gRPC server's keys and rate buckets), deciding the
    routes of :data:`~plaudit.services.feedback.access.ROUTE_ROLES`: ``Authorization: Bearer
    <key>``, the
    role it names for ``METHOD /route``, the key's rate limit. A path that matches no route only
    needs a valid key (then it is 404)."""
    guard = guard.for_calls(ROUTE_ROLES)

    async def authenticate(request: web.Request) -> None:
        authorization = request.headers.get("Authorization")
        resource = request.match_info.route.resource
        if resource is None:
            request[PRINCIPAL] = guard.identify(authorization)
            return
        method = "GET" if request.method == "HEAD" else request.method
        request[PRINCIPAL] = guard.check(f"{method} {resource.canonical}", authorization)

    return authenticate


# -- JSON -> domain ---------------------------------------------------------------------------
def _check_fields(
    body: object, allowed: frozenset[str], what: str, prefix: str = ""
) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidArgumentError(prefix.rstrip(".") or "body", "must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidArgumentError(f"{prefix}{unknown[0]}", f"is not a field of {what}")
    return body


def check_event_matches_task(event: FeedbackEvent, task: LabellingTask) -> None:
    """The event must be about the task: its prompt, and completions the task offered."""
    if event.prompt != task.prompt:
        raise InvalidArgumentError("prompt", f"differs from the prompt of task {task.task_id}")
    used: list[tuple[str, str]]
    if isinstance(event, Comparison):
        used = [("chosen", event.chosen), ("rejected", event.rejected)]
    elif isinstance(event, Ranking):
        used = [(f"completions[{i}]", c) for i, c in enumerate(event.completions)]
    else:
        used = [("completion", event.completion)]
    for name, text in used:
        if text not in task.completions:
            raise InvalidArgumentError(name, f"is not a completion of task {task.task_id}")


def tasks_from_json(body: object, max_tasks: int) -> list[NewTask]:
    fields = _check_fields(body, frozenset({"tasks"}), "a task import")
    items = fields.get("tasks")
    if not isinstance(items, list):
        raise InvalidArgumentError("tasks", "must be a list of tasks")
    if not 1 <= len(items) <= max_tasks:
        raise InvalidArgumentError(
            "tasks", f"has {len(items)} entries; one import takes 1 to {max_tasks}"
        )
    out = []
    for index, item in enumerate(items):
        prefix = f"tasks[{index}]."
        task = _check_fields(item, _TASK_FIELDS, "a task", prefix)
        completions = task.get("completions", [])
        out.append(
            NewTask(
                prompt=task.get("prompt", ""),
                completions=completions,
                key=task.get("key"),
                metadata=task.get("metadata", {}),
                source=task.get("source", "import"),
            )
        )
    return out


# -- domain -> JSON -------------------------------------------------------------------------
def task_json(task: LabellingTask, labels_per_task: int) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "key": task.key,
        "prompt": task.prompt,
        "completions": list(task.completions),
        "metadata": dict(task.metadata),
        "source": task.source,
        "labels": task.labels,
        "labels_per_task": labels_per_task,
    }


def queue_json(stats: TaskStats) -> dict[str, Any]:
    return {
        "total": stats.total,
        "pending": stats.pending,
        "done": stats.done,
        "labels_per_task": stats.labels_per_task,
        "annotator": {"labelled": stats.annotator_labelled, "skipped": stats.annotator_skipped},
    }


async def _read_json(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise InvalidArgumentError("body", "must be JSON, sent as Content-Type: application/json")
    raw = await request.read()
    try:
        text = raw.decode("utf-8")  # JSON is UTF-8 (RFC 8259), whatever charset is claimed
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError("body", f"is not valid UTF-8 (byte {exc.start})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(
            "body", f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from exc
    except RecursionError as exc:
        raise InvalidArgumentError("body", "is nested too deeply") from exc


# -- the application ----------------------------------------------------------------------------
class FeedbackHttpApi:
    """Request handlers; the store, batcher and picker are the gRPC servicer's own."""

    def __init__(
        self,
        *,
        store: Callable[[], FeedbackStore],
        batcher: DynamicBatcher[FeedbackEvent, SubmitResult | PlauditError],
        picker: TaskPicker,
        metrics: FeedbackMetrics,
        is_serving: Callable[[], bool],
        max_tasks_per_import: int,
    ) -> None:
        self._store = store
        self._core = FeedbackCore(store, batcher, metrics)
        self._picker = picker
        self._is_serving = is_serving
        self._max_tasks = max_tasks_per_import

    def routes(self) -> list[web.RouteDef]:
        routes = [
            web.get("/", self.index),
            web.get("/healthz", self.healthz),
            web.get("/api/v1/stats", self.stats),
            web.post("/api/v1/tasks", self.import_tasks),
            web.get("/api/v1/tasks/next", self.next_task),
            # ASCII digits only (\d would take "٣"), and no more than a 64-bit id has
            web.get(r"/api/v1/tasks/{task_id:[0-9]{1,18}}", self.get_task),
            web.post(r"/api/v1/tasks/{task_id:[0-9]{1,18}}/skip", self.skip_task),
        ]
        for kind in REQUEST_OF_KIND:
            routes.append(web.post(f"/api/v1/{kind}s", self._submit_handler(kind)))
        return routes

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def healthz(self, request: web.Request) -> web.Response:
        serving = self._is_serving()
        return web.json_response(
            {"status": "SERVING" if serving else "NOT_SERVING"}, status=200 if serving else 503
        )

    # -- feedback -------------------------------------------------------------------------
    def _submit_handler(
        self, kind: FeedbackKind
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            return await self._submit(kind, await _read_json(request))

        return handler

    async def _submit(self, kind: FeedbackKind, body: object) -> web.Response:
        event, task_id = event_from_json(kind, body)

        async def check_task(event: FeedbackEvent) -> None:
            if task_id is not None:
                check_event_matches_task(event, await self._task(task_id))

        outcome = await self._core.submit(event, check=check_task)
        reply: dict[str, Any] = {
            "feedback_id": str(outcome.feedback_id),
            "duplicate": outcome.duplicate,
        }
        if task_id is not None:
            reply["task_labels"] = await self._picker.record_label(
                task_id, event.annotator_id, outcome.feedback_id
            )
        return web.json_response(reply, status=200 if outcome.duplicate else 201)

    # -- tasks ----------------------------------------------------------------------------
    async def _task(self, task_id: int) -> LabellingTask:
        tasks = self._store().tasks
        return await asyncio.to_thread(tasks.get, task_id)

    async def import_tasks(self, request: web.Request) -> web.Response:
        new = tasks_from_json(await _read_json(request), self._max_tasks)
        tasks = self._store().tasks
        imported = await asyncio.to_thread(tasks.import_tasks, new)
        created = sum(1 for t in imported if t.created)
        return web.json_response(
            {
                "imported": created,
                "existing": len(imported) - created,
                "tasks": [
                    {"task_id": t.task_id, "key": t.key, "created": t.created} for t in imported
                ],
            },
            status=201 if created else 200,
        )

    async def next_task(self, request: web.Request) -> web.Response:
        annotator = request.query.get("annotator_id", "")
        pick: TaskPick | None = await self._picker.next_task(annotator)
        queue = await self._picker.stats(annotator)
        labels = self._picker.labels_per_task
        return web.json_response(
            {
                "task": None if pick is None else task_json(pick.task, labels),
                "selection": None
                if pick is None
                else {"reason": pick.reason, "margin": pick.margin},
                "queue": queue_json(queue),
            }
        )

    async def get_task(self, request: web.Request) -> web.Response:
        task = await self._task(int(request.match_info["task_id"]))
        return web.json_response(task_json(task, self._picker.labels_per_task))

    async def skip_task(self, request: web.Request) -> web.Response:
        body = _check_fields(await _read_json(request), frozenset({"annotator_id"}), "a skip")
        task_id = int(request.match_info["task_id"])
        await self._picker.skip(task_id, body.get("annotator_id", ""))
        return web.json_response({"skipped": True})

    async def stats(self, request: web.Request) -> web.Response:
        store = self._store()
        stats = await asyncio.to_thread(store.stats)
        queue = await self._picker.stats(request.query.get("annotator_id"))
        return web.json_response({**stats_json(stats), "tasks": queue_json(queue)})


def make_app(
    api: FeedbackHttpApi, metrics: FeedbackMetrics, authenticate: Authenticator
) -> web.Application:
    """The aiohttp application: routes, error mapping, authentication hook, headers, metrics."""

    @web.middleware
    async def handle(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        status = 500
        try:
            response = await _guarded(request, handler)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            metrics.http_requests.labels(route, str(status)).inc()
            metrics.http_duration.labels(route).observe(time.perf_counter() - started)

    async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        api_call = request.path.startswith("/api/")
        try:
            if api_call:
                await authenticate(request)
            return await handler(request)
        except PlauditError as exc:
            return error_response(exc)
        except web.HTTPException as exc:
            if not api_call or exc.status < 400:
                raise
            code = _CODE_OF_HTTP.get(exc.status, "UNKNOWN")
            return error_json(exc.status, code, exc.reason)
        except Exception:
            log.exception("http handler failed", extra={"path": request.path})
            return error_json(500, "INTERNAL", "internal error; see the service log")

    async def headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if request.path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
        else:
            response.headers.setdefault("Cache-Control", "no-cache")
            response.headers.setdefault(
                "Content-Security-Policy",
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            )

    app = web.Application(middlewares=[handle], client_max_size=MAX_BODY_BYTES)
    app.add_routes(api.routes())
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    app.on_response_prepare.append(headers)
    return app


class FeedbackHttpServer:
    """Serves :func:`make_app` on ``host:port`` (0 picks a free port) on the running loop, over
    TLS when given an ``ssl_context``."""

    def __init__(
        self,
        app: web.Application,
        *,
        host: str,
        port: int,
        grace_s: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._app = app
        self._ssl_context = ssl_context
        self._host = host
        self._requested_port = port
        self._grace_s = grace_s
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        runner = web.AppRunner(
            self._app, access_log=None, handle_signals=False, shutdown_timeout=self._grace_s
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._requested_port, ssl_context=self._ssl_context)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("http server started", extra={"port": self.port})

    async def stop(self) -> None:
        """Stop accepting, give in-flight requests up to ``grace_s`` seconds, close."""
        if self._runner is None:
            return
        await self._runner.cleanup()
        self._runner = None
        log.info("http server stopped", extra={"port": self.port})


def feedback_http_server(
    *,
    store: Callable[[], FeedbackStore],
    batcher: DynamicBatcher[FeedbackEvent, SubmitResult | PlauditError],
    picker: TaskPicker,
    metrics: FeedbackMetrics,
    is_serving: Callable[[], bool],
    settings: FeedbackSettings,
    authenticate: Authenticator,
    ssl_context: ssl.SSLContext | None = None,
) -> FeedbackHttpServer:
    """The HTTP server of a feedback service, configured from its settings."""
    api = FeedbackHttpApi(
        store=store,
        batcher=batcher,
        picker=picker,
        metrics=metrics,
        is_serving=is_serving,
        max_tasks_per_import=settings.max_events_per_batch,
    )
    return FeedbackHttpServer(
        make_app(api, metrics, authenticate),
        host=settings.host,
        port=settings.http_port,
        grace_s=settings.grace_period_s,
        ssl_context=ssl_context,
    )
