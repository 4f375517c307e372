"""The feedback service over a real gRPC channel, on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from plaudit.v1 import feedback_pb2 as pb
from plaudit.v1 import feedback_pb2_grpc
from tests.conftest import ServerThread

Stub = feedback_pb2_grpc.FeedbackServiceStub


@pytest.fixture
def server(database_url: str) -> Iterator[ServerThread]:
    running = ServerThread(
        "feedback",
        database_url=database_url,
        max_text_bytes=2000,
        max_events_per_batch=50,
        log_level="WARNING",
    ).start()
    yield running
    running.stop()


@pytest.fixture
def stub(server: ServerThread) -> Iterator[Stub]:
    with grpc.insecure_channel(server.address) as channel:
        yield Stub(channel)


def comparison(key: str, **kw: Any) -> pb.SubmitComparisonRequest:
    fields = {"prompt": "Q?", "chosen": "good", "rejected": "bad", "annotator_id": "ann-1"}
    return pb.SubmitComparisonRequest(idempotency_key=key, **{**fields, **kw})


def export_all(stub: Stub, cursor: str = "", **kw: Any) -> tuple[list[pb.PreferencePair], str]:
    pairs: list[pb.PreferencePair] = []
    for page in stub.ExportPreferences(pb.ExportPreferencesRequest(cursor=cursor, **kw)):
        pairs.extend(page.pairs)
        cursor = page.next_cursor
    return pairs, cursor


def code_of(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10)
    return err.value.code(), err.value.details()


def test_submit_every_kind_and_retries_are_idempotent(stub: Stub) -> None:
    first = stub.SubmitComparison(comparison("c1", margin=0.5, metadata={"ui": "web"}))
    assert first.feedback_id and not first.duplicate
    retry = stub.SubmitComparison(comparison("c1", margin=0.5, metadata={"ui": "web"}))
    assert (retry.feedback_id, retry.duplicate) == (first.feedback_id, True)
    code, details = code_of(stub.SubmitComparison, comparison("c1", chosen="other"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and details.startswith("idempotency_key")

    ranking = stub.SubmitRanking(
        pb.SubmitRankingRequest(
            prompt="R?",
            completions=["a", "b", "c", "d"],
            annotator_id="ann-1",
            idempotency_key="r1",
        )
    )
    rating_hi = stub.SubmitRating(
        pb.SubmitRatingRequest(
            prompt="S?",
            completion="great",
            score=5,
            scale_min=1,
            scale_max=5,
            annotator_id="ann-1",
            idempotency_key="s1",
        )
    )
    stub.SubmitRating(
        pb.SubmitRatingRequest(
            prompt="S?",
            completion="meh",
            score=2,
            scale_min=1,
            scale_max=5,
            annotator_id="ann-1",
            idempotency_key="s2",
        )
    )
    thumbs = stub.SubmitRating(  # no scale: thumbs up on 0-1
        pb.SubmitRatingRequest(
            prompt="T?", completion="yes", score=1, annotator_id="ann-1", idempotency_key="t1"
        )
    )
    correction = stub.SubmitCorrection(
        pb.SubmitCorrectionRequest(
            prompt="C?",
            completion="teh answer",
            corrected="the answer",
            annotator_id="ann-1",
            idempotency_key="x1",
        )
    )
    ids = [
        first.feedback_id,
        ranking.feedback_id,
        rating_hi.feedback_id,
        thumbs.feedback_id,
        correction.feedback_id,
    ]
    assert len(set(ids)) == 5

    pairs, _ = export_all(stub)
    by_prompt: dict[str, list[pb.PreferencePair]] = {}
    for pair in pairs:
        by_prompt.setdefault(pair.prompt, []).append(pair)
    assert len(by_prompt["R?"]) == 6  # K(K-1)/2 for K = 4
    assert {(p.chosen, p.rejected) for p in by_prompt["R?"]} == {
        ("a", "b"),
        ("a", "c"),
        ("a", "d"),
        ("b", "c"),
        ("b", "d"),
        ("c", "d"),
    }
    [rated] = by_prompt["S?"]
    assert (rated.chosen, rated.rejected) == ("great", "meh")
    assert rated.margin == pytest.approx(0.75)  # score gap 3 over a scale of width 4
    assert rated.source_kind == pb.FEEDBACK_KIND_RATING
    [corrected] = by_prompt["C?"]
    assert (corrected.chosen, corrected.rejected) == ("the answer", "teh answer")
    [compared] = by_prompt["Q?"]
    assert compared.margin == 0.5 and compared.weight == 1.0
    assert compared.feedback_id == first.feedback_id
    assert "T?" not in by_prompt  # a single rating implies no pair

    stats = stub.GetStats(pb.GetStatsRequest())
    assert stats.records == 6
    assert dict(stats.records_by_kind) == {
        "comparison": 1,
        "ranking": 1,
        "rating": 3,
        "correction": 1,
    }
    assert stats.judgements == 1 + 6 + 1 + 1
    assert stats.pairs_derived == 9
    assert [a.annotator_id for a in stats.annotators] == ["ann-1"]


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        ("SubmitComparison", comparison("k", prompt=""), "prompt"),
        ("SubmitComparison", comparison("k", prompt="   "), "prompt"),
        ("SubmitComparison", comparison("k", chosen="same", rejected="same"), "rejected"),
        ("SubmitComparison", comparison("k", chosen="x" * 2001), "chosen"),
        ("SubmitComparison", comparison("k", margin=-1), "margin"),
        ("SubmitComparison", comparison("k", margin=float("nan")), "margin"),
        ("SubmitComparison", comparison(""), "idempotency_key"),
        ("SubmitComparison", comparison("k", annotator_id=""), "annotator_id"),
        (
            "SubmitComparison",
            comparison("k", metadata={f"k{i}": "v" for i in range(40)}),
            "metadata",
        ),
        (
            "SubmitRanking",
            pb.SubmitRankingRequest(
                prompt="p", completions=["only"], annotator_id="a", idempotency_key="k"
            ),
            "completions",
        ),
        (
            "SubmitRanking",
            pb.SubmitRankingRequest(
                prompt="p", completions=["a", "b", "a"], annotator_id="a", idempotency_key="k"
            ),
            "completions[2]",
        ),
        (
            "SubmitRanking",
            pb.SubmitRankingRequest(
                prompt="p",
                completions=[str(i) for i in range(17)],
                annotator_id="a",
                idempotency_key="k",
            ),
            "completions",
        ),
        (
            "SubmitRating",
            pb.SubmitRatingRequest(
                prompt="p",
                completion="c",
                score=7,
                scale_min=1,
                scale_max=5,
                annotator_id="a",
                idempotency_key="k",
            ),
            "score",
        ),
        (
            "SubmitRating",
            pb.SubmitRatingRequest(
                prompt="p",
                completion="c",
                score=float("inf"),
                scale_min=1,
                scale_max=5,
                annotator_id="a",
                idempotency_key="k",
            ),
            "score",
        ),
        (
            "SubmitRating",
            pb.SubmitRatingRequest(
                prompt="p",
                completion="c",
                score=1,
                scale_min=5,
                scale_max=1,
                annotator_id="a",
                idempotency_key="k",
            ),
            "scale_min",
        ),
        (
            "SubmitCorrection",
            pb.SubmitCorrectionRequest(
                prompt="p", completion="c", corrected="c", annotator_id="a", idempotency_key="k"
            ),
            "corrected",
        ),
        (
            "SubmitCorrection",
            pb.SubmitCorrectionRequest(
                prompt="p", completion="", corrected="c", annotator_id="a", idempotency_key="k"
            ),
            "completion",
        ),
    ],
)
def test_bad_feedback_is_invalid_argument_naming_the_field(
    stub: Stub, method: str, request_: Any, field: str
) -> None:
    code, details = code_of(getattr(stub, method), request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(field), details
    assert stub.GetStats(pb.GetStatsRequest()).records == 0  # nothing was stored


def test_submit_batch_reports_each_event_and_keeps_the_good_ones(stub: Stub) -> None:
    events = [
        pb.SubmitBatchRequest(comparison=comparison("b0")),
        pb.SubmitBatchRequest(comparison=comparison("b1", chosen="same", rejected="same")),
        pb.SubmitBatchRequest(),  # no event set
        pb.SubmitBatchRequest(
            ranking=pb.SubmitRankingRequest(
                prompt="p", completions=["x", "y", "z"], annotator_id="a", idempotency_key="b3"
            )
        ),
        pb.SubmitBatchRequest(comparison=comparison("b0")),  # repeat within the stream
        pb.SubmitBatchRequest(comparison=comparison("b0", chosen="changed")),
    ]
    reply = stub.SubmitBatch(iter(events), timeout=30)
    assert (reply.accepted, reply.rejected) == (3, 3)
    r = reply.results
    assert [x.index for x in r] == list(range(6))
    assert r[0].code == 0 and r[0].feedback_id and not r[0].duplicate
    assert r[1].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert r[1].error.startswith("events[1].rejected")
    assert r[2].error.startswith("events[2].event")
    assert r[3].code == 0
    assert (r[4].feedback_id, r[4].duplicate) == (r[0].feedback_id, True)
    assert r[5].code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert stub.GetStats(pb.GetStatsRequest()).records == 2

    again = stub.SubmitBatch(iter(events), timeout=30)  # a client retrying the whole stream
    assert [x.feedback_id for x in again.results] == [x.feedback_id for x in r]
    assert stub.GetStats(pb.GetStatsRequest()).records == 2


def test_too_many_events_in_one_batch_is_refused_whole(stub: Stub) -> None:
    events = (pb.SubmitBatchRequest(comparison=comparison(f"k{i}")) for i in range(51))
    code, details = code_of(stub.SubmitBatch, events)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("events")
    assert "50" in details
    assert stub.GetStats(pb.GetStatsRequest()).records == 0


def test_export_resumes_after_a_cursor_without_gaps_or_repeats(stub: Stub) -> None:
    for i in range(30):
        stub.SubmitComparison(comparison(f"e{i}", prompt=f"prompt {i}"))
    everything, end = export_all(stub, page_size=7)
    assert [p.prompt for p in everything] == [f"prompt {i}" for i in range(30)]
    first, cursor = export_all(stub, limit=12, page_size=5)
    rest, _ = export_all(stub, cursor=cursor)
    assert [p.pair_key for p in first + rest] == [p.pair_key for p in everything]
    assert export_all(stub, cursor=end)[0] == []
    stub.SubmitComparison(comparison("late", prompt="late"))
    assert [p.prompt for p in export_all(stub, cursor=end)[0]] == ["late"]
    code, details = code_of(
        lambda r, timeout: list(stub.ExportPreferences(r, timeout=timeout)),
        pb.ExportPreferencesRequest(cursor="not-a-cursor"),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("cursor")


def test_agreement_weights_contradictions_and_outliers(stub: Stub) -> None:
    # 12 prompts: three careful annotators agree, a contrarian always votes the other way
    for i in range(12):
        for annotator in ("alice", "bob", "carol"):
            stub.SubmitComparison(
                comparison(f"{annotator}-{i}", prompt=f"p{i}", annotator_id=annotator)
            )
        stub.SubmitComparison(
            comparison(
                f"mallory-{i}",
                prompt=f"p{i}",
                chosen="bad",
                rejected="good",
                annotator_id="mallory",
            )
        )
    stats = stub.GetStats(pb.GetStatsRequest())
    assert stats.records == 48 and stats.pairs_derived == 12
    assert stats.overlapping_items == 12 and stats.contradictions == 12
    assert stats.raw_agreement == pytest.approx(0.5)  # 3 of 6 rater pairs agree per item
    assert stats.kappa_method == "fleiss"
    outliers = {a.annotator_id for a in stats.annotators if a.outlier}
    assert outliers == {"mallory"}

    pairs, _ = export_all(stub)
    assert len(pairs) == 12  # duplicates from different annotators are not extra rows
    assert all((p.chosen, p.rejected) == ("good", "bad") for p in pairs)
    assert all((p.agree, p.disagree) == (3, 1) and p.weight == 0.75 for p in pairs)
    clean, _ = export_all(stub, exclude_outliers=True)
    assert all(p.weight == 1.0 and p.disagree == 0 for p in clean)


def test_concurrent_writers_are_all_acknowledged_exactly_once(stub: Stub) -> None:
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer(w: int) -> None:
        try:
            for i in range(25):
                key = f"w{w}-{i}" if i % 5 else "shared-key"  # every writer races on one key
                kw = {"prompt": f"w{w}-{i}"} if i % 5 else {"prompt": "shared"}
                reply = stub.SubmitComparison(comparison(key, **kw), timeout=30)
                with lock:
                    ids.append(reply.feedback_id)
        except BaseException as exc:  # asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(ids) == 200
    unique = set(ids)
    assert len(unique) == 8 * 20 + 1  # the shared key resolved to one record for everyone
    assert stub.GetStats(pb.GetStatsRequest()).records == len(unique)


def test_health_reflection_and_metrics(server: ServerThread, stub: Stub) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="plaudit.v1.FeedbackService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "plaudit.v1.FeedbackService" in services
    stub.SubmitComparison(comparison("m1"))
    stub.SubmitComparison(comparison("m1"))
    with pytest.raises(grpc.RpcError):
        stub.SubmitComparison(comparison("m2", prompt=""))
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    for needle in (
        'plaudit_feedback_events_total{kind="comparison",status="accepted"} 1.0',
        'plaudit_feedback_events_total{kind="comparison",status="duplicate"} 1.0',
        'plaudit_feedback_events_total{kind="comparison",status="rejected"} 1.0',
        "plaudit_feedback_commit_seconds_bucket",
        "plaudit_feedback_transaction_events_bucket",
        "plaudit_feedback_commit_batch_size_bucket",
        "plaudit_feedback_storage_errors_total 0.0",
        "plaudit_feedback_database_up 1.0",
    ):
        assert needle in text, needle


def test_unreachable_database_is_not_serving_and_unavailable_fast() -> None:
    server = ServerThread(
        "feedback",
        database_url="postgresql://postgres@127.0.0.1:1/test",
        health_interval_s=0.2,
        log_level="ERROR",
    ).start(wait=False)
    try:
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            time.sleep(0.5)
            reply = health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            t0 = time.monotonic()
            code, _ = code_of(Stub(channel).SubmitComparison, comparison("k"))
            assert code == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - t0 < 2.0
    finally:
        server.stop()
