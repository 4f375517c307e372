"""Issue 17 item 3: an annotator's identity is the API key's, not whatever the client says.

Each attack against a feedback service with authentication on, over gRPC and HTTP, and that it
fails: labelling as someone else, leasing the queue under many made-up annotator ids, and
pre-empting another annotator's submission through a predictable idempotency key.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from plaudit.services.common.errors import PermissionDeniedError, ResourceExhaustedError
from plaudit.services.common.security.client import ClientCredentials
from plaudit.services.common.security.keys import ANONYMOUS, Principal, hash_key, new_api_key
from plaudit.services.feedback.domain import DEFAULT_LIMITS, NewTask
from plaudit.services.feedback.http import STATIC_DIR
from plaudit.services.feedback.identity import Caller, scoped_key
from plaudit.services.feedback.store import FeedbackStore
from plaudit.v1 import feedback_pb2 as pb
from plaudit.v1 import feedback_pb2_grpc
from tests.conftest import ServerThread
from tests.test_security import http

KEYS = {name: new_api_key() for name in ("alice", "bob", "importer")}
ENTRIES = [
    {"name": name, "sha256": hash_key(key), "roles": ["submit_feedback"]}
    for name, key in KEYS.items()
]
LEASE_LIMIT = 4
TASKS = [{"prompt": f"Q{i}?", "completions": [f"yes {i}", f"no {i}"]} for i in range(60)]
Stub = feedback_pb2_grpc.FeedbackServiceStub


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    folder = tmp_path_factory.mktemp("identity")
    server = ServerThread(
        "feedback",
        database_url=f"sqlite:///{folder}/f.db",
        api_keys=ENTRIES,
        any_annotator_keys=["importer"],
        max_leases_per_principal=LEASE_LIMIT,
        log_level="WARNING",
    ).start()
    status, reply = http(
        server.http_url + "/api/v1/tasks", "POST", {"tasks": TASKS}, key=KEYS["importer"]
    )
    assert status == 201, reply
    yield server
    server.stop()


def stored(service: ServerThread, feedback_id: str) -> Any:
    with FeedbackStore(service.server.settings.database_url, migrate=False) as store:
        return store.get(int(feedback_id)).event


def comparison(annotator: str, key: str, chosen: str = "good") -> dict[str, Any]:
    other = "bad" if chosen == "good" else "good"
    return {"prompt": "Q?", "chosen": chosen, "rejected": other, "annotator_id": annotator,
            "idempotency_key": key}  # fmt: skip


def post(service: ServerThread, who: str, body: dict[str, Any]) -> tuple[int, Any]:
    return http(service.http_url + "/api/v1/comparisons", "POST", body, key=KEYS[who])


def channel(service: ServerThread, who: str) -> grpc.Channel:
    return ClientCredentials(api_key=KEYS[who]).channel(service.address)


# -- (a) a key labels only as its own annotator -------------------------------------------------
def test_a_key_cannot_label_as_another_annotator(service: ServerThread) -> None:
    status, reply = post(service, "alice", comparison("bob", "a-as-bob"))
    assert status == 403 and reply["error"]["code"] == "PERMISSION_DENIED"
    assert "annotator_id" in reply["error"]["message"]
    with channel(service, "alice") as ch:
        request = pb.SubmitComparisonRequest(**comparison("bob", "a-as-bob-grpc"))
        with pytest.raises(grpc.RpcError) as err:
            Stub(ch).SubmitComparison(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "annotator_id" in (err.value.details() or "")
        batch = [
            pb.SubmitBatchRequest(comparison=pb.SubmitComparisonRequest(**comparison(a, k)))
            for a, k in [("bob", "batch-1"), ("alice", "batch-2")]
        ]
        reply = Stub(ch).SubmitBatch(iter(batch), timeout=10)
    assert reply.accepted == 1 and reply.rejected == 1
    assert reply.results[0].code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert "annotator_id" in reply.results[0].error
    # nor lease or skip tasks as someone else
    base = service.http_url
    status, reply = http(base + "/api/v1/tasks/next?annotator_id=bob", key=KEYS["alice"])
    assert status == 403 and "annotator_id" in reply["error"]["message"]
    status, reply = http(
        base + "/api/v1/tasks/1/skip", "POST", {"annotator_id": "bob"}, key=KEYS["alice"]
    )
    assert status == 403
    with FeedbackStore(service.server.settings.database_url, migrate=False) as store:
        assert "bob" not in store.stats().by_annotator


# -- (b) an empty annotator_id is the key's annotator --------------------------------------------
def test_an_empty_annotator_is_the_callers_own(service: ServerThread) -> None:
    status, reply = post(service, "alice", comparison("", "empty-http"))
    assert status == 201, reply
    assert stored(service, reply["feedback_id"]).annotator_id == "alice"
    with channel(service, "alice") as ch:
        request = pb.SubmitComparisonRequest(**comparison("", "empty-grpc"))
        feedback_id = Stub(ch).SubmitComparison(request, timeout=10).feedback_id
    assert stored(service, feedback_id).annotator_id == "alice"
    status, reply = post(service, "alice", comparison("alice", "named-http"))
    assert status == 201 and stored(service, reply["feedback_id"]).annotator_id == "alice"
    # the trusted importer acts for whoever it names
    status, reply = post(service, "importer", comparison("carol", "imported"))
    assert status == 201 and stored(service, reply["feedback_id"]).annotator_id == "carol"
    # a lease with no annotator_id is the caller's own
    status, reply = http(service.http_url + "/api/v1/tasks/next", key=KEYS["bob"])
    assert status == 200 and reply["task"] is not None


# -- (c) one key cannot lease the queue under made-up annotator ids ------------------------------
def test_one_key_cannot_lease_the_queue_with_random_annotator_ids(service: ServerThread) -> None:
    base = service.http_url
    ids = [f"sock-{uuid.uuid4().hex[:12]}" for _ in range(50)]
    # a bound key: every made-up id is refused outright
    codes = {http(f"{base}/api/v1/tasks/next?annotator_id={a}", key=KEYS["alice"])[0] for a in ids}
    assert codes == {403}
    # a key that may act for anyone: no more than LEASE_LIMIT annotators at once
    replies = [
        http(f"{base}/api/v1/tasks/next?annotator_id={a}", key=KEYS["importer"]) for a in ids
    ]
    granted = [(a, r) for a, (s, r) in zip(ids, replies, strict=True) if s == 200]
    refused = [(s, r) for s, r in replies if s != 200]
    assert len(granted) == LEASE_LIMIT and all(r["task"] for _, r in granted)
    assert {s for s, _ in refused} == {429}
    assert refused[0][1]["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert "max_leases_per_principal" in refused[0][1]["error"]["message"]
    # resuming a lease it holds is not a new one; finishing one frees its place
    first, reply = granted[0]
    assert http(f"{base}/api/v1/tasks/next?annotator_id={first}", key=KEYS["importer"])[0] == 200
    task_id = reply["task"]["task_id"]
    status, _ = http(
        f"{base}/api/v1/tasks/{task_id}/skip", "POST", {"annotator_id": first}, key=KEYS["importer"]
    )
    assert status == 200
    assert http(f"{base}/api/v1/tasks/next?annotator_id=fresh", key=KEYS["importer"])[0] == 200
    assert http(f"{base}/api/v1/tasks/next?annotator_id=fresh2", key=KEYS["importer"])[0] == 429
    # other keys have their own allowance
    assert http(f"{base}/api/v1/tasks/next", key=KEYS["alice"])[0] == 200


# -- (d) idempotency keys are scoped to the caller -----------------------------------------------
def test_another_key_cannot_pre_empt_or_read_a_submission_by_its_key(
    service: ServerThread,
) -> None:
    key = "t1.comparison.alice"  # the old page's predictable key
    # bob gets there first, with alice's key and the opposite answer
    status, bobs = post(service, "bob", comparison("", key, chosen="bad"))
    assert status == 201, bobs
    # alice's own submission is stored, not refused as a conflict nor taken as bob's duplicate
    status, alices = post(service, "alice", comparison("", key))
    assert status == 201 and alices["duplicate"] is False
    assert alices["feedback_id"] != bobs["feedback_id"]
    alice_event, bob_event = (stored(service, r["feedback_id"]) for r in (alices, bobs))
    assert (alice_event.annotator_id, alice_event.chosen) == ("alice", "good")
    assert (bob_event.annotator_id, bob_event.chosen) == ("bob", "bad")
    assert alice_event.idempotency_key == f"alice/{key}"
    # bob replaying the same key and content learns nothing of alice's record
    status, again = post(service, "bob", comparison("", key, chosen="bad"))
    assert status == 200 and again == {"feedback_id": bobs["feedback_id"], "duplicate": True}
    # alice's retry, over gRPC this time, is still hers (one scope per key, both protocols)
    with channel(service, "alice") as ch:
        request = pb.SubmitComparisonRequest(**comparison("alice", key))
        reply = Stub(ch).SubmitComparison(request, timeout=10)
    assert reply.duplicate and reply.feedback_id == alices["feedback_id"]
    # and a conflicting retry of her own is still a conflict
    status, reply = post(service, "alice", comparison("", key, chosen="bad"))
    assert status == 409 and reply["error"]["code"] == "ALREADY_EXISTS"


def test_scoped_keys_fit_the_stored_limit() -> None:
    assert scoped_key("alice", "k1") == "alice/k1"
    long = "k" * DEFAULT_LIMITS.max_id_chars
    scoped = scoped_key("a" * 64, long)
    assert len(scoped) <= DEFAULT_LIMITS.max_id_chars and scoped.startswith("a" * 64 + "/~")
    assert scoped != scoped_key("a" * 64, long[:-1] + "j")
    with pytest.raises(Exception, match="idempotency_key"):
        scoped_key("alice", "k" * (DEFAULT_LIMITS.max_id_chars + 1))


def test_without_authentication_nothing_is_bound() -> None:
    caller = Caller.of(ANONYMOUS, ())
    assert caller.annotator("anyone") == "anyone"
    assert Caller.of(None, ()).name is None
    bound = Caller.of(Principal("alice", frozenset({"submit_feedback"})), ())
    with pytest.raises(PermissionDeniedError, match="annotator_id"):
        bound.annotator("bob")


# -- (c') the lease limit holds across processes sharing one database ---------------------------
def _queue(store: FeedbackStore, n: int) -> list[int]:
    tasks = [NewTask(prompt=f"Q{i}?", completions=(f"yes {i}", f"no {i}")) for i in range(n)]
    return [t.task_id for t in store.tasks.import_tasks(tasks)]


def test_the_lease_limit_holds_across_stores_on_one_database(database_url: str) -> None:
    """Two feedback processes (two stores, each its own engine and connections) on one
    database, one key that may act for anyone, a limit of 2: the leases one process granted
    count in the other; a lease that runs out, is skipped or is labelled frees its place; an
    anonymous caller (authentication off) and another key are not held to it."""
    lease = {"lease_ms": 1000, "labels_needed": 1, "max_leases": 2}
    with FeedbackStore(database_url) as one, FeedbackStore(database_url, migrate=False) as two:
        t = _queue(one, 8)
        assert one.tasks.claim(t[0], "a", now_ms=0, principal="importer", **lease)
        assert two.tasks.claim(t[1], "b", now_ms=1, principal="importer", **lease)
        for store in (one, two):
            with pytest.raises(ResourceExhaustedError, match="max_leases_per_principal"):
                store.tasks.claim(t[2], "c", now_ms=2, principal="importer", **lease)
        assert one.tasks.claim(t[3], "a", now_ms=3, principal="importer", **lease)  # a again
        assert two.tasks.claim(t[4], "z", now_ms=3, principal="other-key", **lease)
        assert two.tasks.claim(t[5], "y", now_ms=3, principal=None, **lease)  # anonymous
        two.tasks.skip(t[1], "b", now_ms=4)  # b skips: b no longer holds a lease
        assert one.tasks.claim(t[2], "c", now_ms=5, principal="importer", **lease)
        with pytest.raises(ResourceExhaustedError):
            two.tasks.claim(t[6], "d", now_ms=6, principal="importer", **lease)
        one.tasks.record_label(t[2], "c", 1, now_ms=7)  # c labels: c's place is free
        assert two.tasks.claim(t[6], "d", now_ms=8, principal="importer", **lease)
        # every lease of a and d runs out (a's newest at 3, d's at 8): e fits
        assert one.tasks.claim(t[7], "e", now_ms=1009, principal="importer", **lease)


def test_concurrent_claims_from_two_stores_grant_no_more_than_the_limit(
    database_url: str,
) -> None:
    """Eight annotators of one key ask at the same instant, four through each store, each for
    a different task (so no task row lock orders them): exactly the limit of 3 is granted."""
    lease = {"lease_ms": 60_000, "labels_needed": 1, "max_leases": 3}
    with FeedbackStore(database_url) as one, FeedbackStore(database_url, migrate=False) as two:
        t = _queue(one, 8)
        start = threading.Barrier(8)

        def claim(i: int) -> bool:
            store = (one, two)[i % 2]
            start.wait()
            try:
                return store.tasks.claim(t[i], f"ann-{i}", now_ms=1, principal="importer", **lease)
            except ResourceExhaustedError:
                return False

        with ThreadPoolExecutor(8) as pool:
            granted = list(pool.map(claim, range(8)))
    assert sum(granted) == 3, granted


# -- (e) the page's idempotency keys cannot be guessed -------------------------------------------
def test_the_page_draws_its_idempotency_keys_at_random() -> None:
    """The browser test (test_labelling_page) checks the keys it actually sends; here, that
    the page builds them from crypto.getRandomValues and never from the annotator's name."""
    source = (STATIC_DIR / "app.js").read_text()
    assert "crypto.getRandomValues" in source
    (key_function,) = re.findall(r"function key\(kind\) \{(.*?)\n  \}", source, re.S)
    assert "nonce(" in key_function and "annotator" not in key_function
    assert "Math.random" not in source


def test_the_settings_are_documented() -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "security.md").read_text()
    names = (
        "PLAUDIT_ANY_ANNOTATOR_KEYS",
        "PLAUDIT_MAX_LEASES_PER_PRINCIPAL",
        "test_annotator_identity",
    )
    for name in names:
        assert name in docs
