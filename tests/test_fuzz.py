"""Fuzzing every RPC of the reward and feedback services (and the feedback service's JSON API)
with random and adversarial messages.

Texts near and over the limits, odd Unicode (NUL, RTL and zero-width marks, combining runs,
emoji, noncharacters, look-alike digits), empty and oversized repeated fields, NaN and
infinities, negative and extreme integers, unknown enum values, and raw bytes that are not the
method's message at all. Whatever arrives, the answer is OK or a deliberate status, never
INTERNAL or UNKNOWN (over HTTP: no 5xx but 503); what was accepted exports as finite training
data; and the server still reports SERVING afterwards. The feedback service is fuzzed on SQLite
and on PostgreSQL.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plaudit.services.feedback.db import normalize_url
from plaudit.v1 import admin_pb2, admin_pb2_grpc, feedback_pb2_grpc, reward_pb2, reward_pb2_grpc
from plaudit.v1 import feedback_pb2 as pb
from tests.conftest import POSTGRES_URL, ServerThread

TEXT_LIMIT = 2048  # max_text_bytes of both servers
ITEMS_LIMIT = 16  # reward: items per Score request
EVENTS_LIMIT = 24  # feedback: events per SubmitBatch stream
MESSAGE_LIMIT = 256 * 1024  # max_message_bytes of both servers

DELIBERATE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}
FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies ---------------------------------------------------------------------------------
ODD = [
    "", " ", "\t\n", "\x00", "a\x00b", "\u200f", "\u202e", "\u200b", "\ufeff", "\ufffd",
    "\U0010ffff", "\uffff", "🙂", "👩\u200d👩\u200d👧", "e" + "\u0301" * 64,
    "\u00b2", "\u0663", "\uff11\uff12", "0", "-1", "1e400", "NaN", "null", "{}",
    "' OR 1=1 --", "../../etc/passwd", "\\u0000",
]  # fmt: skip
unicode_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)  # no surrogates
near_limit = st.builds(
    lambda unit, n: unit * n,
    st.sampled_from(["a", "é", "🙂", " ", "\x00"]),
    st.sampled_from([TEXT_LIMIT // 4 - 1, TEXT_LIMIT // 4, TEXT_LIMIT // 2, TEXT_LIMIT - 1,
                     TEXT_LIMIT, TEXT_LIMIT + 1, 4 * TEXT_LIMIT]),
)  # fmt: skip
texts = st.one_of(st.sampled_from(ODD), unicode_text, near_limit, st.sampled_from(["good", "bad"]))
huge = st.builds(lambda n: "x" * n, st.sampled_from([MESSAGE_LIMIT - 100, 2 * MESSAGE_LIMIT]))
doubles = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [math.nan, math.inf, -math.inf, -0.0, 5e-324, 1e308, -1e308, 1.7976931348623157e308]
    ),
    st.integers(-10, 10).map(float),
)
int32s = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([-1, 0, 1, 2**31 - 1]))
metadata = st.dictionaries(texts, texts, max_size=40)
keys = st.one_of(st.uuids().map(str), st.sampled_from(["k1", "k2", ""]), texts)


def common(draw: Any) -> dict[str, Any]:
    return {
        "prompt": draw(st.one_of(texts, huge)) if draw(st.booleans()) else draw(texts),
        "annotator_id": draw(texts),
        "idempotency_key": draw(keys),
        "metadata": draw(metadata),
    }


@st.composite
def comparisons(draw: Any) -> pb.SubmitComparisonRequest:
    msg = pb.SubmitComparisonRequest(chosen=draw(texts), rejected=draw(texts), **common(draw))
    if draw(st.booleans()):
        msg.margin = draw(doubles)
    return msg


@st.composite
def rankings(draw: Any) -> pb.SubmitRankingRequest:
    return pb.SubmitRankingRequest(completions=draw(st.lists(texts, max_size=20)), **common(draw))


@st.composite
def ratings(draw: Any) -> pb.SubmitRatingRequest:
    return pb.SubmitRatingRequest(
        completion=draw(texts), score=draw(doubles), scale_min=draw(doubles),
        scale_max=draw(doubles), **common(draw),
    )  # fmt: skip


@st.composite
def corrections(draw: Any) -> pb.SubmitCorrectionRequest:
    return pb.SubmitCorrectionRequest(completion=draw(texts), corrected=draw(texts), **common(draw))


def batch_request(event: Any) -> pb.SubmitBatchRequest:
    field = {
        pb.SubmitComparisonRequest: "comparison",
        pb.SubmitRankingRequest: "ranking",
        pb.SubmitRatingRequest: "rating",
        pb.SubmitCorrectionRequest: "correction",
    }
    return (
        pb.SubmitBatchRequest(**{field[type(event)]: event}) if event else pb.SubmitBatchRequest()
    )


events = st.one_of(comparisons(), rankings(), ratings(), corrections())


@st.composite
def score_requests(draw: Any) -> reward_pb2.ScoreRequest:
    items = draw(
        st.lists(
            st.builds(reward_pb2.ScoreItem, prompt=texts, completion=texts),
            max_size=ITEMS_LIMIT + 2,
        )
    )
    return reward_pb2.ScoreRequest(items=items, normalization=draw(int32s | st.just(0)))


@st.composite
def compare_requests(draw: Any) -> reward_pb2.CompareRequest:
    return reward_pb2.CompareRequest(
        prompt=draw(st.one_of(texts, huge)), completion_a=draw(texts), completion_b=draw(texts),
        normalization=draw(st.one_of(st.sampled_from([0, 1, 2]), int32s)),
    )  # fmt: skip


# -- servers --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward(tiny_registry: Path) -> Iterator[ServerThread]:
    server = ServerThread(
        registry=tiny_registry,
        max_text_bytes=TEXT_LIMIT,
        max_items_per_request=ITEMS_LIMIT,
        max_message_bytes=MESSAGE_LIMIT,
        log_level="ERROR",
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def feedback(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    schema = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'f.db'}"
    else:
        admin: sa.Engine = request.getfixturevalue("postgres_admin")
        schema = f"fuzz_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        url = (
            normalize_url(POSTGRES_URL)
            .update_query_dict({"options": f"-csearch_path={schema}"})
            .render_as_string(hide_password=False)
        )
    server = ServerThread(
        "feedback",
        database_url=url,
        max_text_bytes=TEXT_LIMIT,
        max_events_per_batch=EVENTS_LIMIT,
        max_message_bytes=MESSAGE_LIMIT,
        log_level="ERROR",
    ).start()
    yield server
    server.stop()
    if schema is not None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture(scope="module")
def reward_channel(reward: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(reward.address) as channel:
        yield channel
    assert_serving(reward.address)


@pytest.fixture(scope="module")
def feedback_channel(feedback: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(feedback.address) as channel:
        yield channel
    assert_serving(feedback.address)


def assert_serving(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def answer(call: Callable[..., Any], request: Any) -> Any:
    """The reply, or None for a deliberate refusal; an INTERNAL/UNKNOWN status fails."""
    try:
        reply = call(request, timeout=20)
        return list(reply) if hasattr(reply, "__next__") else reply
    except grpc.RpcError as exc:
        assert exc.code() in DELIBERATE, f"{exc.code().name}: {exc.details()}"
        return None


def finite_pairs(channel: grpc.Channel) -> list[pb.PreferencePair]:
    """Everything exportable, every number in it finite (what a trainer would read)."""
    stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
    pages = stub.ExportPreferences(pb.ExportPreferencesRequest(page_size=500), timeout=30)
    pairs = [pair for page in pages for pair in page.pairs]
    for pair in pairs:
        assert math.isfinite(pair.weight) and 0 < pair.weight <= 1, pair
        assert not pair.HasField("margin") or math.isfinite(pair.margin), pair
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=30)
    for field in ("raw_agreement", "kappa"):
        assert not stats.HasField(field) or math.isfinite(getattr(stats, field)), stats
    return pairs


# -- the reward service -------------------------------------------------------------------------
@FUZZ
@given(request=score_requests())
def test_score_fuzz(reward_channel: grpc.Channel, request: reward_pb2.ScoreRequest) -> None:
    reply = answer(reward_pb2_grpc.RewardServiceStub(reward_channel).Score, request)
    if reply is not None:
        assert len(reply.rewards) == len(request.items) == len(reply.truncated)
        assert all(math.isfinite(r) for r in reply.rewards)


@FUZZ
@given(request=compare_requests())
def test_compare_fuzz(reward_channel: grpc.Channel, request: reward_pb2.CompareRequest) -> None:
    reply = answer(reward_pb2_grpc.RewardServiceStub(reward_channel).Compare, request)
    if reply is not None:
        assert 0 <= reply.prob_a_preferred <= 1


REWARD_METHODS = [
    "/plaudit.v1.RewardService/Score",
    "/plaudit.v1.RewardService/Compare",
    "/plaudit.v1.RewardService/GetModel",
    "/plaudit.v1.AdminService/ReloadModel",
]


@FUZZ
@given(method=st.sampled_from(REWARD_METHODS), raw=st.binary(max_size=200))
def test_reward_raw_bytes_fuzz(reward_channel: grpc.Channel, method: str, raw: bytes) -> None:
    answer(reward_channel.unary_unary(method), raw)


def test_reward_get_model_and_reload_answer(reward_channel: grpc.Channel) -> None:
    stub = reward_pb2_grpc.RewardServiceStub(reward_channel)
    assert answer(stub.GetModel, reward_pb2.GetModelRequest()).version
    admin = admin_pb2_grpc.AdminServiceStub(reward_channel)
    assert answer(admin.ReloadModel, admin_pb2.ReloadModelRequest()).live_version


# -- the feedback service -----------------------------------------------------------------------
@FUZZ
@given(event=events)
def test_unary_submission_fuzz(feedback_channel: grpc.Channel, event: Any) -> None:
    stub = feedback_pb2_grpc.FeedbackServiceStub(feedback_channel)
    call = {
        pb.SubmitComparisonRequest: stub.SubmitComparison,
        pb.SubmitRankingRequest: stub.SubmitRanking,
        pb.SubmitRatingRequest: stub.SubmitRating,
        pb.SubmitCorrectionRequest: stub.SubmitCorrection,
    }[type(event)]
    reply = answer(call, event)
    if reply is not None:
        assert reply.feedback_id.isdigit()


@settings(FUZZ, max_examples=25)
@given(batch=st.lists(st.one_of(events, st.none()), max_size=EVENTS_LIMIT + 2))
def test_submit_batch_fuzz(feedback_channel: grpc.Channel, batch: list[Any]) -> None:
    stub = feedback_pb2_grpc.FeedbackServiceStub(feedback_channel)
    reply = answer(stub.SubmitBatch, iter([batch_request(e) for e in batch]))
    if reply is not None:
        assert len(reply.results) == len(batch)
        assert reply.accepted + reply.rejected == len(batch)
        assert [r.index for r in reply.results] == list(range(len(batch)))
        deliberate = {code.value[0] for code in DELIBERATE}
        assert all(r.code == 0 or r.code in deliberate for r in reply.results)


@FUZZ
@given(
    cursor=st.one_of(texts, st.integers(0, 10**30).map(str)),
    limit=int32s,
    page_size=int32s,
    exclude=st.booleans(),
)
def test_export_fuzz(
    feedback_channel: grpc.Channel, cursor: str, limit: int, page_size: int, exclude: bool
) -> None:
    stub = feedback_pb2_grpc.FeedbackServiceStub(feedback_channel)
    request = pb.ExportPreferencesRequest(
        cursor=cursor, limit=limit, page_size=page_size, exclude_outliers=exclude
    )
    answer(stub.ExportPreferences, request)


FEEDBACK_METHODS = [
    "/plaudit.v1.FeedbackService/SubmitComparison",
    "/plaudit.v1.FeedbackService/SubmitRanking",
    "/plaudit.v1.FeedbackService/SubmitRating",
    "/plaudit.v1.FeedbackService/SubmitCorrection",
    "/plaudit.v1.FeedbackService/ExportPreferences",
    "/plaudit.v1.FeedbackService/GetStats",
]


@FUZZ
@given(method=st.sampled_from(FEEDBACK_METHODS), raw=st.binary(max_size=200))
def test_feedback_raw_bytes_fuzz(feedback_channel: grpc.Channel, method: str, raw: bytes) -> None:
    if method.endswith("ExportPreferences"):
        answer(feedback_channel.unary_stream(method), raw)
    else:
        answer(feedback_channel.unary_unary(method), raw)


@settings(FUZZ, max_examples=15)
@given(stream=st.lists(st.binary(max_size=100), max_size=5))
def test_submit_batch_raw_bytes_fuzz(feedback_channel: grpc.Channel, stream: list[bytes]) -> None:
    answer(feedback_channel.stream_unary("/plaudit.v1.FeedbackService/SubmitBatch"), iter(stream))


@st.composite
def rating_pairs(draw: Any) -> tuple[float, float, float, float]:
    """A scale (often extreme) and two scores on it (often its ends)."""
    ends = st.sampled_from([-1.7976931348623157e308, -1e308, -1.0, 0.0, 1.0, 5.0, 1e308])
    low, high = draw(st.one_of(ends, doubles)), draw(st.one_of(ends, doubles))
    on_scale = st.one_of(st.sampled_from([low, high, low / 2 + high / 2]), doubles)
    return low, high, draw(on_scale), draw(on_scale)


@settings(FUZZ, max_examples=30)
@given(ratings=rating_pairs())
def test_accepted_ratings_export_finite_margins(
    feedback_channel: grpc.Channel, ratings: tuple[float, float, float, float]
) -> None:
    """Two ratings of one prompt on one scale pair up; whatever was accepted exports finite."""
    low, high, *scores = ratings
    stub = feedback_pb2_grpc.FeedbackServiceStub(feedback_channel)
    prompt = f"rate {uuid.uuid4()}"
    for completion, score in zip(("first", "second"), scores, strict=True):
        answer(
            stub.SubmitRating,
            pb.SubmitRatingRequest(
                prompt=prompt, completion=completion, score=score, scale_min=low,
                scale_max=high, annotator_id="rater", idempotency_key=str(uuid.uuid4()),
            ),
        )  # fmt: skip
    finite_pairs(feedback_channel)


def test_everything_accepted_by_fuzzing_exports_finite(feedback_channel: grpc.Channel) -> None:
    assert isinstance(finite_pairs(feedback_channel), list)


# -- the feedback service's JSON API -------------------------------------------------------------
json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), texts, doubles,
        st.integers(), st.sampled_from([10**400, -(10**400), 2**63, 2**64, -1, 0]),
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=8,
)  # fmt: skip
HTTP_FIELDS = {
    "comparisons": ["prompt", "chosen", "rejected", "margin"],
    "rankings": ["prompt", "completions"],
    "ratings": ["prompt", "completion", "score", "scale_min", "scale_max"],
    "corrections": ["prompt", "completion", "corrected"],
    "tasks": ["tasks"],
}
COMMON_FIELDS = ["annotator_id", "idempotency_key", "metadata", "task_id", "unknown"]


@st.composite
def http_requests(draw: Any) -> tuple[str, str, bytes]:
    """(method, path, body): a JSON API call with fields of the right names, any values."""
    route = draw(st.sampled_from([*HTTP_FIELDS, "tasks/next", "tasks/{id}", "tasks/{id}/skip"]))
    task_id = draw(st.one_of(st.integers(0, 10**30), st.sampled_from(["%D9%A3", "-1", "1e3"])))
    path = "/api/v1/" + route.replace("{id}", str(task_id))
    if route == "tasks/next":
        annotator = draw(texts).encode("utf-8", "replace")
        return "GET", f"{path}?annotator_id={urllib.parse.quote(annotator)}", b""
    if route == "tasks/{id}":
        return "GET", path, b""
    names = HTTP_FIELDS.get(route, ["annotator_id"]) + (
        COMMON_FIELDS if route in HTTP_FIELDS else []
    )
    body = draw(st.fixed_dictionaries({}, optional={n: json_values for n in names}))
    if draw(st.integers(0, 9)) == 0:
        return "POST", path, draw(st.binary(max_size=100))  # not even JSON
    return "POST", path, json.dumps(body).encode()


@settings(FUZZ, max_examples=60)
@given(call=http_requests())
def test_http_api_fuzz(feedback: ServerThread, call: tuple[str, str, bytes]) -> None:
    method, path, body = call
    request = urllib.request.Request(
        feedback.http_url + path,
        data=body if method == "POST" else None,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            status, text, kind = (
                response.status,
                response.read(),
                response.headers.get_content_type(),
            )
    except urllib.error.HTTPError as exc:
        status, text, kind = exc.code, exc.read(), exc.headers.get_content_type()
    assert status < 500 or status == 503, text[:500]
    if kind != "application/json":  # aiohttp's own 400 for a request line over 8 KiB
        assert status == 400 and len(path) > 8000, text[:500]
        return
    reply = json.loads(text)
    assert status < 400 or set(reply["error"]) == {"code", "field", "message"}


# -- regressions found by the fuzzers (kept as plain examples) ----------------------------------
@pytest.mark.parametrize(
    "raw", [b"\x0a\x02\xff\xfe", b"\xff\xff\xff", b"\x0a\x80", b"\x3a\x05\x0a\x03\xc3\x28\x41"]
)
def test_malformed_protobuf_is_invalid_argument(feedback_channel: grpc.Channel, raw: bytes) -> None:
    """Invalid UTF-8 in a string field or a corrupt encoding: was UNKNOWN (unary) and
    INTERNAL with a logged traceback (streams)."""
    method = "/plaudit.v1.FeedbackService/SubmitComparison"
    with pytest.raises(grpc.RpcError) as err:
        feedback_channel.unary_unary(method)(raw, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid message" in (err.value.details() or "")
    stream = feedback_channel.stream_unary("/plaudit.v1.FeedbackService/SubmitBatch")
    with pytest.raises(grpc.RpcError) as err:
        stream(iter([b"\x0a\x03\x0a\x01\xff"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("cursor", ["\u00b2", "\u0663", "\uff11\uff12", "1\u00b2"])
def test_unicode_digits_are_not_a_cursor(feedback_channel: grpc.Channel, cursor: str) -> None:
    """``str.isdigit`` accepts them; ``int("\u00b2")`` raised: was INTERNAL."""
    stub = feedback_pb2_grpc.FeedbackServiceStub(feedback_channel)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ExportPreferences(pb.ExportPreferencesRequest(cursor=cursor), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_rating_scale_too_wide_for_floats_is_refused(feedback_channel: grpc.Channel) -> None:
    """scale [-1e308, 1e308] has an infinite width: margins and KTO scores came out NaN."""
    stub = feedback_pb2_grpc.FeedbackServiceStub(feedback_channel)
    request = pb.SubmitRatingRequest(
        prompt="wide", completion="c", score=1e308, scale_min=-1e308, scale_max=1e308,
        annotator_id="a", idempotency_key=str(uuid.uuid4()),
    )  # fmt: skip
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitRating(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "scale" in (err.value.details() or "")


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/api/v1/comparisons", {"margin": 10**400}, 400),  # OverflowError: was 500
        ("/api/v1/ratings", {"score": 10**400}, 400),
        ("/api/v1/comparisons", {"task_id": 10**40}, 400),  # too large for SQLite: was 500
        ("/api/v1/tasks/" + "9" * 40 + "/skip", {"annotator_id": "a"}, 404),  # was 500
        ("/api/v1/tasks/%D9%A3/skip", {"annotator_id": "a"}, 404),  # "٣" was task 3
    ],
)
def test_http_numbers_out_of_range_are_client_errors(
    feedback: ServerThread, path: str, body: dict[str, Any], status: int
) -> None:
    event = {"prompt": "p", "chosen": "a", "rejected": "b", "completion": "a",
             "annotator_id": "a", "idempotency_key": str(uuid.uuid4())}  # fmt: skip
    if path.endswith("ratings"):
        event = {k: v for k, v in event.items() if k not in ("chosen", "rejected")}
    elif path.endswith("comparisons"):
        event.pop("completion")
    else:
        event = {}
    request = urllib.request.Request(
        feedback.http_url + path,
        data=json.dumps({**event, **body}).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == status, err.value.read()


@pytest.mark.parametrize("body", [b"\x80", b'{"prompt": "\xff"}', b"[" * 100_000 + b"]" * 100_000])
def test_http_bodies_that_are_not_json_text_are_client_errors(
    feedback: ServerThread, body: bytes
) -> None:
    """Invalid UTF-8 (was 500: UnicodeDecodeError) and JSON nested past the recursion limit."""
    request = urllib.request.Request(
        feedback.http_url + "/api/v1/comparisons",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400
    assert json.loads(err.value.read())["error"]["field"] == "body"
