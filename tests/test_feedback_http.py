"""The feedback service's JSON API over HTTP, on SQLite and PostgreSQL: the same validation,
storage and idempotency as gRPC, error mapping, the task queue and active learning."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from plaudit.services.common.errors import PlauditError, UnavailableError
from plaudit.services.feedback.domain import NewTask
from plaudit.services.feedback.http import FeedbackHttpApi, make_app
from plaudit.services.feedback.metrics import FeedbackMetrics
from plaudit.services.feedback.store import FeedbackStore
from plaudit.services.feedback.tasks import TaskPicker, smallest_gap
from plaudit.services.reward.client import RewardClient
from plaudit.v1 import feedback_pb2 as pb
from plaudit.v1 import feedback_pb2_grpc
from tests.conftest import ServerThread

Reply = tuple[int, Any, dict[str, str]]


def call(
    base: str,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    content_type: str = "application/json",
) -> Reply:
    """One HTTP request; (status, decoded JSON body, headers)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        base + path, data=data, method=method, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null"), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null"), dict(err.headers)


def start_server(database_url: str, **settings: Any) -> ServerThread:
    fields = {"max_text_bytes": 2000, "log_level": "WARNING", **settings}
    return ServerThread("feedback", database_url=database_url, http_port=0, **fields).start()


@pytest.fixture
def server(database_url: str) -> Iterator[ServerThread]:
    running = start_server(database_url, labels_per_task=2, max_events_per_batch=50)
    yield running
    running.stop()


def comparison(key: str, **kw: Any) -> dict[str, Any]:
    body = {
        "prompt": "Q?",
        "chosen": "good",
        "rejected": "bad",
        "annotator_id": "ann-1",
        "idempotency_key": key,
    }
    return {**body, **kw}


def import_tasks(base: str, tasks: list[dict[str, Any]]) -> list[int]:
    status, reply, _ = call(base, "POST", "/api/v1/tasks", {"tasks": tasks})
    assert status in (200, 201), reply
    return [t["task_id"] for t in reply["tasks"]]


def next_task(base: str, annotator: str) -> dict[str, Any]:
    status, reply, _ = call(base, "GET", f"/api/v1/tasks/next?annotator_id={annotator}")
    assert status == 200, reply
    return dict(reply)


def label(base: str, task: dict[str, Any], annotator: str) -> Reply:
    """Submit a comparison for a two-completion task, as the page does."""
    first, second = task["completions"][:2]
    body = {
        "prompt": task["prompt"],
        "chosen": first,
        "rejected": second,
        "annotator_id": annotator,
        "idempotency_key": f"t{task['task_id']}.comparison.{annotator}",
        "task_id": task["task_id"],
    }
    return call(base, "POST", "/api/v1/comparisons", body)


