"""Issue 17 item 8: database error texts (host names, users, ports) never reach callers.

The driver's message stays in the server log; the caller gets UNAVAILABLE with a generic text
saying what was being done."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from plaudit.services.common.errors import UnavailableError
from plaudit.services.feedback.domain import Comparison
from plaudit.services.feedback.store import FeedbackStore
from plaudit.v1 import feedback_pb2 as pb
from plaudit.v1 import feedback_pb2_grpc
from tests.conftest import ServerThread

HOST = "no-such-host.invalid"
SECRET_USER = "dbadmin_secret_user"
UNREACHABLE = f"postgresql+psycopg://{SECRET_USER}@{HOST}:5432/feedbackdb"


def _leaks(text: str) -> list[str]:
    return [word for word in (HOST, SECRET_USER, "5432", "feedbackdb") if word in text]


def _comparison(key: str) -> Comparison:
    return Comparison(
        prompt="p", chosen="a", rejected="b", annotator_id="tester", idempotency_key=key
    )


def test_the_store_error_names_no_host_but_the_log_does(caplog: pytest.LogCaptureFixture) -> None:
    store = FeedbackStore(UNREACHABLE, migrate=False, connect_timeout_s=1)
    try:
        with caplog.at_level(logging.ERROR, logger="plaudit.services.feedback.db"):
            with pytest.raises(UnavailableError) as err:
                store.submit(_comparison("k1"))
            with pytest.raises(UnavailableError) as read_err:
                store.stats()
    finally:
        store.close()
    for message in (err.value.message, read_err.value.message):
        assert not _leaks(message), message
        assert "feedback database unavailable" in message
    logged = " ".join(str(getattr(r, "reason", "")) for r in caplog.records)
    assert HOST in logged  # the operator still sees the cause


@pytest.fixture
def feedback_server(tmp_path: Path) -> Iterator[ServerThread]:
    server = ServerThread(
        "feedback", database_url=f"sqlite:///{tmp_path / 'fb.db'}", log_level="WARNING"
    )
    yield server.start()
    server.stop()


def test_a_caller_sees_no_database_host_in_grpc_errors(feedback_server: ServerThread) -> None:
    """The database goes away behind a serving feedback service (its store now points at a host
    that does not resolve): the caller's UNAVAILABLE details name no host, user or database."""
    healthy = feedback_server.server.store
    broken = FeedbackStore(UNREACHABLE, migrate=False, connect_timeout_s=1)
    feedback_server.server.store = broken
    try:
        with grpc.insecure_channel(feedback_server.address) as channel:
            stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.SubmitComparison(
                    pb.SubmitComparisonRequest(
                        prompt="p", chosen="a", rejected="b", annotator_id="tester",
                        idempotency_key="k1",
                    ),
                    timeout=30,
                )  # fmt: skip
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            details = err.value.details() or ""
            assert not _leaks(details), details
            with pytest.raises(grpc.RpcError) as read_err:
                stub.GetStats(pb.GetStatsRequest(), timeout=30)
            assert read_err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not _leaks(read_err.value.details() or ""), read_err.value.details()
    finally:
        feedback_server.server.store = healthy
        broken.close()
