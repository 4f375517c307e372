"""Work before authentication, message sizes, concurrency, and JSON bodies (issue 17, items 1
and 4): each test performs the attack and asserts that it fails."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plaudit.services.common.process import free_port
from plaudit.services.common.security.keys import hash_key, new_api_key
from plaudit.services.feedback.settings import FeedbackSettings
from plaudit.v1 import feedback_pb2, feedback_pb2_grpc, reward_pb2
from tests.conftest import REPO, ServerThread

KEY = new_api_key()
WRITER = new_api_key()
ENTRIES = [
    {"name": "scorer", "sha256": hash_key(KEY), "roles": ["score"]},
    {"name": "writer", "sha256": hash_key(WRITER), "roles": ["submit_feedback"]},
]
MiB = 1024 * 1024


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _raw_call(channel: grpc.Channel, method: str, body: bytes, key: str | None) -> grpc.RpcError:
    metadata = [] if key is None else [("authorization", f"Bearer {key}")]
    call = channel.unary_unary(method)  # bytes in, bytes out: the server sees exactly `body`
    with pytest.raises(grpc.RpcError) as err:
        call(body, timeout=60, metadata=metadata)
    return err.value


# -- item 1: gRPC -------------------------------------------------------------------------------
def _serve_reward(registry: Path, *flags: str) -> Iterator[tuple[int, str]]:
    """A reward service as its own process (its memory measured alone); no model needed."""
    port = free_port()
    env = {**os.environ, "PLAUDIT_API_KEYS": json.dumps(ENTRIES), "PLAUDIT_AUTH_DISABLED": "false"}
    command = [sys.executable, "-m", "plaudit.cli", "serve", "reward", "--registry", str(registry),
               "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
               "--log-level", "ERROR", *flags]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    try:
        address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=90)
        yield proc.pid, address
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="module")
def default_reward_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """The default limits: Score takes 32 MiB."""
    yield from _serve_reward(tmp_path_factory.mktemp("empty-registry"))


@pytest.fixture(scope="module")
def reward_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """Small item and text limits: Score takes about 74 KB, GetModel 64 KiB."""
    flags = ("--max-items-per-request", "4", "--max-text-bytes", "1000", "--max-queue-items", "4")
    yield from _serve_reward(tmp_path_factory.mktemp("empty-registry-small"), *flags)


def test_an_unauthenticated_call_is_refused_before_its_message_is_read(
    default_reward_process: tuple[int, str],
) -> None:
    """8 MB of empty Score items (about 27x that once parsed) without a key, or with a wrong
    one: UNAUTHENTICATED at once, and the server's memory does not move (it used to grow by
    about 250 MB: the message was parsed before the key was looked at)."""
    pid, address = default_reward_process
    body = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem()] * 4_000_000).SerializeToString()
    assert len(body) == 8_000_000
    with grpc.insecure_channel(address) as channel:
        before = _rss_mib(pid)
        for key in (None, "plaudit_not-a-key", None):
            started = time.perf_counter()
            error = _raw_call(channel, "/plaudit.v1.RewardService/Score", body, key)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
            assert time.perf_counter() - started < 10
        grown = _rss_mib(pid) - before
    print(f"server RSS {before:.0f} MiB -> {before + grown:.0f} MiB after 3 x 8 MB anonymous")
    assert grown < 20, f"the server grew by {grown:.0f} MiB"


def test_each_method_takes_requests_up_to_its_own_limit(reward_process: tuple[int, str]) -> None:
    """A caller with a key cannot send more than the method's largest legitimate request:
    beyond the largest of all methods gRPC refuses it, beyond the method's own limit the
    interceptor does, before parsing; both RESOURCE_EXHAUSTED, naming the limit."""
    pid, address = reward_process
    with grpc.insecure_channel(address) as channel:
        before = _rss_mib(pid)
        empty_items = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem()] * 4_000_000)
        error = _raw_call(
            channel, "/plaudit.v1.RewardService/Score", empty_items.SerializeToString(), KEY
        )
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        # 70 KB: within Score's limit (4 items of 2 x 1000 bytes, plus slack), over GetModel's
        padding = (
            reward_pb2.GetModelRequest().SerializeToString() + b"\x0a\xe0\xa2\x04" + (b"x" * 70_000)
        )  # an unknown field 1 of 70,000 bytes
        error = _raw_call(channel, "/plaudit.v1.RewardService/GetModel", padding, KEY)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "limit of 65536 bytes for plaudit.v1.RewardService/GetModel" in error.details()
        error = _raw_call(channel, "/plaudit.v1.RewardService/GetModel", b"", None)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED  # the key comes first
        grown = _rss_mib(pid) - before
    assert grown < 20, f"the server grew by {grown:.0f} MiB"


def test_a_keyed_caller_cannot_expand_a_request_in_memory(
    default_reward_process: tuple[int, str],
) -> None:
    """The same 8 MB of empty Score items, now WITH a valid key: within Score's 32 MiB byte
    limit, but 4 million items where 256 are allowed. Parsed before the servicer counted them,
    three such calls grew the server by about 670 MiB; the request's fields are now counted on
    the wire first, so it is RESOURCE_EXHAUSTED unparsed and the server holds no more than the
    bytes it received (gRPC's buffer and Python's copy of each 8 MB message, some kept by the
    allocator: about 30 MiB). A legitimate request of the most items still reaches the
    servicer."""
    pid, address = default_reward_process
    body = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem()] * 4_000_000).SerializeToString()
    items = [reward_pb2.ScoreItem(prompt="p" * 1000, completion="c" * 1000)]
    with grpc.insecure_channel(address) as channel:
        before = _rss_mib(pid)
        for _ in range(3):
            started = time.perf_counter()
            error = _raw_call(channel, "/plaudit.v1.RewardService/Score", body, KEY)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
            assert "protobuf fields" in error.details() and "RewardService/Score" in error.details()
            assert time.perf_counter() - started < 10
        grown = _rss_mib(pid) - before  # before the legitimate requests below
        # the largest legitimate request, and one a little over (the servicer names the field)
        for count in (256, 300):
            legit = reward_pb2.ScoreRequest(items=items * count).SerializeToString()
            error = _raw_call(channel, "/plaudit.v1.RewardService/Score", legit, KEY)
            assert error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    print(f"server RSS {before:.0f} MiB -> {before + grown:.0f} MiB after 3 x 8 MB keyed")
    assert grown < 64, f"the server grew by {grown:.0f} MiB"


def _largest_requests() -> dict[str, tuple[Any, int]]:
    """Each call's largest legitimate request (texts short: fields are what is counted) and
    its field limit under the default settings."""
    from plaudit.services.generation.settings import GenerationSettings
    from plaudit.services.reward.settings import RewardSettings
    from plaudit.v1 import generation_pb2

    reward = RewardSettings(auth_disabled=True)
    generation = GenerationSettings(auth_disabled=True)
    feedback = FeedbackSettings(auth_disabled=True)
    limits = {**reward.field_limits(), **generation.field_limits(), **feedback.field_limits()}
    metadata = {f"k{i}": "v" for i in range(32)}
    common: dict[str, Any] = {"annotator_id": "a", "idempotency_key": "k", "metadata": metadata}
    ranking = feedback_pb2.SubmitRankingRequest(prompt="p", completions=["c"] * 16, **common)
    messages = [generation_pb2.ChatMessage(role="user", content="x")] * generation.max_messages
    sampling = generation_pb2.SamplingParams(
        temperature=1, top_p=1, top_k=5, max_new_tokens=8, seed=1, stop=["s"] * 8
    )
    requests = {
        "/plaudit.v1.RewardService/Score": reward_pb2.ScoreRequest(
            items=[reward_pb2.ScoreItem(prompt="p", completion="c")] * 256,
            normalization=reward_pb2.NORMALIZATION_RAW,
        ),
        "/plaudit.v1.RewardService/Compare": reward_pb2.CompareRequest(
            prompt="p",
            completion_a="a",
            completion_b="b",
            normalization=reward_pb2.NORMALIZATION_RAW,
        ),
        "/plaudit.v1.GenerationService/Generate": generation_pb2.GenerateRequest(
            conversation=generation_pb2.Conversation(messages=messages),
            n=4,
            sampling=sampling,
            rerank=True,
        ),
        "/plaudit.v1.FeedbackService/SubmitComparison": feedback_pb2.SubmitComparisonRequest(
            prompt="p", chosen="a", rejected="b", margin=1.0, **common
        ),
        "/plaudit.v1.FeedbackService/SubmitRanking": ranking,
        "/plaudit.v1.FeedbackService/SubmitRating": feedback_pb2.SubmitRatingRequest(
            prompt="p", completion="c", score=3, scale_min=1, scale_max=5, **common
        ),
        "/plaudit.v1.FeedbackService/SubmitCorrection": feedback_pb2.SubmitCorrectionRequest(
            prompt="p", completion="c", corrected="d", **common
        ),
        "/plaudit.v1.FeedbackService/SubmitBatch": feedback_pb2.SubmitBatchRequest(ranking=ranking),
    }
    assert set(requests) == set(limits)
    return {call: (request, limits[call]) for call, request in requests.items()}


def test_every_call_has_a_field_limit_that_fits_its_largest_request() -> None:
    """Counted on the wire, each call's largest legitimate request is within its field limit
    (and at least half of it: the limit is no looser than it needs to be); every repeated field
    blown up with empty entries is over it, and counting stops at the limit."""
    from google.protobuf import descriptor_pool

    from plaudit.services.common.security.limits import count_fields

    pool = descriptor_pool.Default()
    for call, (request, limit) in _largest_requests().items():
        message = pool.FindMethodByName(call.lstrip("/").replace("/", ".")).input_type
        assert message.full_name == request.DESCRIPTOR.full_name, call
        fields = count_fields(request.SerializeToString(), message, limit)
        assert limit / 2 - 64 <= fields <= limit, (call, fields, limit)
        for repeated in [f for f in message.fields if f.is_repeated]:  # every repeated field
            blown = type(request)()
            blown.CopyFrom(request)
            extra = getattr(blown, repeated.name)
            if repeated.message_type is not None and repeated.message_type.GetOptions().map_entry:
                extra.update({str(i): "" for i in range(100_000)})
            elif repeated.message_type is not None:
                extra.extend([type(extra[0])()] * 100_000)
            else:
                extra.extend([""] * 100_000)
            data = blown.SerializeToString()
            started = time.perf_counter()
            assert count_fields(data, message, limit) == limit + 1, (call, repeated.name)
            assert time.perf_counter() - started < 0.05
    # nested: 100,000 empty messages inside a conversation inside a request
    from plaudit.v1 import generation_pb2

    request, limit = _largest_requests()["/plaudit.v1.GenerationService/Generate"]
    request.conversation.messages.extend([generation_pb2.ChatMessage()] * 100_000)
    assert count_fields(request.SerializeToString(), request.DESCRIPTOR, limit) == limit + 1
    # malformed data is counted as far as it goes (the parser refuses it afterwards)
    assert count_fields(b"\x0a\xff", reward_pb2.ScoreRequest.DESCRIPTOR, 10) == 1


def test_feedback_refuses_expanding_submissions_unparsed(feedback_http: ServerThread) -> None:
    """A keyed writer sends a ranking of 300,000 empty completions, then the same as one message
    of a SubmitBatch stream: both RESOURCE_EXHAUSTED naming the field limit, before parsing."""
    ranking = feedback_pb2.SubmitRankingRequest(
        prompt="Q?", completions=[""] * 300_000, idempotency_key="huge"
    )
    body = ranking.SerializeToString()
    batch = feedback_pb2.SubmitBatchRequest(ranking=ranking).SerializeToString()
    with grpc.insecure_channel(feedback_http.address) as channel:
        error = _raw_call(channel, "/plaudit.v1.FeedbackService/SubmitRanking", body, WRITER)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "protobuf fields" in error.details()
        stream = channel.stream_unary("/plaudit.v1.FeedbackService/SubmitBatch")
        with pytest.raises(grpc.RpcError) as err:
            stream(iter([batch]), timeout=60, metadata=[("authorization", f"Bearer {WRITER}")])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert "protobuf fields" in (err.value.details() or "")


def test_in_flight_defaults_are_sized_from_the_batch_settings() -> None:
    """Unset, ``max_in_flight`` is each service's own default (never unbounded); 0 still means
    no limit when asked for; the server enforces what the settings say."""
    from plaudit.services.common.security.guard import ServerSecurity
    from plaudit.services.generation.settings import GenerationSettings
    from plaudit.services.reward.settings import RewardSettings

    reward = RewardSettings(auth_disabled=True)
    assert reward.max_in_flight is None and reward.in_flight_limit() == 32
    assert RewardSettings(auth_disabled=True, max_queue_items=8192).in_flight_limit() == 64
    assert RewardSettings(auth_disabled=True, max_in_flight=0).in_flight_limit() == 0
    assert GenerationSettings(auth_disabled=True).in_flight_limit() == 64
    assert GenerationSettings(auth_disabled=True, max_batch_rows=64).in_flight_limit() == 128
    assert FeedbackSettings(auth_disabled=True).in_flight_limit() == 64
    assert FeedbackSettings(auth_disabled=True, commit_batch_size=2048).in_flight_limit() == 256
    security = ServerSecurity.from_settings(reward, call_roles={})
    assert security.guard.in_flight.limit == 32
    assert "sized from the service's batch settings" in RewardSettings.default_help("max_in_flight")


def test_every_call_has_a_limit_that_fits_its_largest_request() -> None:
    settings = FeedbackSettings(auth_disabled=True)
    limits = settings.message_limits()
    assert set(limits) == {
        f"/plaudit.v1.FeedbackService/Submit{kind}"
        for kind in ("Comparison", "Ranking", "Rating", "Correction", "Batch")
    }
    ranking = feedback_pb2.SubmitRankingRequest(
        prompt="p" * 65536, completions=["c" * 65536] * 16, annotator_id="a" * 128,
        idempotency_key="k" * 128, metadata={f"{i:064d}": "v" * 1024 for i in range(32)},
    )  # fmt: skip
    size = ranking.ByteSize()
    assert size <= limits["/plaudit.v1.FeedbackService/SubmitRanking"] < 2 * size
    assert limits["/plaudit.v1.FeedbackService/SubmitBatch"] == max(limits.values())


def test_concurrent_calls_are_bounded_health_included(tmp_path: Path) -> None:
    server = ServerThread(
        "feedback",
        database_url=f"sqlite:///{tmp_path}/f.db",
        max_concurrent_rpcs=1,
        commit_wait_ms=1500,  # a lone submission waits this long for company
        log_level="WARNING",
    ).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
            request = feedback_pb2.SubmitComparisonRequest(
                prompt="Q?", chosen="a", rejected="b", annotator_id="x", idempotency_key="1"
            )
            slow = threading.Thread(target=lambda: stub.SubmitComparison(request, timeout=20))
            slow.start()
            time.sleep(0.5)
            for call, arg in (
                (stub.GetStats, feedback_pb2.GetStatsRequest()),
                (health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest()),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call(arg, timeout=10)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            slow.join(20)
            assert stub.GetStats(feedback_pb2.GetStatsRequest(), timeout=10).records == 1
    finally:
        server.stop()


def test_connections_age_out_so_clients_re_resolve(tmp_path: Path) -> None:
    """``max_connection_age_s``: the server sends GOAWAY to an aged connection; the channel goes
    back to IDLE (and, on its next call, reconnects through DNS) while calls keep succeeding. A
    call open when the connection ages finishes within the grace."""
    server = ServerThread(
        "feedback",
        database_url=f"sqlite:///{tmp_path}/f.db",
        max_connection_age_s=0.5,
        max_connection_age_grace_s=10,
        commit_wait_ms=1500,  # the first submission stays open past the connection's age
        log_level="WARNING",
    ).start()
    states: list[grpc.ChannelConnectivity] = []
    try:
        with grpc.insecure_channel(server.address) as channel:
            channel.subscribe(states.append, try_to_connect=False)
            stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
            request = feedback_pb2.SubmitComparisonRequest(
                prompt="Q?", chosen="a", rejected="b", annotator_id="x", idempotency_key="1"
            )
            stub.SubmitComparison(request, timeout=20)  # open for 1.5 s: past the age
            time.sleep(1.5)
            assert stub.GetStats(feedback_pb2.GetStatsRequest(), timeout=10).records == 1
            ready = [i for i, s in enumerate(states) if s == grpc.ChannelConnectivity.READY]
            assert len(ready) >= 2, states  # connected, aged out, connected again
            assert grpc.ChannelConnectivity.IDLE in states[ready[0] : ready[-1]], states
    finally:
        server.stop()


# -- item 4: HTTP -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def feedback_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    folder = tmp_path_factory.mktemp("feedback-http-limits")
    server = ServerThread(
        "feedback",
        database_url=f"sqlite:///{folder}/f.db",
        api_keys=ENTRIES,
        max_in_flight=1,
        commit_wait_ms=1500,
        log_level="WARNING",
    ).start()
    yield server
    server.stop()


def _post(url: str, body: Any, key: str | None = WRITER) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_body_over_its_routes_limit_is_413_before_it_is_read(
    feedback_http: ServerThread,
) -> None:
    """A 4 MB comparison (the route takes a few hundred KB of texts, JSON-escaped at worst): 413
    naming ``body`` from the Content-Length alone; only the headers and a few bytes are sent."""
    port = feedback_http.server.http_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/v1/comparisons HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {WRITER}\r\nContent-Length: {4 * MiB}\r\n\r\n".encode()
            + b'{"prompt": "'
        )
        reply = sock.recv(65536).decode()
    head, _, text = reply.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413"), head
    error = json.loads(text)["error"]
    assert error["field"] == "body" and error["code"] == "RESOURCE_EXHAUSTED"
    assert "exceeded" in error["message"]
    base = feedback_http.http_url
    status, _ = _post(base + "/api/v1/tasks/1/skip", {"annotator_id": "a" * 100_000})
    assert status == 413  # a skip takes an id: 64 KiB
    # a legitimate comparison at the text limits still fits
    event = {"prompt": "\u0001" * 65536, "chosen": "a", "rejected": "b", "annotator_id": "writer",
             "idempotency_key": "big"}  # fmt: skip
    status, reply = _post(base + "/api/v1/comparisons", event)
    assert status == 201, reply


def test_http_calls_take_the_in_flight_limit_and_health_stays_open(
    feedback_http: ServerThread,
) -> None:
    base = feedback_http.http_url
    event = {"prompt": "Q?", "chosen": "a", "rejected": "b", "annotator_id": "writer",
             "idempotency_key": "slow"}  # fmt: skip
    first: list[int] = []
    slow = threading.Thread(
        target=lambda: first.append(_post(base + "/api/v1/comparisons", event)[0])
    )
    slow.start()
    time.sleep(0.5)
    status, reply = _post(base + "/api/v1/comparisons", {**event, "idempotency_key": "2"})
    assert status == 429 and "limit of 1" in reply["error"]["message"], reply
    with urllib.request.urlopen(base + "/healthz", timeout=10) as resp:
        assert resp.status == 200
    slow.join(20)
    assert first == [201]


def test_a_large_body_is_parsed_off_the_event_loop(
    feedback_http: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 6 MB import of 800,000 tiny objects: it is parsed in a worker thread, not on the loop
    that serves gRPC and health (which keeps turning meanwhile). The thread that runs the
    parser's per-object hook is recorded, so the check does not depend on timing."""
    from plaudit.services.common import http as common_http

    parser_threads: set[int] = set()
    hook = common_http._same

    def recording(value: dict[str, Any]) -> dict[str, Any]:
        parser_threads.add(threading.get_ident())
        return hook(value)

    monkeypatch.setattr(common_http, "_same", recording)
    loop_thread = asyncio.run_coroutine_threadsafe(_thread_ident(), feedback_http.loop).result(10)
    ticks: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.002)
            ticks.append(time.perf_counter())

    running = asyncio.run_coroutine_threadsafe(ticker(), feedback_http.loop)
    body = json.dumps({"tasks": [{"metadata": {}}] * 400_000}, separators=(",", ":")).encode()
    assert len(body) < 8 * MiB
    time.sleep(0.2)
    before = len(ticks)
    status, reply = _post(feedback_http.http_url + "/api/v1/tasks", body)
    during = len(ticks) - before
    feedback_http.loop.call_soon_threadsafe(stop.set)
    running.result(10)
    assert status == 400 and reply["error"]["field"] == "tasks", reply  # parsed, then refused
    assert parser_threads and loop_thread not in parser_threads
    assert during > 1  # the loop kept turning while the body was parsed