# -- submissions ------------------------------------------------------------------------------
def test_every_kind_is_stored_once_and_shared_with_grpc(server: ServerThread) -> None:
    base = server.http_url
    status, first, _ = call(base, "POST", "/api/v1/comparisons", comparison("c1", margin=0.5))
    assert status == 201 and first["duplicate"] is False
    status, retry, _ = call(base, "POST", "/api/v1/comparisons", comparison("c1", margin=0.5))
    assert (status, retry["feedback_id"], retry["duplicate"]) == (200, first["feedback_id"], True)
    status, clash, _ = call(base, "POST", "/api/v1/comparisons", comparison("c1", chosen="x"))
    assert status == 409
    assert clash["error"]["code"] == "ALREADY_EXISTS"
    assert clash["error"]["message"].startswith("idempotency_key")

    ranking = {"prompt": "R?", "completions": ["a", "b", "c"], "annotator_id": "ann-1"}
    assert call(base, "POST", "/api/v1/rankings", {**ranking, "idempotency_key": "r1"})[0] == 201
    rating = {"prompt": "S?", "annotator_id": "ann-1", "scale_min": 1, "scale_max": 5}
    for key, completion, score in (("s1", "great", 5), ("s2", "meh", 2)):
        body = {**rating, "idempotency_key": key, "completion": completion, "score": score}
        assert call(base, "POST", "/api/v1/ratings", body)[0] == 201
    thumbs = {"prompt": "T?", "completion": "yes", "score": 1, "annotator_id": "ann-1"}
    assert call(base, "POST", "/api/v1/ratings", {**thumbs, "idempotency_key": "t1"})[0] == 201
    correction = {
        "prompt": "C?",
        "completion": "teh answer",
        "corrected": "the answer",
        "annotator_id": "ann-1",
        "idempotency_key": "x1",
    }
    assert call(base, "POST", "/api/v1/corrections", correction)[0] == 201

    with grpc.insecure_channel(server.address) as channel:
        grpc_stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        # one idempotency space: a gRPC retry of an HTTP submission is a duplicate
        again = grpc_stub.SubmitComparison(
            pb.SubmitComparisonRequest(**comparison("c1", margin=0.5)), timeout=10
        )
        assert (again.feedback_id, again.duplicate) == (first["feedback_id"], True)
        stats = grpc_stub.GetStats(pb.GetStatsRequest(), timeout=10)
        pages = grpc_stub.ExportPreferences(pb.ExportPreferencesRequest(), timeout=10)
        pairs = [pair for page in pages for pair in page.pairs]
    assert dict(stats.records_by_kind) == {
        "comparison": 1,
        "ranking": 1,
        "rating": 3,
        "correction": 1,
    }
    by_prompt = {(p.prompt, p.chosen, p.rejected) for p in pairs}
    assert ("Q?", "good", "bad") in by_prompt
    assert ("S?", "great", "meh") in by_prompt
    assert ("C?", "the answer", "teh answer") in by_prompt
    assert sum(1 for p in pairs if p.prompt == "R?") == 3

    status, http_stats, _ = call(base, "GET", "/api/v1/stats")
    assert status == 200
    assert http_stats["records"] == stats.records == 6
    assert http_stats["pairs_derived"] == stats.pairs_derived
    assert http_stats["annotators"][0]["annotator_id"] == "ann-1"

    metrics_url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    assert (
        'plaudit_feedback_http_requests_total{route="/api/v1/comparisons",status="201"} 1.0' in text
    )
    assert 'plaudit_feedback_events_total{kind="comparison",status="duplicate"} 2.0' in text


BAD_REQUESTS: list[tuple[str, Any, str]] = [
    ("comparisons", comparison("k", prompt=""), "prompt"),
    ("comparisons", comparison("k", prompt=7), "prompt"),
    ("comparisons", {k: v for k, v in comparison("k").items() if k != "chosen"}, "chosen"),
    ("comparisons", comparison("k", chosen="same", rejected="same"), "rejected"),
    ("comparisons", comparison("k", chosen="x" * 2001), "chosen"),
    ("comparisons", comparison("k", margin=-1), "margin"),
    ("comparisons", comparison("k", margin="big"), "margin"),
    ("comparisons", comparison(""), "idempotency_key"),
    ("comparisons", comparison("k", annotator_id=" "), "annotator_id"),
    ("comparisons", comparison("k", metadata={f"k{i}": "v" for i in range(40)}), "metadata"),
    ("comparisons", comparison("k", metadata={"comment": 5}), "metadata"),
    ("comparisons", comparison("k", chosen_text="typo"), "chosen_text"),
    ("comparisons", comparison("k", task_id="7"), "task_id"),
    ("comparisons", [comparison("k")], "body"),
    (
        "rankings",
        {"prompt": "p", "completions": ["only"], "annotator_id": "a", "idempotency_key": "k"},
        "completions",
    ),
    (
        "rankings",
        {
            "prompt": "p",
            "completions": ["a", "b", "a"],
            "annotator_id": "a",
            "idempotency_key": "k",
        },
        "completions[2]",
    ),
    (
        "rankings",
        {"prompt": "p", "completions": "a,b", "annotator_id": "a", "idempotency_key": "k"},
        "completions",
    ),
    (
        "ratings",
        {
            "prompt": "p",
            "completion": "c",
            "score": 7,
            "scale_min": 1,
            "scale_max": 5,
            "annotator_id": "a",
            "idempotency_key": "k",
        },
        "score",
    ),
    (
        "ratings",
        {"prompt": "p", "completion": "c", "annotator_id": "a", "idempotency_key": "k"},
        "score",
    ),
    (
        "ratings",
        {
            "prompt": "p",
            "completion": "c",
            "score": 1,
            "scale_min": 5,
            "scale_max": 1,
            "annotator_id": "a",
            "idempotency_key": "k",
        },
        "scale_min",
    ),
    (
        "corrections",
        {
            "prompt": "p",
            "completion": "c",
            "corrected": "c",
            "annotator_id": "a",
            "idempotency_key": "k",
        },
        "corrected",
    ),
    ("tasks", {"tasks": [{"prompt": "p", "completions": ["one"]}]}, "tasks[0].completions"),
    (
        "tasks",
        {"tasks": [{"prompt": "p", "completions": ["a", "b"]}, {"prompt": " ", "completions": []}]},
        "tasks[1].prompt",
    ),
    (
        "tasks",
        {"tasks": [{"prompt": "p", "completions": ["a", "b"], "extra": 1}]},
        "tasks[0].extra",
    ),
    ("tasks", {"tasks": []}, "tasks"),
    ("tasks", {"tasks": [{"prompt": "p", "completions": ["a", "b"]}] * 51}, "tasks"),
    ("tasks/1/skip", {"annotator_id": ""}, "annotator_id"),
]


