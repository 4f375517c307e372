"""gRPC servicer for plaudit.v1.FeedbackService: proto -> domain, one store call, domain -> proto.

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
from typing import Any

import grpc
from plaudit.v1 import feedback_pb2, feedback_pb2_grpc

from services.common.batching import DynamicBatcher
from services.common.errors import InvalidArgumentError, PlauditError
from services.feedback.domain import (
    Comparison,
    Correction,
    DerivedPair,
    FeedbackEvent,
    Ranking,
    Rating,
    SubmitResult,
)
from services.feedback.metrics import FeedbackMetrics
from services.feedback.settings import FeedbackSettings
from services.feedback.store import FeedbackStore, Stats

Outcome = SubmitResult | PlauditError

KIND_TO_PROTO = {
    "comparison": feedback_pb2.FEEDBACK_KIND_COMPARISON,
    "ranking": feedback_pb2.FEEDBACK_KIND_RANKING,
    "rating": feedback_pb2.FEEDBACK_KIND_RATING,
    "correction": feedback_pb2.FEEDBACK_KIND_CORRECTION,
}


# -- proto -> domain ---------------------------------------------------------------------------
def comparison_from_proto(msg: feedback_pb2.SubmitComparisonRequest) -> Comparison:
    return Comparison(
        prompt=msg.prompt,
        chosen=msg.chosen,
        rejected=msg.rejected,
        annotator_id=msg.annotator_id,
        idempotency_key=msg.idempotency_key,
        margin=msg.margin if msg.HasField("margin") else None,
        metadata=dict(msg.metadata),
    )


def ranking_from_proto(msg: feedback_pb2.SubmitRankingRequest) -> Ranking:
    return Ranking(
        prompt=msg.prompt,
        completions=list(msg.completions),
        annotator_id=msg.annotator_id,
        idempotency_key=msg.idempotency_key,
        metadata=dict(msg.metadata),
    )


def rating_from_proto(msg: feedback_pb2.SubmitRatingRequest) -> Rating:
    scale_min, scale_max = msg.scale_min, msg.scale_max
    if scale_min == 0 and scale_max == 0:
        scale_max = 1.0  # an unset scale is the 0-1 (thumbs) scale
    return Rating(
        prompt=msg.prompt,
        completion=msg.completion,
        score=msg.score,
        scale_min=scale_min,
        scale_max=scale_max,
        annotator_id=msg.annotator_id,
        idempotency_key=msg.idempotency_key,
        metadata=dict(msg.metadata),
    )


def correction_from_proto(msg: feedback_pb2.SubmitCorrectionRequest) -> Correction:
    return Correction(
        prompt=msg.prompt,
        completion=msg.completion,
        corrected=msg.corrected,
        annotator_id=msg.annotator_id,
        idempotency_key=msg.idempotency_key,
        metadata=dict(msg.metadata),
    )


_FROM_BATCH: dict[str, Callable[[Any], FeedbackEvent]] = {
    "comparison": comparison_from_proto,
    "ranking": ranking_from_proto,
    "rating": rating_from_proto,
    "correction": correction_from_proto,
}


def event_from_batch_request(msg: feedback_pb2.SubmitBatchRequest) -> FeedbackEvent:
    which = msg.WhichOneof("event")
    if which is None:
        raise InvalidArgumentError("event", "one of comparison, ranking, rating, correction")
    return _FROM_BATCH[which](getattr(msg, which))


def parse_cursor(cursor: str) -> int:
    if not cursor:
        return 0
    if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 30:  # not "²" or "٣"
        raise InvalidArgumentError("cursor", f"not a cursor from a previous export: {cursor!r}")
    return int(cursor)


# -- domain -> proto ---------------------------------------------------------------------------
def pair_to_proto(pair: DerivedPair) -> feedback_pb2.PreferencePair:
    return feedback_pb2.PreferencePair(
        prompt=pair.prompt,
        chosen=pair.chosen,
        rejected=pair.rejected,
        margin=pair.margin,
        weight=pair.weight,
        annotator_id=pair.annotator_id,
        source_kind=KIND_TO_PROTO[pair.source_kind],
        feedback_id=str(pair.feedback_id),
        cursor=str(pair.cursor),
        agree=pair.agree,
        disagree=pair.disagree,
        pair_key=pair.pair_key,
    )


def stats_to_proto(stats: Stats) -> feedback_pb2.GetStatsResponse:
    report = stats.agreement
    tests = {t.annotator_id: t for t in report.outliers}
    annotators = []
    for annotator, records in sorted(stats.by_annotator.items()):
        test = tests.get(annotator)
        annotators.append(
            feedback_pb2.AnnotatorStats(
                annotator_id=annotator,
                records=records,
                compared_votes=test.votes if test else 0,
                disagreement_rate=test.disagreement_rate if test else 0.0,
                p_value=test.p_value if test else 1.0,
                outlier=bool(test and test.outlier),
            )
        )
    return feedback_pb2.GetStatsResponse(
        records=stats.total,
        records_by_kind=stats.by_kind,
        annotators=annotators,
        judgements=stats.judgements,
        pairs_derived=stats.pairs_derived,
        overlapping_items=report.multi_annotated_groups,
        raw_agreement=report.raw_agreement,
        kappa=report.kappa,
        kappa_method=report.kappa_method or "",
        contradictions=report.contradicted_groups,
        ties=report.tied_groups,
    )


def _raise_or_return(outcome: Outcome) -> SubmitResult:
    if isinstance(outcome, PlauditError):
        raise outcome
    return outcome


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(
        self,
        store: Callable[[], FeedbackStore],
        batcher: DynamicBatcher[FeedbackEvent, Outcome],
        settings: FeedbackSettings,
        metrics: FeedbackMetrics,
    ) -> None:
        self._store = store
        self._batcher = batcher
        self._settings = settings
        self._metrics = metrics

    def _count(self, event: FeedbackEvent, outcome: Outcome) -> None:
        if isinstance(outcome, PlauditError):
            status = "rejected"
        else:
            status = "duplicate" if outcome.duplicate else "accepted"
        self._metrics.events.labels(event.kind, status).inc()

    async def _submit(
        self, event: FeedbackEvent, context: grpc.aio.ServicerContext
    ) -> SubmitResult:
        outcome = await self._batcher.submit(event, timeout=context.time_remaining())
        self._count(event, outcome)
        return _raise_or_return(outcome)

    async def SubmitComparison(
        self, request: feedback_pb2.SubmitComparisonRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.SubmitComparisonResponse:
        result = await self._submit(comparison_from_proto(request), context)
        return feedback_pb2.SubmitComparisonResponse(
            feedback_id=str(result.feedback_id), duplicate=result.duplicate
        )

    async def SubmitRanking(
        self, request: feedback_pb2.SubmitRankingRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.SubmitRankingResponse:
        result = await self._submit(ranking_from_proto(request), context)
        return feedback_pb2.SubmitRankingResponse(
            feedback_id=str(result.feedback_id), duplicate=result.duplicate
        )

    async def SubmitRating(
        self, request: feedback_pb2.SubmitRatingRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.SubmitRatingResponse:
        result = await self._submit(rating_from_proto(request), context)
        return feedback_pb2.SubmitRatingResponse(
            feedback_id=str(result.feedback_id), duplicate=result.duplicate
        )

    async def SubmitCorrection(
        self, request: feedback_pb2.SubmitCorrectionRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.SubmitCorrectionResponse:
        result = await self._submit(correction_from_proto(request), context)
        return feedback_pb2.SubmitCorrectionResponse(
            feedback_id=str(result.feedback_id), duplicate=result.duplicate
        )

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

        async def commit(part: list[tuple[int, FeedbackEvent]]) -> None:
            outcomes = await asyncio.to_thread(self._commit, [event for _, event in part])
            for (index, event), outcome in zip(part, outcomes, strict=True):
                self._count(event, outcome)
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
                    chunk.append((index, event_from_batch_request(message)))
                except InvalidArgumentError as exc:
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

    def _commit(self, events: list[FeedbackEvent]) -> list[Outcome]:
        """One transaction for a chunk of a stream (runs in a worker thread)."""
        with self._metrics.commit_latency.time():
            outcomes = self._store().submit_many(events)
        self._metrics.transaction_events.observe(len(events))
        return outcomes

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
            after, request.limit or None, exclude_outliers=request.exclude_outliers
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
