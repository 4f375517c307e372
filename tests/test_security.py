"""Authentication, roles, rate and in-flight limits, message sizes and (mutual) TLS, on every
service's gRPC server and on the feedback service's HTTP API."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import ValidationError

import plaudit.services.common.security.keys as security
from plaudit.cli import main
from plaudit.services.common.admin import notify_reload
from plaudit.services.common.errors import (
    FailedPreconditionError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from plaudit.services.common.security.client import ClientCredentials
from plaudit.services.common.security.guard import AccessGuard, ServerSecurity
from plaudit.services.common.security.keys import (
    ROLES,
    ApiKeyEntry,
    KeyStore,
    hash_key,
    new_api_key,
    parse_bearer,
)
from plaudit.services.common.security.limits import InFlightLimit, RateLimiter
from plaudit.services.common.settings import add_settings_arguments, settings_from_args
from plaudit.services.feedback import access as feedback
from plaudit.services.feedback.domain import LabellingTask
from plaudit.services.feedback.http import FeedbackHttpApi
from plaudit.services.feedback.settings import FeedbackSettings
from plaudit.services.feedback.tasks import RewardMarginScorer
from plaudit.services.generation import access as generation
from plaudit.services.reward import access as reward
from plaudit.services.reward.client import RewardClient
from plaudit.services.reward.settings import RewardSettings
from plaudit.v1 import admin_pb2, feedback_pb2, feedback_pb2_grpc, generation_pb2, reward_pb2
from plaudit.v1 import feedback_pb2 as pb
from tests.certs import TlsFiles, make_tls_files
from tests.conftest import REPO, ServerThread

KEYS = {name: new_api_key() for name in ("writer", "reader", "scorer", "ops")}
ROLES_OF = {
    "writer": ["submit_feedback"],
    "reader": ["read_feedback"],
    "scorer": ["score"],
    "ops": ["admin"],
}
ENTRIES = [{"name": name, "sha256": hash_key(KEYS[name]), "roles": ROLES_OF[name]} for name in KEYS]
REWARD_CALLS = reward.CALL_ROLES  # RewardService and AdminService
CALL_ROLES = {  # every service's own table, together
    **REWARD_CALLS,
    **generation.CALL_ROLES,
    **feedback.CALL_ROLES,
    **feedback.ROUTE_ROLES,
}
Stub = feedback_pb2_grpc.FeedbackServiceStub


def as_(name: str | None) -> ClientCredentials:
    return ClientCredentials(api_key=KEYS[name] if name else "")


def comparison(key: str) -> pb.SubmitComparisonRequest:
    return pb.SubmitComparisonRequest(
        prompt="Q?", chosen="good", rejected="bad", annotator_id="writer", idempotency_key=key
    )


def refusal(call: Any, *args: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        result = call(*args, timeout=10)
        if hasattr(result, "__iter__") and not isinstance(result, bytes | str):
            list(result)  # server streaming: the status comes with the first read
    return err.value.code(), err.value.details()


def http(
    url: str, method: str = "GET", body: Any = None, key: str | None = None, **kw: Any
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10, **kw) as resp:
            text = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as exc:
        text, status = exc.read().decode(), exc.code
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


# -- the table, keys, limits (no server) ---------------------------------------------------------
def test_every_rpc_and_api_route_needs_a_named_role() -> None:
    """A new RPC or route fails here until it is given a role (unnamed ones are refused)."""
    rpcs = {
        f"/{service.full_name}/{method.name}"
        for module in (admin_pb2, feedback_pb2, generation_pb2, reward_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    api = FeedbackHttpApi(
        store=cast(Any, None),
        batcher=cast(Any, None),
        picker=cast(Any, None),
        metrics=cast(Any, None),
        is_serving=lambda: True,
        max_tasks_per_import=1,
    )
    app = web.Application()
    app.add_routes(api.routes())
    routes = {
        f"{route.method} {route.resource.canonical}"
        for route in app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/api/")
        and route.method != "HEAD"  # answered like GET
    }
    assert rpcs | routes == set(CALL_ROLES)
    assert set(CALL_ROLES.values()) == set(ROLES)


def test_keys_are_identified_by_hash_comparing_every_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    store = KeyStore([ApiKeyEntry.model_validate(e) for e in ENTRIES])
    assert store.identify(KEYS["reader"]).name == "reader"
    assert store.identify(KEYS["ops"]).roles == frozenset({"admin"})
    compared: list[bytes] = []
    real = security.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    store.identify(KEYS["writer"])  # the first entry: still compared with all four
    assert len(compared) == len(ENTRIES)
    with pytest.raises(UnauthenticatedError, match="unknown API key"):
        store.identify(KEYS["writer"] + "x")
    assert len(compared) == 2 * len(ENTRIES)
    upper = {**ENTRIES[0], "sha256": ENTRIES[0]["sha256"].upper()}  # type: ignore[attr-defined]
    assert KeyStore([ApiKeyEntry.model_validate(upper)]).identify(KEYS["writer"]).name == "writer"
    with pytest.raises(ValueError, match="unique"):
        KeyStore([ApiKeyEntry.model_validate(ENTRIES[0])] * 2)


def test_a_service_only_admits_the_calls_it_declares() -> None:
    guard = AccessGuard(KeyStore([ApiKeyEntry.model_validate(e) for e in ENTRIES]), REWARD_CALLS)
    assert (
        guard.check("/plaudit.v1.RewardService/Score", f"Bearer {KEYS['scorer']}").name == "scorer"
    )
    with pytest.raises(PermissionDeniedError, match="not open to any API key"):
        guard.check("/plaudit.v1.FeedbackService/GetStats", f"Bearer {KEYS['reader']}")
    routes = guard.for_calls(feedback.ROUTE_ROLES)  # the feedback HTTP API's guard
    assert routes.check("GET /api/v1/stats", f"Bearer {KEYS['reader']}").name == "reader"
    with pytest.raises(PermissionDeniedError, match="not open to any API key"):
        routes.check("/plaudit.v1.RewardService/Score", f"Bearer {KEYS['scorer']}")
    assert routes.keys is guard.keys and routes.rate is guard.rate  # one bucket per key


@pytest.mark.parametrize(
    ("header", "ok"),
    [("Bearer k1", True), ("bearer  k1 ", True), (None, False), ("", False),
     ("Basic k1", False), ("Bearer", False), ("Bearer " + "x" * 600, False)],
)  # fmt: skip
def test_bearer_header_parsing(header: str | None, ok: bool) -> None:
    if ok:
        assert parse_bearer(header) == "k1"
    else:
        with pytest.raises(UnauthenticatedError):
            parse_bearer(header)


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "x", "sha256": "abc", "roles": ["score"]},
        {"name": "x", "sha256": "0" * 64, "roles": []},
        {"name": "x", "sha256": "0" * 64, "roles": ["root"]},
        {"name": "../x", "sha256": "0" * 64, "roles": ["score"]},
        {"name": "x", "sha256": "0" * 64, "roles": ["score"], "key": "plaintext"},
    ],
)
def test_malformed_key_entries_are_refused(entry: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ApiKeyEntry.model_validate(entry)


def test_rate_limit_is_a_token_bucket_per_key() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(ResourceExhaustedError, match="'a'"):
        limiter.check("a")
    limiter.check("b")  # its own bucket
    now[0] += 0.5  # one token back at 2/s
    limiter.check("a")
    with pytest.raises(ResourceExhaustedError):
        limiter.check("a")
    RateLimiter(0).check("a")  # 0: off


def test_in_flight_limit_counts_calls_being_served() -> None:
    limit = InFlightLimit(2)
    with limit.slot(), limit.slot():
        with pytest.raises(ResourceExhaustedError), limit.slot():
            pass
        assert limit.current == 2
    assert limit.current == 0


# -- configuration ------------------------------------------------------------------------------
def test_keys_come_from_environment_flags_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLAUDIT_API_KEYS", json.dumps(ENTRIES[:2]))
    assert [e.name for e in RewardSettings().api_keys] == ["writer", "reader"]
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, RewardSettings)
    args = parser.parse_args(["--api-keys", *(json.dumps(e) for e in ENTRIES[2:])])
    assert [e.name for e in settings_from_args(RewardSettings, args).api_keys] == ["scorer", "ops"]
    monkeypatch.delenv("PLAUDIT_API_KEYS")
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": ENTRIES}))
    secured = ServerSecurity.from_settings(
        RewardSettings(auth_disabled=False, api_keys_file=keys_file), call_roles=REWARD_CALLS
    )
    assert secured.guard.keys is not None and len(secured.guard.keys) == 4
    keys_file.write_text("not json")
    with pytest.raises(FailedPreconditionError, match="api_keys_file"):
        ServerSecurity.from_settings(
            RewardSettings(auth_disabled=False, api_keys_file=keys_file), call_roles=REWARD_CALLS
        )
    with pytest.raises(FailedPreconditionError, match="unique"):
        ServerSecurity.from_settings(
            RewardSettings(auth_disabled=False, api_keys=[ENTRIES[0], ENTRIES[0]]),
            call_roles=REWARD_CALLS,
        )
    with pytest.raises(ValidationError, match="tls_key_file"):
        RewardSettings(tls_cert_file=keys_file)
    with pytest.raises(ValidationError, match="tls_client_ca_file"):
        RewardSettings(tls_client_ca_file=keys_file)


def test_authentication_is_off_only_when_asked_and_then_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(FailedPreconditionError, match="no API keys configured"):
        ServerSecurity.from_settings(RewardSettings(auth_disabled=False), call_roles=REWARD_CALLS)
    with pytest.raises(FailedPreconditionError, match="choose one"):
        ServerSecurity.from_settings(
            RewardSettings(auth_disabled=True, api_keys=ENTRIES), call_roles=REWARD_CALLS
        )
    with caplog.at_level(logging.WARNING, logger="plaudit.services.common.security.guard"):
        open_ = ServerSecurity.from_settings(
            RewardSettings(auth_disabled=True), call_roles=REWARD_CALLS
        )
    assert not open_.guard.auth_required
    assert any("authentication is DISABLED" in r.getMessage() for r in caplog.records)


def test_a_service_without_keys_refuses_to_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAUDIT_")}
    proc = subprocess.run(
        [sys.executable, "-m", "plaudit.cli", "serve", "feedback", "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "0", "--http-port", "0",
         "--database-url", f"sqlite:///{tmp_path}/f.db"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "no API keys configured" in proc.stderr


def test_keys_new_prints_a_key_and_its_entry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new", "--name", "ci-bot", "--roles", "score,admin"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["api_key"].startswith("plaudit_") and len(out["api_key"]) > 40
    assert out["entry"] == {
        "name": "ci-bot",
        "sha256": hash_key(out["api_key"]),
        "roles": ["score", "admin"],
    }
    assert main(["keys", "new", "--name", "x", "--roles", "root"]) == 2


# -- the feedback service with keys: gRPC and HTTP --------------------------------------------
@pytest.fixture(scope="module")
def keyed_feedback(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    folder = tmp_path_factory.mktemp("keyed-feedback")
    server = ServerThread(
        "feedback",
        database_url=f"sqlite:///{folder}/f.db",
        api_keys=ENTRIES,
        rate_limit_rps=1.0,
        rate_limit_burst=20,
        log_level="WARNING",
    ).start()
    yield server
    server.stop()


def test_grpc_calls_need_a_key_with_the_right_role(keyed_feedback: ServerThread) -> None:
    address = keyed_feedback.address
    with (
        as_(None).channel(address) as anonymous,
        ClientCredentials(api_key="plaudit_not-a-key").channel(address) as stranger,
        as_("writer").channel(address) as writer,
        as_("reader").channel(address) as reader,
    ):
        # health and reflection stay open
        health = health_pb2_grpc.HealthStub(anonymous)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(anonymous)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = reflect.ServerReflectionInfo(iter([request]), timeout=5)
        assert "plaudit.v1.FeedbackService" in {
            s.name for s in answer.list_services_response.service
        }

        code, details = refusal(Stub(anonymous).SubmitComparison, comparison("k1"))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in details
        code, details = refusal(Stub(stranger).GetStats, pb.GetStatsRequest())
        assert code == grpc.StatusCode.UNAUTHENTICATED and "not-a-key" not in details
        code, details = refusal(Stub(reader).SubmitComparison, comparison("k1"))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "'reader'" in details and "submit_feedback" in details
        batch = iter([pb.SubmitBatchRequest(comparison=comparison("k2"))])
        assert refusal(Stub(reader).SubmitBatch, batch)[0] == grpc.StatusCode.PERMISSION_DENIED
        export = pb.ExportPreferencesRequest()
        code, _ = refusal(Stub(writer).ExportPreferences, export)
        assert code == grpc.StatusCode.PERMISSION_DENIED

        assert Stub(writer).SubmitComparison(comparison("k1"), timeout=10).feedback_id
        batch = iter([pb.SubmitBatchRequest(comparison=comparison("k2"))])
        assert Stub(writer).SubmitBatch(batch, timeout=10).accepted == 1
        assert Stub(reader).GetStats(pb.GetStatsRequest(), timeout=10).records == 2
        pages = list(Stub(reader).ExportPreferences(export, timeout=10))
        assert sum(len(p.pairs) for p in pages) == 1
    text = keyed_feedback.server.grpc.registry.get_sample_value(
        "plaudit_grpc_errors_total",
        {"method": "plaudit.v1.FeedbackService/SubmitComparison", "code": "UNAUTHENTICATED"},
    )
    assert text == 1.0  # refusals are counted like any other status


def test_http_api_uses_the_same_keys_roles_and_rate_limits(keyed_feedback: ServerThread) -> None:
    base = keyed_feedback.http_url
    event = {"prompt": "Q?", "chosen": "yes", "rejected": "no", "annotator_id": "writer",
             "idempotency_key": "http-1"}  # fmt: skip
    status, body = http(base + "/api/v1/comparisons", "POST", event)
    assert status == 401 and body["error"]["code"] == "UNAUTHENTICATED"
    status, body = http(base + "/api/v1/comparisons", "POST", event, key="nope")
    assert status == 401
    status, body = http(base + "/api/v1/comparisons", "POST", event, key=KEYS["reader"])
    assert status == 403 and body["error"]["code"] == "PERMISSION_DENIED"
    assert http(base + "/api/v1/comparisons", "POST", event, key=KEYS["writer"])[0] == 201
    assert http(base + "/api/v1/tasks/next?annotator_id=writer", key=KEYS["writer"])[0] == 200
    assert http(base + "/api/v1/stats", key=KEYS["writer"])[0] == 403
    assert http(base + "/api/v1/stats", key=KEYS["reader"])[0] == 200
    assert http(base + "/api/v1/nothing", key=KEYS["reader"])[0] == 404
    assert http(base + "/api/v1/nothing")[0] == 401
    assert http(base + "/")[0] == 200  # the page, its files and health stay public
    assert http(base + "/healthz")[0] == 200
    # the reader's bucket is shared by gRPC and HTTP: drain it over gRPC, HTTP answers 429
    with as_("reader").channel(keyed_feedback.address) as channel:
        codes = []
        for _ in range(25):
            try:
                Stub(channel).GetStats(pb.GetStatsRequest(), timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    status, body = http(base + "/api/v1/stats", key=KEYS["reader"])
    assert status == 429 and "rate limit" in body["error"]["message"]
    assert http(base + "/api/v1/tasks/next?annotator_id=writer", key=KEYS["writer"])[0] == 200


# -- limits ---------------------------------------------------------------------------------------
def test_in_flight_limit_refuses_the_excess_and_health_stays_open(tmp_path: Path) -> None:
    server = ServerThread(
        "feedback",
        database_url=f"sqlite:///{tmp_path}/f.db",
        max_in_flight=1,
        commit_wait_ms=1500,  # a lone submission waits this long for company
        log_level="WARNING",
    ).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = Stub(channel)
            first: list[Any] = []
            slow = threading.Thread(
                target=lambda: first.append(stub.SubmitComparison(comparison("a"), timeout=20))
            )
            slow.start()
            time.sleep(0.5)
            code, details = refusal(stub.GetStats, pb.GetStatsRequest())
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 1" in details
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
            slow.join(20)
            assert first and first[0].feedback_id == "1"
            assert stub.GetStats(pb.GetStatsRequest(), timeout=10).records == 1  # slot freed
    finally:
        server.stop()


def test_messages_over_the_size_limit_are_refused(tmp_path: Path) -> None:
    server = ServerThread(
        "feedback",
        database_url=f"sqlite:///{tmp_path}/f.db",
        max_message_bytes=64 * 1024,
        max_text_bytes=1_000_000,
        log_level="WARNING",
    ).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            big = pb.SubmitComparisonRequest(
                prompt="x" * 100_000, chosen="a", rejected="b", annotator_id="a",
                idempotency_key="big",
            )  # fmt: skip
            code, _ = refusal(Stub(channel).SubmitComparison, big)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert Stub(channel).SubmitComparison(comparison("small"), timeout=10).feedback_id
    finally:
        server.stop()


# -- TLS ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def test_tls_serves_grpc_and_http_with_the_configured_certificate(
    tls: TlsFiles, tmp_path: Path
) -> None:
    server = ServerThread(
        "feedback",
        database_url=f"sqlite:///{tmp_path}/f.db",
        tls_cert_file=tls.server_cert,
        tls_key_file=tls.server_key,
        log_level="WARNING",
    ).start()
    try:
        for host in ("127.0.0.1", "localhost"):
            address = f"{host}:{server.server.port}"
            with ClientCredentials(ca_file=tls.ca).channel(address) as channel:
                assert Stub(channel).GetStats(pb.GetStatsRequest(), timeout=10).records == 0
        with grpc.insecure_channel(server.address) as plain:
            code, _ = refusal(Stub(plain).GetStats, pb.GetStatsRequest())
            assert code == grpc.StatusCode.UNAVAILABLE
        context = ssl.create_default_context(cafile=str(tls.ca))
        url = f"https://127.0.0.1:{server.server.http_port}/healthz"
        assert http(url, context=context) == (200, {"status": "SERVING"})
    finally:
        server.stop()


def test_mutual_tls_requires_a_client_certificate_from_the_configured_ca(
    tls: TlsFiles, tmp_path: Path
) -> None:
    server = ServerThread(
        "feedback",
        database_url=f"sqlite:///{tmp_path}/f.db",
        tls_cert_file=tls.server_cert,
        tls_key_file=tls.server_key,
        tls_client_ca_file=tls.ca,
        api_keys=ENTRIES,
        log_level="WARNING",
    ).start()
    try:
        address = server.address
        refused = [
            ClientCredentials(api_key=KEYS["reader"], ca_file=tls.ca),  # no client certificate
            ClientCredentials(
                api_key=KEYS["reader"],
                ca_file=tls.ca,
                cert_file=tls.rogue_client_cert,
                key_file=tls.rogue_client_key,
            ),
        ]
        for credentials in refused:
            with credentials.channel(address) as channel:
                code, _ = refusal(Stub(channel).GetStats, pb.GetStatsRequest())
                assert code == grpc.StatusCode.UNAVAILABLE
        trusted = ClientCredentials(
            ca_file=tls.ca, cert_file=tls.client_cert, key_file=tls.client_key
        )
        with trusted.channel(address) as channel:  # the certificate is not a key
            code, _ = refusal(Stub(channel).GetStats, pb.GetStatsRequest())
            assert code == grpc.StatusCode.UNAUTHENTICATED
        keyed = ClientCredentials(
            api_key=KEYS["reader"],
            ca_file=tls.ca,
            cert_file=tls.client_cert,
            key_file=tls.client_key,
        )
        with keyed.channel(address) as channel:
            assert Stub(channel).GetStats(pb.GetStatsRequest(), timeout=10).records == 0
    finally:
        server.stop()


# -- the reward service and its clients ---------------------------------------------------------
def test_reward_service_and_its_clients_use_keys(
    tiny_registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = ServerThread(registry=tiny_registry, api_keys=ENTRIES, log_level="WARNING").start()
    try:
        address = server.address
        with RewardClient(address) as anonymous:
            with pytest.raises(grpc.RpcError) as err:
                anonymous.score(["Q?"], ["A."])
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with RewardClient(address, as_("scorer")) as client:
            rewards, version = client.score(["Q?"], ["A."])
            assert len(rewards) == 1 and version
            assert client.compare("Q?", "yes", "no").model_version == version
        with RewardClient(address, as_("ops")) as wrong:
            with pytest.raises(grpc.RpcError) as err:
                wrong.model()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as err:
            notify_reload(address, credentials=as_("scorer"))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert notify_reload(address, credentials=as_("ops")).live_version == version

        args = ["score", "--addr", address, "--prompt", "Q?", "--completion", "A."]
        assert main([*args, "--api-key", KEYS["scorer"]]) == 0
        assert json.loads(capsys.readouterr().out)["model_version"] == version

        task = LabellingTask(
            task_id=1, key="k", prompt="Q?", completions=("yes", "no"), metadata={},
            source="test", labels=0,
        )  # fmt: skip

        async def margins(credentials: ClientCredentials) -> dict[int, float]:
            scorer = RewardMarginScorer(address, timeout_s=10, credentials=credentials)
            try:
                return await scorer.margins([task])
            finally:
                await scorer.close()

        assert set(asyncio.run(margins(as_("scorer")))) == {1}  # feedback -> reward, with a key
        with pytest.raises(grpc.aio.AioRpcError) as aio_err:
            asyncio.run(margins(as_(None)))
        assert aio_err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop()


def test_feedback_settings_carry_client_credentials_for_the_reward_service() -> None:
    settings = FeedbackSettings(api_key=KEYS["scorer"], reward_addr="127.0.0.1:1")
    assert settings.credentials.api_key == KEYS["scorer"]
    assert KEYS["scorer"] not in repr(settings)  # a secret: never in logs or reprs
    with pytest.raises(PermissionDeniedError):
        AccessGuard(KeyStore([ApiKeyEntry.model_validate(ENTRIES[0])]), REWARD_CALLS).check(
            "/plaudit.v1.RewardService/Score", f"Bearer {KEYS['writer']}"
        )