def test_bad_requests_are_400_naming_the_field_and_store_nothing(server: ServerThread) -> None:
    base = server.http_url
    for path, body, field in BAD_REQUESTS:
        status, reply, _ = call(base, "POST", f"/api/v1/{path}", body)
        assert status == 400, (path, body, reply)
        error = reply["error"]
        assert error["code"] == "INVALID_ARGUMENT", error
        assert error["field"] == field, (path, error)
        assert error["message"].startswith(field), error
    status, reply, _ = call(
        base, "POST", "/api/v1/comparisons", raw=b'{"prompt": "Q", "margin": NaN'
    )
    assert (status, reply["error"]["field"]) == (400, "body")
    status, reply, _ = call(  # NaN is valid JSON to Python; the domain refuses it
        base,
        "POST",
        "/api/v1/comparisons",
        raw=json.dumps(comparison("k", margin=float("nan"))).encode(),
    )
    assert (status, reply["error"]["field"]) == (400, "margin")
    status, reply, _ = call(
        base, "POST", "/api/v1/comparisons", comparison("k"), content_type="text/plain"
    )
    assert (status, reply["error"]["field"]) == (400, "body")
    status, reply, _ = call(base, "GET", "/api/v1/tasks/next")
    assert (status, reply["error"]["field"]) == (400, "annotator_id")
    status, reply, _ = call(base, "GET", "/api/v1/stats")
    assert reply["records"] == 0 and reply["tasks"]["total"] == 0


def test_labels_must_match_their_task(server: ServerThread) -> None:
    base = server.http_url
    [task_id] = import_tasks(base, [{"prompt": "P", "completions": ["one", "two"]}])
    body = comparison("k", prompt="P", chosen="one", rejected="two", task_id=task_id)
    for change, field in (
        ({"prompt": "other"}, "prompt"),
        ({"chosen": "three"}, "chosen"),
        ({"rejected": "three"}, "rejected"),
    ):
        status, reply, _ = call(base, "POST", "/api/v1/comparisons", {**body, **change})
        assert (status, reply["error"]["field"]) == (400, field)
    status, reply, _ = call(base, "POST", "/api/v1/comparisons", {**body, "task_id": 999})
    assert status == 404 and reply["error"]["code"] == "NOT_FOUND"
    assert call(base, "GET", "/api/v1/tasks/999")[0] == 404
    assert call(base, "POST", "/api/v1/tasks/999/skip", {"annotator_id": "a"})[0] == 404
    status, reply, _ = call(base, "POST", "/api/v1/comparisons", body)
    assert status == 201 and reply["task_labels"] == 1
    status, reply, _ = call(base, "POST", "/api/v1/comparisons", body)  # a retry counts once
    assert status == 200 and reply["duplicate"] and reply["task_labels"] == 1
    status, task, _ = call(base, "GET", f"/api/v1/tasks/{task_id}")
    assert (status, task["labels"], task["labels_per_task"]) == (200, 1, 2)
    with FeedbackStore(server.settings["database_url"], migrate=False) as store:
        stored = store.get(int(reply["feedback_id"]))
    assert stored.event.metadata == {"task_id": str(task_id)}


