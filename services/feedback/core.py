"""The feedback application core: one path from a request to a committed event and back.

gRPC requests, HTTP JSON bodies (read through the proto's JSON mapping into the same request
messages) and, through the store, imported files all become domain events here; the store
validates them (:func:`~plaudit.services.feedback.domain.validate_event`, the one set of checks) and
:class:`FeedbackCore` commits them through the group-commit batcher, counting every outcome
once. Refusals are domain errors (:mod:`plaudit.services.common.errors`); gRPC maps them to
statuses in
its interceptor, HTTP in :func:`plaudit.services.feedback.http.error_response`. Statistics have one
rendering, :func:`stats_json`, for GetStats, ``/api/v1/stats`` and the CLI.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeAlias

from google.protobuf import json_format
from google.protobuf.message import Message

from plaudit.services.common.batching import DynamicBatcher
from plaudit.services.common.errors import InvalidArgumentError, PlauditError
from plaudit.services.feedback.domain import (
    EVENT_CLASSES,
    FeedbackEvent,
    FeedbackKind,
    SubmitResult,
    validate_event,
)
from plaudit.services.feedback.export import Stats
from plaudit.services.feedback.metrics import FeedbackMetrics
from plaudit.services.feedback.store import FeedbackStore
from plaudit.v1 import feedback_pb2

Outcome: TypeAlias = SubmitResult | PlauditError

REQUEST_OF_KIND: dict[FeedbackKind, type[Message]] = {
    "comparison": feedback_pb2.SubmitComparisonRequest,
    "ranking": feedback_pb2.SubmitRankingRequest,
    "rating": feedback_pb2.SubmitRatingRequest,
    "correction": feedback_pb2.SubmitCorrectionRequest,
}
"""The request message of each kind; its fields are the event's fields, by the same names."""
_KIND_OF_REQUEST = {request.DESCRIPTOR.name: kind for kind, request in REQUEST_OF_KIND.items()}
MAX_ID = 2**63 - 1  # ids are 64-bit integers in the database


