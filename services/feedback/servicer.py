"""gRPC servicer for plaudit.v1.FeedbackService: proto -> domain, one core call, domain -> proto.

Unary submissions go through a :class:`DynamicBatcher` so that concurrent callers share one
durable commit (group commit); ``SubmitBatch`` commits its stream in chunks of
``stream_commit_events`` while the rest is still arriving (a stream cut short keeps the chunks
already committed; the client's retry with the same idempotency keys resolves them). The
store validates every event; refused events come back as domain errors, which unary calls raise
(the interceptor maps them to their status) and ``SubmitBatch`` reports per event.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict
from typing import Any

import grpc

from plaudit.services.common.batching import DynamicBatcher
from plaudit.services.common.errors import InvalidArgumentError, PlauditError
from plaudit.services.common.security.guard import CALLER
from plaudit.services.feedback.core import FeedbackCore, Outcome, event_from_proto, stats_to_proto
from plaudit.services.feedback.domain import DerivedPair, FeedbackEvent
from plaudit.services.feedback.identity import Caller
from plaudit.services.feedback.metrics import FeedbackMetrics
from plaudit.services.feedback.settings import FeedbackSettings
from plaudit.services.feedback.store import FeedbackStore
from plaudit.v1 import feedback_pb2, feedback_pb2_grpc


def parse_cursor(cursor: str) -> int:
    if not cursor:
        return 0
    if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 30:  # not "²" or "٣"
        raise InvalidArgumentError("cursor", f"not a cursor from a previous export: {cursor!r}")
    return int(cursor)


# -- domain -> proto ---------------------------------------------------------------------------
def pair_to_proto(pair: DerivedPair) -> feedback_pb2.PreferencePair:
    """The message of a pair: its fields by the same names, ids and cursors as strings."""
    fields = {**asdict(pair), "feedback_id": str(pair.feedback_id), "cursor": str(pair.cursor)}
    fields["source_kind"] = f"FEEDBACK_KIND_{pair.source_kind.upper()}"
    return feedback_pb2.PreferencePair(**fields)


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(
        self,
        store: Callable[[], FeedbackStore],
        batcher: DynamicBatcher[FeedbackEvent, Outcome],
        settings: FeedbackSettings,
        metrics: FeedbackMetrics,
    ) -> None:
        self._store = store
        self._core = FeedbackCore(store, batcher, metrics)
        self._settings = settings
        self._metrics = metrics

    def _caller(self) -> Caller:
        """The caller of the call being served (set by the server's interceptor)."""
        return Caller.of(CALLER.get(), self._settings.any_annotator_keys)

    async def _submit(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Every unary ``Submit*``: the request's event through the core; the reply of the same
        name (each has ``feedback_id`` and ``duplicate``)."""
        event = self._caller().bind(event_from_proto(request))
        result = await self._core.submit(event, timeout=context.time_remaining())
        reply = getattr(feedback_pb2, request.DESCRIPTOR.name.replace("Request", "Response"))
        return reply(feedback_id=str(result.feedback_id), duplicate=result.duplicate)

    SubmitComparison = SubmitRanking = SubmitRating = SubmitCorrection = _submit

    async def SubmitBatch(
        self,
        request_iterator: AsyncIterator[feedback_pb2.SubmitBatchRequest],
        context: grpc.aio.ServicerContext,
    ) -> feedback_pb2.SubmitBatchResponse:
        limit = self._settings.max_events_per_batch
        chunk_size = self._settings.stream_commit_events
        results: list[feedback_pb2.EventResult | None] = []
        chunk: list[tuple[int, FeedbackEvent]] = []
        committing: asyncio.Task[None] | None = None
        caller = self._caller()

        async def commit(part: list[tuple[int, FeedbackEvent]]) -> None:
            outcomes = await asyncio.to_thread(self._core.commit, [event for _, event in part])
            for (index, _), outcome in zip(part, outcomes, strict=True):
                if isinstance(outcome, PlauditError):
                    results[index] = _refused(index, outcome)
                else:
                    results[index] = feedback_pb2.EventResult(
                        index=index,
                        feedback_id=str(outcome.feedback_id),
                        duplicate=outcome.duplicate,
                    )

        try:
            async for message in request_iterator:
                index = len(results)
                if index >= limit:
                    raise InvalidArgumentError(
                        "events", f"more than {limit} events in one SubmitBatch stream"
                    )
                results.append(None)
                try:
                    chunk.append((index, caller.bind(event_from_proto(message))))
                except PlauditError as exc:  # a bad event, or one the caller may not submit
                    results[index] = _refused(index, exc)
                if len(chunk) >= chunk_size:  # commit while the rest of the stream arrives
                    if committing is not None:
                        await committing
                    committing = asyncio.ensure_future(commit(chunk))
                    chunk = []
            if committing is not None:
                await committing
                committing = None
            if chunk:
                await commit(chunk)
        finally:
            if committing is not None and not committing.done():
                await asyncio.wait([committing])  # never leave a commit running unobserved
        done = [r for r in results if r is not None]
        rejected = sum(1 for r in done if r.code != 0)
        return feedback_pb2.SubmitBatchResponse(
            results=done, accepted=len(done) - rejected, rejected=rejected
        )

    async def ExportPreferences(
        self, request: feedback_pb2.ExportPreferencesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[feedback_pb2.ExportPreferencesResponse]:
        after = parse_cursor(request.cursor)
        if request.limit < 0:
            raise InvalidArgumentError("limit", f"must be >= 0, got {request.limit}")
        if request.page_size < 0:
            raise InvalidArgumentError("page_size", f"must be >= 0, got {request.page_size}")
        page_size = min(request.page_size or self._settings.export_page_size, 10_000)
        pairs: Iterator[DerivedPair] = self._store().export_pairs(
            after,
            request.limit or None,
            exclude_outliers=request.exclude_outliers,
            criterion=request.criterion or None,
        )
        cursor = request.cursor
        while True:
            page = await asyncio.to_thread(lambda: list(itertools.islice(pairs, page_size)))
            if not page:
                return
            cursor = str(page[-1].cursor)
            self._metrics.pairs_exported.inc(len(page))
            yield feedback_pb2.ExportPreferencesResponse(
                pairs=[pair_to_proto(p) for p in page], next_cursor=cursor
            )

    async def GetStats(
        self, request: feedback_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.GetStatsResponse:
        return stats_to_proto(await asyncio.to_thread(self._store().stats))


def _refused(index: int, error: PlauditError) -> feedback_pb2.EventResult:
    return feedback_pb2.EventResult(
        index=index, code=error.code.value[0], error=f"events[{index}].{error.message}"
    )