# -- the queue ------------------------------------------------------------------------------
def test_queue_leases_labels_skips_and_reimports(server: ServerThread) -> None:
    base = server.http_url
    tasks = [{"prompt": f"P{i}", "completions": [f"a{i}", f"b{i}"]} for i in range(3)]
    t0, t1, t2 = import_tasks(base, tasks)
    status, again, _ = call(base, "POST", "/api/v1/tasks", {"tasks": tasks})
    assert (status, again["imported"], again["existing"]) == (200, 0, 3)
    assert [t["task_id"] for t in again["tasks"]] == [t0, t1, t2]
    status, clash, _ = call(
        base, "POST", "/api/v1/tasks", {"tasks": [{**tasks[0], "key": again["tasks"][1]["key"]}]}
    )
    assert status == 409 and clash["error"]["code"] == "ALREADY_EXISTS"

    alice = next_task(base, "alice")  # no reward service: queue order
    assert (alice["task"]["task_id"], alice["selection"]["reason"]) == (t0, "queue")
    assert alice["queue"] == {
        "total": 3,
        "pending": 3,
        "done": 0,
        "labels_per_task": 2,
        "annotator": {"labelled": 0, "skipped": 0},
    }
    resumed = next_task(base, "alice")  # a reload shows the same task
    assert (resumed["task"]["task_id"], resumed["selection"]["reason"]) == (t0, "resumed")
    assert next_task(base, "bob")["task"]["task_id"] == t0  # two labels wanted: room for bob
    assert next_task(base, "carol")["task"]["task_id"] == t1  # t0 is held by alice and bob

    assert label(base, alice["task"], "alice")[0] == 201
    assert next_task(base, "alice")["task"]["task_id"] == t1  # labelled tasks are skipped
    assert call(base, "POST", f"/api/v1/tasks/{t1}/skip", {"annotator_id": "alice"})[0] == 200
    after_skip = next_task(base, "alice")
    assert after_skip["task"]["task_id"] == t2
    assert after_skip["queue"]["annotator"] == {"labelled": 1, "skipped": 1}

    status, reply, _ = label(base, next_task(base, "bob")["task"], "bob")
    assert reply["task_labels"] == 2  # t0 is done
    dave = next_task(base, "dave")
    assert dave["task"]["task_id"] == t1  # carol's lease and alice's skip leave room
    assert dave["queue"]["done"] == 1 and dave["queue"]["pending"] == 2
    assert next_task(base, "erin")["task"]["task_id"] == t2
    assert next_task(base, "frank")["task"] is None  # every place is held or labelled


def test_expired_leases_free_their_place(database_url: str) -> None:
    with FeedbackStore(database_url) as store:
        [task] = store.tasks.import_tasks([NewTask(prompt="P", completions=["a", "b"])])
        rules = {"lease_ms": 1000, "labels_needed": 1}
        assert store.tasks.claim(task.task_id, "alice", now_ms=0, lease_ms=1000, labels_needed=1)
        assert not store.tasks.claim(
            task.task_id, "bob", now_ms=500, lease_ms=1000, labels_needed=1
        )
        assert store.tasks.candidates("bob", now_ms=500, limit=5, shuffle=False, **rules) == []
        assert store.tasks.leased("alice", now_ms=500, **rules) is not None
        assert store.tasks.leased("alice", now_ms=1500, **rules) is None
        [free] = store.tasks.candidates("bob", now_ms=1500, limit=5, shuffle=True, **rules)
        assert free.task_id == task.task_id
        assert store.tasks.claim(task.task_id, "bob", now_ms=1500, lease_ms=1000, labels_needed=1)
        assert store.tasks.record_label(task.task_id, "bob", 1, now_ms=1600) == 1
        assert store.tasks.record_label(task.task_id, "bob", 1, now_ms=1700) == 1
        assert not store.tasks.claim(
            task.task_id, "carol", now_ms=9000, lease_ms=1000, labels_needed=1
        )
        stats = store.tasks.stats(1, "bob")
        assert (stats.total, stats.pending, stats.done, stats.annotator_labelled) == (1, 0, 1, 1)


