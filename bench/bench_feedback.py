"""Feedback ingestion throughput: one commit per event vs group commit vs SubmitBatch.

For each database (SQLite embedded, PostgreSQL on 127.0.0.1:5432) one run measures, on real
HH-RLHF comparisons and with durable commits (SQLite WAL + synchronous=FULL; PostgreSQL's
default fsync'd commits):

* ``a``  the naive baseline: ``FeedbackStore.submit`` per event in process, one transaction and
  one durable commit per event (what a service without batching does per request);
* ``b``  ``SubmitComparison`` over gRPC from ``--clients`` concurrent clients (threads, one
  channel each): the server's group commit merges concurrent calls into one transaction;
* ``c``  ``SubmitBatch`` over gRPC: client streams of ``--batch-events`` events each, from
  ``--batch-clients`` concurrent clients; one transaction per stream.

The feedback service runs as its own process (``plaudit serve feedback``), so client and server
share the machine's cores, as they would on a single box. After each mode the stored record count
is checked against the acknowledgements: every acknowledged event must be there exactly once.
Targets (issue): >= 10,000 comparisons/s through SubmitBatch on SQLite, >= 5,000/s on PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import sqlalchemy as sa

from plaudit.demo import HH_PAIRS
from plaudit.services.common.preference_files import read_pairs
from plaudit.services.common.process import start_service
from plaudit.services.feedback.db import normalize_url
from plaudit.services.feedback.domain import Comparison
from plaudit.services.feedback.store import FeedbackStore
from plaudit.services.reward.client import wait_until_serving
from plaudit.v1 import feedback_pb2 as pb
from plaudit.v1 import feedback_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = HH_PAIRS
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
TARGETS = {"sqlite": 10_000, "postgresql": 5_000}


def load_texts(path: Path) -> list[tuple[str, str, str]]:
    return [
        (p.prompt, p.chosen, p.rejected)
        for p in read_pairs(path)
        if p.chosen.strip() and p.rejected.strip() and p.chosen.strip() != p.rejected.strip()
    ]


def comparisons(
    texts: list[tuple[str, str, str]], n: int, tag: str
) -> Iterator[tuple[str, str, str, str, str]]:
    """n (prompt, chosen, rejected, annotator, key) tuples cycling through the real pairs."""
    for i in range(n):
        prompt, chosen, rejected = texts[i % len(texts)]
        yield prompt, chosen, rejected, f"annotator-{i % 37}", f"{tag}-{i}"


def to_request(item: tuple[str, str, str, str, str]) -> pb.SubmitComparisonRequest:
    prompt, chosen, rejected, annotator, key = item
    return pb.SubmitComparisonRequest(
        prompt=prompt, chosen=chosen, rejected=rejected, annotator_id=annotator,
        idempotency_key=key,
    )  # fmt: skip


class Database:
    """A fresh, empty database for one backend (a temp SQLite file or a new PostgreSQL schema)."""

    def __init__(self, backend: str, postgres_url: str, workdir: Path) -> None:
        self.backend = backend
        self._admin: sa.Engine | None = None
        self._schema = ""
        if backend == "sqlite":
            self.url = f"sqlite:///{workdir / 'feedback.db'}"
            return
        self._admin = sa.create_engine(
            normalize_url(postgres_url), isolation_level="AUTOCOMMIT",
            connect_args={"connect_timeout": 3},
        )  # fmt: skip
        self._schema = f"bench_feedback_{uuid.uuid4().hex[:10]}"
        with self._admin.connect() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{self._schema}"'))
        url = normalize_url(postgres_url).update_query_dict(
            {"options": f"-csearch_path={self._schema}"}
        )
        self.url = url.render_as_string(hide_password=False)

    def drop(self) -> None:
        if self._admin is not None:
            with self._admin.connect() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{self._schema}" CASCADE'))
            self._admin.dispose()


def postgres_available(url: str) -> str | None:
    """None when PostgreSQL answers at ``url``; otherwise why not."""
    engine = sa.create_engine(normalize_url(url), connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return None
    except sa.exc.OperationalError as exc:
        return str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
    finally:
        engine.dispose()


def timed_parallel(workers: int, work: Callable[[int], list[float]]) -> tuple[float, list[float]]:
    """Run ``work(worker_index)`` on ``workers`` threads; (wall seconds, all latencies)."""
    barrier = threading.Barrier(workers + 1)

    def run(index: int) -> list[float]:
        barrier.wait()
        return work(index)

    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(run, i) for i in range(workers)]
        barrier.wait()
        start = time.perf_counter()
        latencies = [x for f in futures for x in f.result()]
        wall = time.perf_counter() - start
    return wall, latencies


def result_row(
    backend: str, mode: str, what: str, events: int, wall: float, latencies: list[float]
) -> dict[str, Any]:
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "backend": backend, "mode": mode, "what": what, "events": events,
        "seconds": round(wall, 3), "events_per_s": round(events / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }  # fmt: skip


Item = tuple[str, str, str, str, str]


def bench_naive(db_url: str, items: list[Item]) -> tuple[float, list[float]]:
    latencies = []
    with FeedbackStore(db_url) as store:
        start = time.perf_counter()
        for prompt, chosen, rejected, annotator, key in items:
            t0 = time.perf_counter()
            store.submit(
                Comparison(prompt=prompt, chosen=chosen, rejected=rejected,
                           annotator_id=annotator, idempotency_key=key)
            )  # fmt: skip
            latencies.append(time.perf_counter() - t0)
        return time.perf_counter() - start, latencies


def bench_unary(
    address: str, requests: list[pb.SubmitComparisonRequest], clients: int
) -> tuple[float, list[float]]:
    shards = [requests[i::clients] for i in range(clients)]

    def work(index: int) -> list[float]:
        latencies = []
        with grpc.insecure_channel(address) as channel:
            stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
            for request in shards[index]:
                t0 = time.perf_counter()
                reply = stub.SubmitComparison(request, timeout=60)
                latencies.append(time.perf_counter() - t0)
                assert reply.feedback_id
        return latencies

    return timed_parallel(clients, work)


def bench_batch(
    address: str, requests: list[pb.SubmitComparisonRequest], clients: int, batch_events: int
) -> tuple[float, list[float]]:
    streams = [
        [pb.SubmitBatchRequest(comparison=r) for r in requests[i : i + batch_events]]
        for i in range(0, len(requests), batch_events)
    ]
    shards = [streams[i::clients] for i in range(clients)]

    def work(index: int) -> list[float]:
        latencies = []
        with grpc.insecure_channel(address) as channel:
            stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
            for stream in shards[index]:
                t0 = time.perf_counter()
                reply = stub.SubmitBatch(iter(stream), timeout=120)
                latencies.append(time.perf_counter() - t0)
                assert reply.accepted == len(stream) and reply.rejected == 0, reply.rejected
        return latencies

    return timed_parallel(clients, work)


def stored_records(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        return int(stub.GetStats(pb.GetStatsRequest(), timeout=120).records)


def run_backend(
    backend: str, args: argparse.Namespace, texts: list[tuple[str, str, str]]
) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-feedback-") as tmp:
        db = Database(backend, args.postgres_url, Path(tmp))
        try:
            naive_items = list(comparisons(texts, args.naive_events, "naive"))
            wall, lat = bench_naive(db.url, naive_items)
            rows.append(result_row(backend, "a", "store.submit: 1 commit per event",
                                   len(naive_items), wall, lat))  # fmt: skip
            server = start_service("feedback", "--database-url", db.url)
            try:
                wait_until_serving(server.address, timeout=120)
                expected = len(naive_items)
                unary = [to_request(x) for x in comparisons(texts, args.unary_events, "unary")]
                stub_warm = [to_request(x) for x in comparisons(texts, 50, "warm")]
                bench_unary(server.address, stub_warm, 2)  # connections, code paths
                expected += len(stub_warm)
                wall, lat = bench_unary(server.address, unary, args.clients)
                expected += len(unary)
                rows.append(result_row(backend, "b", f"SubmitComparison x {args.clients} clients",
                                       len(unary), wall, lat))  # fmt: skip
                items = comparisons(texts, args.batch_events_total, "batch")
                batch = [to_request(x) for x in items]
                wall, lat = bench_batch(server.address, batch, args.batch_clients,
                                        args.batch_events)  # fmt: skip
                expected += len(batch)
                rows.append(result_row(
                    backend, "c",
                    f"SubmitBatch {args.batch_events}/stream x {args.batch_clients} clients",
                    len(batch), wall, lat))  # fmt: skip
                stored = stored_records(server.address)
                if stored != expected:
                    raise SystemExit(f"{backend}: {stored} records stored, {expected} acknowledged")
            finally:
                server.stop()
        finally:
            db.drop()
    target = TARGETS[backend]
    for row in rows:
        row["vs_a"] = round(row["events_per_s"] / rows[0]["events_per_s"], 1)
        row["target"] = target if row["mode"] == "c" else None
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HH or TRL pairs JSONL")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES)
    parser.add_argument("--naive-events", type=int, default=500)
    parser.add_argument("--unary-events", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=8, help="concurrent unary clients")
    parser.add_argument("--batch-events-total", type=int, default=40_000)
    parser.add_argument("--batch-events", type=int, default=1000, help="events per stream")
    parser.add_argument("--batch-clients", type=int, default=2)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    texts = load_texts(args.data)
    print(f"{len(texts)} distinct real comparisons from {args.data}")
    rows: list[dict[str, Any]] = []
    for backend in args.backends.split(","):
        if backend == "postgresql" and (why := postgres_available(args.postgres_url)):
            print(f"postgresql: skipped, no server at {args.postgres_url} ({why})")
            continue
        print(f"{backend}: running modes a, b, c ...", flush=True)
        rows += run_backend(backend, args, texts)

    header = f"{'db':<11}{'mode':<5}{'what':<42}{'events':>7}{'ev/s':>10}{'p50 ms':>9}"
    header += f"{'p99 ms':>9}{'vs a':>7}{'target':>9}"
    print("\n" + header)
    for r in rows:
        verdict = (
            ""
            if r["target"] is None
            else (f"{'ok' if r['events_per_s'] >= r['target'] else 'MISS'} {r['target']}")
        )
        print(f"{r['backend']:<11}{r['mode']:<5}{r['what']:<42}{r['events']:>7}"
              f"{r['events_per_s']:>10.0f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
              f"{r['vs_a']:>6.1f}x{verdict:>10}")  # fmt: skip
    print("every acknowledged event was stored exactly once")
    out = args.json_out or REPO / "bench" / "results" / (
        f"bench_feedback-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
