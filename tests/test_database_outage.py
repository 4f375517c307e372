"""A PostgreSQL outage, made by a TCP proxy between the feedback service and the database (the
shared server itself is never stopped): calls fail fast with UNAVAILABLE, health says
NOT_SERVING, nothing is half-written, and the service recovers by itself when the database is
reachable again; retries with the same idempotency keys then store every event exactly once.

The proxy fails in two ways: ``refused`` (nothing listens: connections are refused at once) and
``silent`` (a blackholed host: connections are accepted and never answered, so only the connect
timeout of ``database_connect_timeout_s`` = 2 s ends them).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Literal

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plaudit.services.feedback.db import normalize_url
from plaudit.v1 import feedback_pb2 as pb
from plaudit.v1 import feedback_pb2_grpc
from tests.conftest import POSTGRES_URL, ServerThread

Outage = Literal["refused", "silent"]
FAST_S = 4.5  # an answer during the outage: the 2 s connect timeout, and slack (~2.2 s seen)


class CuttableProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; :meth:`cut` takes the database away."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode: Outage | None = None
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._held: list[socket.socket] = []
        self._listener = self._listen(0)
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        return listener

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)  # the listener is being replaced (refused -> restored)
                continue
            with self._lock:
                if self.mode == "silent":
                    self._held.append(client)  # accepted, never answered
                    continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self, mode: Outage) -> None:
        """Drop every connection; then refuse new ones, or accept and ignore them."""
        with self._lock:
            self.mode = mode
            pairs, self._pairs = self._pairs, []
        if mode == "refused":  # shutdown wakes the thread blocked in accept(); close alone won't
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        for pair in pairs:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def restore(self) -> None:
        with self._lock:
            if self.mode == "refused":
                self._listener = self._listen(self.port)
            self.mode = None
            held, self._held = self._held, []
        for s in held:
            s.close()

    def close(self) -> None:
        self._closed = True
        self.cut("refused")


@pytest.fixture
def postgres_via_proxy(postgres_admin: sa.Engine) -> Iterator[tuple[str, CuttableProxy, str]]:
    """(URL through the proxy, the proxy, schema) for an empty schema of the shared server."""
    schema = f"outage_test_{uuid.uuid4().hex[:12]}"
    with postgres_admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    direct = normalize_url(POSTGRES_URL)
    proxy = CuttableProxy((direct.host or "127.0.0.1", direct.port or 5432))
    url = direct.set(host="127.0.0.1", port=proxy.port).update_query_dict(
        {"options": f"-csearch_path={schema}"}
    )
    try:
        yield url.render_as_string(hide_password=False), proxy, schema
    finally:
        proxy.close()
        with postgres_admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))


def comparison(key: str) -> pb.SubmitComparisonRequest:
    return pb.SubmitComparisonRequest(
        prompt=f"prompt {key}", chosen="good", rejected="bad", annotator_id="a",
        idempotency_key=key,
    )  # fmt: skip


def health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)


def wait_for(condition: object, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() - started < timeout, f"{what} did not happen in {timeout} s"
        time.sleep(0.1)
    return time.monotonic() - started


@pytest.mark.parametrize("mode", ["refused", "silent"])
def test_outage_fails_fast_stores_nothing_half_and_recovers_by_itself(
    postgres_via_proxy: tuple[str, CuttableProxy, str], postgres_admin: sa.Engine, mode: Outage
) -> None:
    url, proxy, schema = postgres_via_proxy
    server = ServerThread(
        "feedback",
        database_url=url,
        health_interval_s=0.3,
        database_connect_timeout_s=2,
        stream_commit_events=5,
        log_level="ERROR",
    ).start()
    acked: dict[str, int] = {}
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
            for i in range(5):
                reply_ = stub.SubmitComparison(comparison(f"before-{i}"), timeout=10)
                acked[f"before-{i}"] = int(reply_.feedback_id)
            assert health(channel) == health_pb2.HealthCheckResponse.SERVING

            proxy.cut(mode)
            failed: list[str] = []
            for i in range(3):  # each call answers UNAVAILABLE within the connect timeout
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as err:
                    stub.SubmitComparison(comparison(f"during-{i}"), timeout=30)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
                assert time.monotonic() - started < FAST_S
                failed.append(f"during-{i}")
            batch = [pb.SubmitBatchRequest(comparison=comparison(f"batch-{i}")) for i in range(8)]
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                stub.SubmitBatch(iter(batch), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 2 * FAST_S  # two chunks, each fails fast
            for call, request in (
                (stub.GetStats, pb.GetStatsRequest()),
                (lambda r, timeout: list(stub.ExportPreferences(r, timeout=timeout)),
                 pb.ExportPreferencesRequest()),
            ):  # fmt: skip
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as err:
                    call(request, timeout=30)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - started < FAST_S
            started = time.monotonic()
            event = {"prompt": "p", "chosen": "a", "rejected": "b", "annotator_id": "a"}
            body = json.dumps({**event, "idempotency_key": "http-during"}).encode()
            http_request = urllib.request.Request(
                server.http_url + "/api/v1/comparisons",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            with pytest.raises(urllib.error.HTTPError) as http_err:
                urllib.request.urlopen(http_request, timeout=30)
            assert http_err.value.code == 503 and http_err.value.headers["Retry-After"]
            assert time.monotonic() - started < FAST_S
            wait_for(lambda: health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING,
                     FAST_S, "NOT_SERVING")  # fmt: skip

            proxy.restore()  # the database is back: no restart, no operator
            took = wait_for(
                lambda: health(channel) == health_pb2.HealthCheckResponse.SERVING,
                10,
                "recovery",
            )
            assert took < 10
            for key in failed:  # the clients retry what was not acknowledged
                acked[key] = int(stub.SubmitComparison(comparison(key), timeout=10).feedback_id)
            reply = stub.SubmitBatch(iter(batch), timeout=10)
            for request_, result in zip(batch, reply.results, strict=True):
                assert result.code == 0
                acked[request_.comparison.idempotency_key] = int(result.feedback_id)
            # a retry of what was stored before the outage changes nothing
            again = stub.SubmitComparison(comparison("before-0"), timeout=10)
            assert again.duplicate and int(again.feedback_id) == acked["before-0"]
    finally:
        server.stop()

    with postgres_admin.connect() as conn:
        rows = conn.execute(
            sa.text(f'SELECT idempotency_key, id FROM "{schema}".feedback ORDER BY id')
        ).all()
    stored = {key: int(feedback_id) for key, feedback_id in rows}
    assert len(rows) == len(stored) == len(acked)  # exactly once, nothing else
    assert stored == acked
    assert [int(feedback_id) for _, feedback_id in rows] == list(range(1, len(rows) + 1))