def test_concurrent_annotators_never_overfill_a_task(database_url: str) -> None:
    running = start_server(database_url, labels_per_task=1)
    try:
        base = running.http_url
        ids = import_tasks(base, [{"prompt": f"P{i}", "completions": ["a", "b"]} for i in range(3)])
        picks: list[int | None] = []
        lock = threading.Lock()

        def annotator(name: str) -> None:
            task = next_task(base, name)["task"]
            with lock:
                picks.append(None if task is None else task["task_id"])

        threads = [threading.Thread(target=annotator, args=(f"a{i}",)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        handed_out = sorted(p for p in picks if p is not None)
        assert handed_out == ids  # each task leased once, the other five got nothing
        assert picks.count(None) == 5
    finally:
        running.stop()


class GeneratedTasks:
    """A stand-in for the generation service as a :class:`TaskSource`."""

    name = "generation"

    def __init__(self) -> None:
        self.calls = 0

    async def fetch(self, limit: int) -> list[NewTask]:
        self.calls += 1
        return [
            NewTask(
                prompt="Write a haiku", completions=[f"draft {i}a", f"draft {i}b"], source=self.name
            )
            for i in range(min(limit, 2))
        ]

    async def close(self) -> None:
        pass


def test_an_empty_queue_asks_the_task_sources(database_url: str) -> None:
    source = GeneratedTasks()
    with FeedbackStore(database_url) as store:
        picker = TaskPicker(lambda: store, labels_per_task=1, sources=[source])

        async def scenario() -> list[str | None]:
            picks = [await picker.next_task(f"ann-{i}") for i in range(3)]
            return [None if p is None else p.task.source for p in picks]

        assert asyncio.run(scenario()) == ["generation", "generation", None]
        assert source.calls == 2  # the first and the third annotator found the queue empty
        assert store.tasks.stats(1).total == 2  # the third fetch repeated known keys


# -- outages and errors ---------------------------------------------------------------------
def test_database_down_is_503_and_the_page_still_loads() -> None:
    running = ServerThread(
        "feedback",
        database_url="postgresql://postgres@127.0.0.1:1/test",
        health_interval_s=0.2,
        http_port=0,
        log_level="ERROR",
    ).start(wait=False)
    try:
        base = running.http_url
        status, reply, headers = call(base, "POST", "/api/v1/comparisons", comparison("k"))
        assert status == 503 and reply["error"]["code"] == "UNAVAILABLE"
        assert headers["Retry-After"] == "2"
        assert call(base, "GET", "/api/v1/tasks/next?annotator_id=a")[0] == 503
        assert call(base, "GET", "/healthz")[:2] == (503, {"status": "NOT_SERVING"})
        with urllib.request.urlopen(base + "/", timeout=10) as page:
            assert page.status == 200 and b"Plaudit" in page.read()
    finally:
        running.stop()


class Unauthenticated(PlauditError):
    code = grpc.StatusCode.UNAUTHENTICATED


def test_authenticator_guards_the_api_only_and_errors_map_in_one_place() -> None:
    """The auth hook runs before every /api/ handler; the page and /healthz stay public."""

    def no_store() -> FeedbackStore:
        raise UnavailableError("the feedback database is not reachable yet")

    async def bearer_only(request: web.Request) -> None:
        if request.headers.get("Authorization") != "Bearer good":
            raise Unauthenticated("a valid API key is required")

    async def scenario() -> None:
        from prometheus_client import CollectorRegistry

        from plaudit.services.common.batching import BatchingConfig, DynamicBatcher

        metrics = FeedbackMetrics(CollectorRegistry())
        batcher: DynamicBatcher[Any, Any] = DynamicBatcher(lambda xs: xs, BatchingConfig())
        api = FeedbackHttpApi(
            store=no_store,
            batcher=batcher,
            picker=TaskPicker(no_store),
            metrics=metrics,
            is_serving=lambda: False,
            max_tasks_per_import=10,
        )
        async with TestClient(TestServer(make_app(api, metrics, bearer_only))) as client:
            refused = await client.get("/api/v1/stats")
            assert refused.status == 401
            assert (await refused.json())["error"]["code"] == "UNAUTHENTICATED"
            allowed = await client.get("/api/v1/stats", headers={"Authorization": "Bearer good"})
            assert allowed.status == 503  # past auth; the database is down
            assert (await client.get("/")).status == 200
            assert (await client.get("/static/app.js")).status == 200
            assert (await client.get("/healthz")).status == 503
            missing = await client.get("/api/v1/nothing", headers={"Authorization": "Bearer good"})
            assert missing.status == 404
            assert (await missing.json())["error"]["code"] == "NOT_FOUND"

    asyncio.run(scenario())


# -- active learning --------------------------------------------------------------------------
AL_TASKS = [
    {"prompt": f"question {i}: how do I {topic}?", "completions": list(completions)}
    for i, (topic, completions) in enumerate(
        [
            ("bake bread", ("Knead, rest, bake.", "Buy some at the shop.")),
            ("fix a flat tyre", ("Patch the tube and pump it up.", "Call someone.", "No idea.")),
            ("learn french", ("Practise every day with a tutor.", "Move to Paris.")),
            ("sleep better", ("Keep a regular schedule and a dark room.", "Drink coffee.")),
            ("write a cv", ("List results, not duties, on one page.", "Use a big font.")),
            ("cook rice", ("Rinse, then simmer covered for 15 minutes.", "Microwave it.")),
        ]
    )
]


def expected_margins(reward_addr: str, tasks: list[dict[str, Any]], ids: list[int]) -> dict:
    with RewardClient(reward_addr) as client:
        out = {}
        for task_id, task in zip(ids, tasks, strict=True):
            rewards, _ = client.score(
                [task["prompt"]] * len(task["completions"]), task["completions"]
            )
            out[task_id] = smallest_gap(rewards)
        return out


def test_active_learning_picks_the_least_certain_task(
    database_url: str, reward_server: ServerThread
) -> None:
    running = start_server(
        database_url, reward_addr=reward_server.address, explore_fraction=0.0, labels_per_task=2
    )
    try:
        base = running.http_url
        ids = import_tasks(base, AL_TASKS)
        margins = expected_margins(reward_server.address, AL_TASKS, ids)
        order = sorted(ids, key=margins.__getitem__)
        assert margins[order[1]] - margins[order[0]] > 1e-4  # the test needs a clear winner

        alice = next_task(base, "alice")
        assert alice["selection"]["reason"] == "uncertain"
        assert alice["task"]["task_id"] == order[0]
        assert alice["selection"]["margin"] == pytest.approx(margins[order[0]], abs=1e-4)
        assert label(base, alice["task"], "alice")[0] == 201
        # alice labelled it, so she gets the next least certain; bob still gets the first
        assert next_task(base, "alice")["task"]["task_id"] == order[1]
        assert next_task(base, "bob")["task"]["task_id"] == order[0]
        # order[0] now has alice's label and bob's lease: full; carol shares order[1] with alice
        assert next_task(base, "carol")["task"]["task_id"] == order[1]
        assert next_task(base, "dave")["task"]["task_id"] == order[2]
    finally:
        running.stop()


def test_a_random_share_keeps_the_data_unbiased(
    database_url: str, reward_server: ServerThread
) -> None:
    running = start_server(
        database_url, reward_addr=reward_server.address, explore_fraction=1.0, labels_per_task=100
    )
    try:
        base = running.http_url
        ids = import_tasks(base, AL_TASKS)
        least_certain = min(
            ids, key=expected_margins(reward_server.address, AL_TASKS, ids).__getitem__
        )
        picker: TaskPicker = running.server.tasks
        picker.rng = random.Random(3)
        explored = [next_task(base, f"explore-{i}") for i in range(12)]
        assert {p["selection"]["reason"] for p in explored} == {"explore"}
        assert len({p["task"]["task_id"] for p in explored}) >= 3  # uniform, not the argmin

        picker.explore_fraction = 0.25
        picks = [next_task(base, f"mixed-{i}") for i in range(40)]
        reasons = [p["selection"]["reason"] for p in picks]
        assert 3 <= reasons.count("explore") <= 20, reasons
        assert set(reasons) == {"explore", "uncertain"}
        assert all(
            p["task"]["task_id"] == least_certain
            for p in picks
            if p["selection"]["reason"] == "uncertain"
        )
    finally:
        running.stop()


def test_an_unreachable_reward_service_falls_back_to_random(tmp_path: Any) -> None:
    running = start_server(
        f"sqlite:///{tmp_path / 'f.db'}",
        reward_addr="127.0.0.1:1",
        reward_timeout_s=0.5,
        explore_fraction=0.0,
        log_level="ERROR",
    )
    try:
        base = running.http_url
        import_tasks(base, AL_TASKS)
        pick = next_task(base, "alice")
        assert pick["selection"] == {"reason": "random", "margin": None}
        assert pick["task"] is not None
    finally:
        running.stop()