# -- requests -> domain ------------------------------------------------------------------------
def event_from_proto(request: Message) -> FeedbackEvent:
    """The (not yet validated) event of a ``Submit*Request`` or a ``SubmitBatchRequest``.

    An unset ``margin`` is None; an unset rating scale (both ends 0) is the 0-1 (thumbs) scale.
    """
    if isinstance(request, feedback_pb2.SubmitBatchRequest):
        which = request.WhichOneof("event")
        if which is None:
            raise InvalidArgumentError("event", "one of comparison, ranking, rating, correction")
        request = getattr(request, which)
    values: dict[str, Any] = {}
    for field in request.DESCRIPTOR.fields:
        value = getattr(request, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = dict(value)
        elif field.is_repeated:
            value = list(value)
        elif field.has_presence and not request.HasField(field.name):
            value = None
        values[field.name] = value
    if values.get("scale_min") == 0 and values.get("scale_max") == 0:
        values["scale_max"] = 1.0
    return EVENT_CLASSES[_KIND_OF_REQUEST[request.DESCRIPTOR.name]](**values)


def _expected(field: Any) -> str:
    if field.message_type is not None:
        return "a map of strings to strings"
    if field.is_repeated:
        return "a list of strings"
    return "a string" if field.type == field.TYPE_STRING else "a number"


def event_from_json(kind: FeedbackKind, body: object) -> tuple[FeedbackEvent, int | None]:
    """The event a JSON body describes (the fields of the gRPC request of that kind, in its
    JSON mapping) and its ``task_id`` if any, recorded as ``metadata["task_id"]``. Not yet
    validated; missing texts are empty, as in gRPC, and a rating needs its ``score``."""
    if not isinstance(body, dict):
        raise InvalidArgumentError("body", "must be a JSON object")
    request = REQUEST_OF_KIND[kind]()
    fields = request.DESCRIPTOR.fields_by_name
    unknown = sorted(set(body) - set(fields) - {"task_id"})
    if unknown:
        raise InvalidArgumentError(unknown[0], f"is not a field of a {kind}")
    values = {name: value for name, value in body.items() if name != "task_id"}
    for name, value in values.items():
        if isinstance(value, bool):  # the JSON mapping would read true as 1.0
            raise InvalidArgumentError(name, f"must be {_expected(fields[name])}, got bool")
    try:  # the whole body at once; field by field only to name the field that failed
        json_format.ParseDict(values, request)
    except (json_format.ParseError, OverflowError, TypeError, ValueError):
        for name, value in values.items():
            try:
                json_format.ParseDict({name: value}, REQUEST_OF_KIND[kind]())
            except (json_format.ParseError, OverflowError, TypeError, ValueError) as exc:
                detail = re.sub(r"^Failed to parse \w+ field: |\.$| at \S+$", "", str(exc).strip())
                raise InvalidArgumentError(
                    name, f"must be {_expected(fields[name])} ({detail.rstrip('.')})"
                ) from None
        raise
    if kind == "rating" and body.get("score") is None:
        raise InvalidArgumentError("score", "is required (a number within the scale)")
    event = event_from_proto(request)
    task_id = body.get("task_id")
    if task_id is None:
        return event, None
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise InvalidArgumentError("task_id", f"must be an integer, got {type(task_id).__name__}")
    if task_id > MAX_ID:
        raise InvalidArgumentError("task_id", f"must be at most {MAX_ID}")
    if task_id <= 0:
        raise InvalidArgumentError("task_id", f"must be positive, got {task_id}")
    return replace(event, metadata={**event.metadata, "task_id": str(task_id)}), task_id


# -- domain -> replies ---------------------------------------------------------------------------
def stats_json(stats: Stats) -> dict[str, Any]:
    """The fields of ``GetStatsResponse`` as JSON values: the one rendering of statistics."""
    report = stats.agreement
    tests = {t.annotator_id: t for t in report.outliers}
    annotators = []
    for annotator, records in sorted(stats.by_annotator.items()):
        test = tests.get(annotator)
        annotators.append(
            {
                "annotator_id": annotator,
                "records": records,
                "compared_votes": test.votes if test else 0,
                "disagreement_rate": test.disagreement_rate if test else 0.0,
                "p_value": test.p_value if test else 1.0,
                "outlier": bool(test and test.outlier),
            }
        )
    return {
        "records": stats.total,
        "records_by_kind": stats.by_kind,
        "annotators": annotators,
        "judgements": stats.judgements,
        "pairs_derived": stats.pairs_derived,
        "overlapping_items": report.multi_annotated_groups,
        "raw_agreement": report.raw_agreement,
        "kappa": report.kappa,
        "kappa_method": report.kappa_method or "",
        "contradictions": report.contradicted_groups,
        "ties": report.tied_groups,
        "criteria": [
            {
                "criterion": criterion,
                "records": part.records,
                "judgements": part.judgements,
                "pairs_derived": part.pairs_derived,
                "overlapping_items": part.agreement.multi_annotated_groups,
                "raw_agreement": part.agreement.raw_agreement,
                "kappa": part.agreement.kappa,
                "kappa_method": part.agreement.kappa_method or "",
                "contradictions": part.agreement.contradicted_groups,
                "ties": part.agreement.tied_groups,
            }
            for criterion, part in sorted(stats.by_criterion.items())
        ],
    }


def stats_to_proto(stats: Stats) -> feedback_pb2.GetStatsResponse:
    """:func:`stats_json` as the gRPC message."""
    return json_format.ParseDict(stats_json(stats), feedback_pb2.GetStatsResponse())


# -- the core --------------------------------------------------------------------------------
class FeedbackCore:
    """Commits events (unary ones through the group-commit batcher, streamed chunks in one
    transaction) and counts each outcome once in ``plaudit_feedback_events_total``."""

    def __init__(
        self,
        store: Callable[[], FeedbackStore],
        batcher: DynamicBatcher[FeedbackEvent, Outcome],
        metrics: FeedbackMetrics,
    ) -> None:
        self.store = store
        self._batcher = batcher
        self._metrics = metrics

    def count(self, kind: FeedbackKind, outcome: Outcome) -> None:
        if isinstance(outcome, PlauditError):
            status = "rejected"
        else:
            status = "duplicate" if outcome.duplicate else "accepted"
        self._metrics.events.labels(kind, status).inc()

    async def submit(
        self,
        event: FeedbackEvent,
        *,
        timeout: float | None = None,
        check: Callable[[FeedbackEvent], Awaitable[None]] | None = None,
    ) -> SubmitResult:
        """Commit one event (validated first, then ``check``, e.g. that it belongs to its task);
        raises the domain error that refused it. The store validates again in its transaction."""
        try:
            if check is not None:
                validate_event(event, self.store().limits)  # a bad field before any task lookup
                await check(event)
        except InvalidArgumentError as exc:
            self.count(event.kind, exc)
            raise
        outcome = await self._batcher.submit(event, timeout=timeout)
        self.count(event.kind, outcome)
        if isinstance(outcome, PlauditError):
            raise outcome
        return outcome

    def commit(self, events: Sequence[FeedbackEvent]) -> list[Outcome]:
        """One transaction for a chunk of a stream (blocking: run it in a worker thread)."""
        outcomes = commit_events(self.store, self._metrics, events)
        for event, outcome in zip(events, outcomes, strict=True):
            self.count(event.kind, outcome)
        return outcomes


def commit_events(
    store: Callable[[], FeedbackStore], metrics: FeedbackMetrics, events: Sequence[FeedbackEvent]
) -> list[Outcome]:
    """Validate and commit ``events`` in one transaction, timed; a failed transaction counts as
    a storage error and raises (nothing committed). The group-commit batcher's work."""
    try:
        with metrics.commit_latency.time():
            outcomes = store().submit_many(events)
    except PlauditError:
        metrics.storage_errors.inc()
        raise
    metrics.transaction_events.observe(len(events))
    return outcomes
