"""Crash safety: SIGKILL the feedback service while clients stream to it, restart it on the same
database, let the clients retry what was not acknowledged with the same idempotency keys, and
prove that every event is stored exactly once, under the id it was acknowledged with. On SQLite
and on PostgreSQL.

One client holds a SubmitBatch stream open after sending 12 events: the service commits them in
chunks of 5 while the stream is still arriving, so when it dies 10 are committed but none is
acknowledged. Its retry must find those 10 (``duplicate``) and store only the other 10.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa

from plaudit.services.common.process import free_port
from plaudit.services.feedback.db import normalize_url
from plaudit.services.reward.client import wait_until_serving
from plaudit.v1 import feedback_pb2 as pb
from plaudit.v1 import feedback_pb2_grpc
from tests.conftest import REPO

CHUNK = 5  # --stream-commit-events: a stream commits every 5 events while it is arriving
RECONNECT = [  # come back quickly once the restarted server listens again
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
]
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def start_feedback(url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "plaudit.cli", "serve", "feedback", "--database-url", url,
        "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--http-port", "0",
        "--stream-commit-events", str(CHUNK), "--auth-disabled", "--log-level", "WARNING",
        "--log-format", "text",
    ]  # fmt: skip
    with log.open("ab") as sink:
        proc = subprocess.Popen(command, cwd=REPO, stdout=sink, stderr=sink)
    wait_until_serving(f"127.0.0.1:{port}", timeout=60, service="plaudit.v1.FeedbackService")
    return proc


def event(client: str, i: int) -> pb.SubmitBatchRequest:
    key = f"{client}-{i}"
    if i % 3 == 2:
        return pb.SubmitBatchRequest(
            rating=pb.SubmitRatingRequest(
                prompt=f"{client} question {i}", completion=f"answer {i}", score=i % 2,
                annotator_id=client, idempotency_key=key,
            )
        )  # fmt: skip
    return pb.SubmitBatchRequest(
        comparison=pb.SubmitComparisonRequest(
            prompt=f"{client} question {i}", chosen=f"good {i}", rejected=f"bad {i}",
            annotator_id=client, idempotency_key=key,
        )
    )  # fmt: skip


def key_of(request: pb.SubmitBatchRequest) -> str:
    which = request.WhichOneof("event")
    assert which is not None
    return str(getattr(request, which).idempotency_key)


@dataclass
class Client:
    """Sends its events in groups of 5, alternately as one stream and as unary calls, and
    retries every group until each of its events is acknowledged."""

    name: str
    count: int
    acked: dict[str, tuple[int, bool]] = field(default_factory=dict)  # key -> (id, duplicate)
    failures: int = 0
    error: BaseException | None = None

    def run(self, address: str, deadline: float) -> None:
        try:
            with grpc.insecure_channel(address, options=RECONNECT) as channel:
                self._run(feedback_pb2_grpc.FeedbackServiceStub(channel), deadline)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _run(self, stub: Any, deadline: float) -> None:
        events = [event(self.name, i) for i in range(self.count)]
        start = 0
        while start < len(events):
            assert time.monotonic() < deadline, f"{self.name}: not done in time"
            group = [e for e in events[start : start + 5] if key_of(e) not in self.acked]
            try:
                if (start // 5) % 2 == 0:
                    self._stream(stub, group)
                else:
                    self._unary(stub, group)
            except grpc.RpcError as exc:
                assert exc.code() in RETRYABLE, f"{exc.code()}: {exc.details()}"
                self.failures += 1
                time.sleep(0.05)
                continue
            start += 5

    def _stream(self, stub: Any, group: list[pb.SubmitBatchRequest]) -> None:
        def slowly() -> Iterator[pb.SubmitBatchRequest]:
            for request in group:
                yield request
                time.sleep(0.02)

        reply = stub.SubmitBatch(slowly(), timeout=20, wait_for_ready=True)
        for request, result in zip(group, reply.results, strict=True):
            assert result.code == 0, result.error
            self.acked[key_of(request)] = (int(result.feedback_id), result.duplicate)

    def _unary(self, stub: Any, group: list[pb.SubmitBatchRequest]) -> None:
        for request in group:
            which = request.WhichOneof("event")
            call = stub.SubmitComparison if which == "comparison" else stub.SubmitRating
            reply = call(getattr(request, which), timeout=20, wait_for_ready=True)
            self.acked[key_of(request)] = (int(reply.feedback_id), reply.duplicate)


def stored(engine: sa.Engine) -> dict[str, tuple[int, str]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT idempotency_key, id, prompt FROM feedback")).all()
    keys = [row[0] for row in rows]
    assert len(keys) == len(set(keys))
    return {row[0]: (int(row[1]), str(row[2])) for row in rows}


def test_sigkill_mid_stream_then_retries_store_every_event_exactly_once(
    database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    log = tmp_path / "feedback.log"
    engine = sa.create_engine(normalize_url(database_url))
    first = start_feedback(database_url, port, log)
    second: subprocess.Popen[bytes] | None = None
    gate = threading.Event()
    held = [event("held", i) for i in range(20)]
    held_reply: list[pb.SubmitBatchResponse] = []
    held_failures: list[grpc.StatusCode] = []

    def held_stream() -> Iterator[pb.SubmitBatchRequest]:
        yield from held[:12]
        gate.wait(60)  # the service dies while this stream is open
        yield from held[12:]

    def run_held() -> None:
        with grpc.insecure_channel(address, options=RECONNECT) as channel:
            stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
            try:
                stub.SubmitBatch(held_stream(), timeout=60)
            except grpc.RpcError as exc:
                held_failures.append(exc.code())
            while not held_reply and len(held_failures) < 50:  # retry all 20, same keys
                try:
                    held_reply.append(stub.SubmitBatch(iter(held), timeout=20, wait_for_ready=True))
                except grpc.RpcError as exc:
                    held_failures.append(exc.code())
                    time.sleep(0.1)

    clients = [Client(f"client{c}", 60) for c in range(3)]
    deadline = time.monotonic() + 150
    threads = [threading.Thread(target=c.run, args=(address, deadline)) for c in clients]
    threads.append(threading.Thread(target=run_held))
    try:
        for thread in threads:
            thread.start()
        # kill once the held stream's two chunks are committed and the others are under way
        while True:
            assert time.monotonic() < deadline, "the clients never got going"
            rows = stored(engine)
            if sum(f"held-{i}" in rows for i in range(10)) == 10 and len(rows) >= 40:
                break
            time.sleep(0.05)
        assert not any(f"held-{i}" in rows for i in range(10, 20))  # the open chunk is not
        first.kill()  # SIGKILL: no drain, no cleanup
        assert first.wait(30) == -9
        acked_before_crash = {k: v for c in clients for k, v in c.acked.items()}
        gate.set()
        second = start_feedback(database_url, port, log)
        for thread in threads:
            thread.join(timeout=max(1.0, deadline - time.monotonic()))
        for client in clients:
            assert client.error is None, f"{client.name}: {client.error!r}"
            assert len(client.acked) == client.count
    finally:
        gate.set()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(30)
        rows = stored(engine)
        engine.dispose()

    # the crash was felt: the held stream and calls of the other clients failed and were retried
    assert held_failures and held_failures[0] in RETRYABLE
    assert sum(c.failures for c in clients) >= 1
    assert 10 <= len(acked_before_crash) < sum(c.count for c in clients)
    assert held_reply, f"the held client never got through: {held_failures}"
    # every event is stored exactly once, and nothing else is
    expected = {key_of(e) for e in held} | {f"{c.name}-{i}" for c in clients for i in range(60)}
    assert set(rows) == expected
    assert sorted(feedback_id for feedback_id, _ in rows.values()) == list(
        range(1, len(expected) + 1)
    )  # ids without gaps: nothing half-written survived the crash
    # every acknowledgement, before or after the crash, names the stored row
    for client in clients:
        for key, (feedback_id, _) in client.acked.items():
            assert rows[key][0] == feedback_id, key
            assert rows[key][1].startswith(client.name)
    assert all(rows[k][0] == v[0] for k, v in acked_before_crash.items())
    # the 10 events committed in the held stream before the crash come back as duplicates
    (reply,) = held_reply
    assert [r.duplicate for r in reply.results] == [True] * 10 + [False] * 10
    assert all(
        rows[key_of(e)][0] == int(r.feedback_id) for e, r in zip(held, reply.results, strict=True)
    )
    assert "Traceback" not in log.read_text(errors="replace")