async def _thread_ident() -> int:
    return threading.get_ident()


# -- JSON bodies: containers counted before the parse ---------------------------------------------
def test_json_containers_are_counted_outside_strings() -> None:
    from plaudit.services.common.http import MAX_JSON_CONTAINERS, json_containers

    assert json_containers(b'{"a": [1, {}], "b": "[{"}') == 5  # below the limit: an upper bound
    many_in_text = json.dumps({"items": [{"prompt": "{[" * MAX_JSON_CONTAINERS}]}).encode()
    assert json_containers(many_in_text) == 3  # brackets inside a string are text
    escaped = json.dumps({"t": 'a\\" {[' * MAX_JSON_CONTAINERS}).encode()
    assert json_containers(escaped) == 1
    unterminated = b'"' + b'\\"' * 1_000_000 + b"{" * (MAX_JSON_CONTAINERS + 1)
    started = time.monotonic()
    json_containers(unterminated)  # one linear pass, not one retry per quote
    assert time.monotonic() - started < 5


def test_a_body_of_empty_objects_is_refused_before_it_is_parsed() -> None:
    """``[{}, {}, ...]`` expands about 20x when parsed: a keyed caller's 32 MB body would cost
    about 700 MB. Past MAX_JSON_CONTAINERS it is INVALID_ARGUMENT naming ``body``, unparsed."""
    from plaudit.services.common.errors import InvalidArgumentError
    from plaudit.services.common.http import MAX_JSON_CONTAINERS, _parse_json

    body = b"[" + b",".join([b"{}"] * (MAX_JSON_CONTAINERS + 1)) + b"]"
    with pytest.raises(InvalidArgumentError) as refused:
        _parse_json(body)
    assert refused.value.field == "body" and "JSON objects and arrays" in str(refused.value)
    fine = json.dumps({"items": [{"prompt": "p", "completion": "{}" * 1000}] * 100}).encode()
    assert len(_parse_json(fine)["items"]) == 100
