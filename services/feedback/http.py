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
  :mod:`plaudit.services.feedback.tasks`), ``{"task": null, ...}`` when there is none, and the
  ``criteria`` the page asks about, in the configured order: ``[{"criterion": "safety",
  "question": "Which response is safer?"}]`` (one labelled task may collect one event each).
* ``GET /api/v1/tasks/{id}``, ``POST /api/v1/tasks/{id}/skip`` (``{"annotator_id"}``).
* ``GET /api/v1/stats`` - what gRPC ``GetStats`` reports, plus the task queue's counts.

Submissions are read through the proto's JSON mapping into the gRPC request of their kind and go
through the same :class:`~plaudit.services.feedback.core.FeedbackCore` as gRPC (same validation,
same group-commit batcher), so idempotency and durability are the same. Errors are the domain's
:class:`PlauditError` s, mapped to HTTP in one place (:func:`error_response`):
``{"error": {"code": "INVALID_ARGUMENT", "field": "chosen", "message": "chosen: must not be
empty or whitespace only"}}`` with 400, and likewise 404, 409, 429, 503. Every ``/api/``
request first passes the authenticator: :func:`~plaudit.services.common.http.authenticator` (the
``Authorization: Bearer <key>`` header, checked by the gRPC server's own
:class:`~plaudit.services.common.security.guard.AccessGuard`: same keys and rate limits, roles from
:data:`~plaudit.services.feedback.access.ROUTE_ROLES`), or :func:`allow_all` with ``auth_disabled``.
With keys, the annotator of every submission, lease and skip is bound to the key, idempotency
keys are scoped to it and its task leases are limited (:mod:`~plaudit.services.feedback.identity`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from plaudit.services.common.batching import DynamicBatcher
from plaudit.services.common.errors import InvalidArgumentError, PlauditError
from plaudit.services.common.http import (
    JSON_TEXT_FACTOR,
    PRINCIPAL,
    Authenticator,
    HttpServer,
    json_app,
    read_json,
)
from plaudit.services.common.security.limits import (
    SMALL_MESSAGE_BYTES,
    InFlightLimit,
    MessageLimits,
)
from plaudit.services.feedback.core import (
    REQUEST_OF_KIND,
    FeedbackCore,
    event_from_json,
    stats_json,
)
from plaudit.services.feedback.domain import (
    DEFAULT_CRITERION,
    Comparison,
    FeedbackEvent,
    FeedbackKind,
    LabellingTask,
    NewTask,
    Ranking,
    SubmitResult,
    criterion_question,
)
from plaudit.services.feedback.identity import Caller
from plaudit.services.feedback.metrics import FeedbackMetrics
from plaudit.services.feedback.settings import FeedbackSettings
from plaudit.services.feedback.store import FeedbackStore
from plaudit.services.feedback.task_store import TaskStats
from plaudit.services.feedback.tasks import TaskPick, TaskPicker

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().with_name("static")

_TASK_FIELDS = frozenset({"prompt", "completions", "key", "metadata", "source"})


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


def criteria_json(criteria: Sequence[str]) -> list[dict[str, str]]:
    """The configured criteria with the question the labelling page asks of each, in order."""
    return [{"criterion": c, "question": criterion_question(c)} for c in criteria]


def queue_json(stats: TaskStats) -> dict[str, Any]:
    return {
        "total": stats.total,
        "pending": stats.pending,
        "done": stats.done,
        "labels_per_task": stats.labels_per_task,
        "annotator": {"labelled": stats.annotator_labelled, "skipped": stats.annotator_skipped},
    }


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
        any_annotator_keys: Collection[str] = (),
        criteria: Sequence[str] = (DEFAULT_CRITERION,),
    ) -> None:
        self._store = store
        self._criteria = criteria_json(criteria)
        self._core = FeedbackCore(store, batcher, metrics)
        self._picker = picker
        self._is_serving = is_serving
        self._max_tasks = max_tasks_per_import
        self._any_annotator_keys = frozenset(any_annotator_keys)

    def _caller(self, request: web.Request) -> Caller:
        """Who is calling (see :mod:`~plaudit.services.feedback.identity`)."""
        return Caller.of(request.get(PRINCIPAL), self._any_annotator_keys)

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
            return await self._submit(kind, await read_json(request), self._caller(request))

        return handler

    async def _submit(self, kind: FeedbackKind, body: object, caller: Caller) -> web.Response:
        event, task_id = event_from_json(kind, body)
        event = caller.bind(event)

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
        new = tasks_from_json(await read_json(request), self._max_tasks)
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
        caller = self._caller(request)
        annotator = caller.annotator(request.query.get("annotator_id", ""))
        # a new lease beyond the key's max_leases_per_principal is RESOURCE_EXHAUSTED (429)
        pick: TaskPick | None = await self._picker.next_task(annotator, caller.name)
        queue = await self._picker.stats(annotator)
        labels = self._picker.labels_per_task
        return web.json_response(
            {
                "task": None if pick is None else task_json(pick.task, labels),
                "selection": None
                if pick is None
                else {"reason": pick.reason, "margin": pick.margin},
                "queue": queue_json(queue),
                "criteria": self._criteria,
            }
        )

    async def get_task(self, request: web.Request) -> web.Response:
        task = await self._task(int(request.match_info["task_id"]))
        return web.json_response(task_json(task, self._picker.labels_per_task))

    async def skip_task(self, request: web.Request) -> web.Response:
        body = _check_fields(await read_json(request), frozenset({"annotator_id"}), "a skip")
        task_id = int(request.match_info["task_id"])
        caller = self._caller(request)
        annotator = caller.annotator(body.get("annotator_id", ""))
        await self._picker.skip(task_id, annotator)
        return web.json_response({"skipped": True})

    async def stats(self, request: web.Request) -> web.Response:
        store = self._store()
        stats = await asyncio.to_thread(store.stats)
        queue = await self._picker.stats(request.query.get("annotator_id"))
        return web.json_response({**stats_json(stats), "tasks": queue_json(queue)})


PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
}


def body_limits(settings: FeedbackSettings) -> MessageLimits:
    """The largest body of each route: a submission is its gRPC request's limit in JSON (every
    text escaped at worst), an import ``max_task_import_bytes``; the rest take
    :data:`~plaudit.services.common.security.limits.SMALL_MESSAGE_BYTES`."""
    limits = {
        f"POST /api/v1/{kind}s": JSON_TEXT_FACTOR * settings.event_message_bytes(kind)
        for kind in REQUEST_OF_KIND
    }
    limits["POST /api/v1/tasks"] = settings.max_task_import_bytes
    return limits


def make_app(
    api: FeedbackHttpApi,
    metrics: FeedbackMetrics,
    authenticate: Authenticator,
    *,
    limits: MessageLimits | None = None,
    in_flight: InFlightLimit | None = None,
) -> web.Application:
    """The aiohttp application (:func:`~plaudit.services.common.http.json_app`): the routes,
    the page's static files, the authenticator and ``in_flight`` on ``/api/``, body ``limits``
    (:func:`body_limits`; default: those of the default settings)."""
    return json_app(
        api.routes(),
        requests=metrics.http_requests,
        duration=metrics.http_duration,
        authenticate=authenticate,
        protected=lambda path: path.startswith("/api/"),
        public_headers=PAGE_HEADERS,
        static=("/static/", STATIC_DIR),
        client_max_size=SMALL_MESSAGE_BYTES,
        body_limits=body_limits(FeedbackSettings.model_construct()) if limits is None else limits,
        in_flight=in_flight,
    )


FeedbackHttpServer = HttpServer


def feedback_http_server(
    *,
    store: Callable[[], FeedbackStore],
    batcher: DynamicBatcher[FeedbackEvent, SubmitResult | PlauditError],
    picker: TaskPicker,
    metrics: FeedbackMetrics,
    is_serving: Callable[[], bool],
    settings: FeedbackSettings,
    authenticate: Authenticator,
    in_flight: InFlightLimit | None = None,
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
        any_annotator_keys=settings.any_annotator_keys,
        criteria=settings.criteria,
    )
    return FeedbackHttpServer(
        make_app(api, metrics, authenticate, limits=body_limits(settings), in_flight=in_flight),
        host=settings.host,
        port=settings.http_port,
        grace_s=settings.grace_period_s,
        ssl_context=ssl_context,
    )
