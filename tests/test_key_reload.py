"""Issue 17 item 8: API keys rotate without a restart. The server re-reads its keys file when it
changes (looked at, at most once a second, on use): a new key works and a removed one is refused
within seconds, and no call of a key that stays is dropped meanwhile."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from plaudit.services.common.errors import UnauthenticatedError
from plaudit.services.common.security.client import ClientCredentials
from plaudit.services.common.security.guard import ServerSecurity
from plaudit.services.common.security.keys import ReloadingKeyStore, hash_key, new_api_key
from plaudit.services.feedback import access as feedback
from plaudit.services.feedback.settings import FeedbackSettings
from plaudit.v1 import feedback_pb2 as pb
from plaudit.v1 import feedback_pb2_grpc
from tests.conftest import ServerThread

ROLES = ["read_feedback", "submit_feedback"]


def write_keys(path: Path, keys: dict[str, str]) -> None:
    """Replace the keys file the way an operator (or a Secret update) does: aside, then rename."""
    entries = [{"name": n, "sha256": hash_key(k), "roles": ROLES} for n, k in keys.items()]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, path)


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return tmp_path / "keys.json"


@pytest.fixture
def keyed_server(tmp_path: Path, keys_file: Path) -> Iterator[tuple[ServerThread, dict[str, str]]]:
    keys = {"stays": new_api_key(), "old": new_api_key()}
    write_keys(keys_file, keys)
    server = ServerThread(
        "feedback",
        database_url=f"sqlite:///{tmp_path / 'fb.db'}",
        api_keys_file=keys_file,
        log_level="WARNING",
    )
    yield server.start(), keys
    server.stop()


def _stats(address: str, key: str) -> grpc.StatusCode:
    with ClientCredentials(api_key=key).channel(address) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        try:
            stub.GetStats(pb.GetStatsRequest(), timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_a_rotated_keys_file_takes_effect_without_a_restart_or_dropped_calls(
    keyed_server: tuple[ServerThread, dict[str, str]], keys_file: Path
) -> None:
    server, keys = keyed_server
    new = new_api_key()
    assert _stats(server.address, keys["old"]) == grpc.StatusCode.OK
    assert _stats(server.address, new) == grpc.StatusCode.UNAUTHENTICATED

    outcomes: list[grpc.StatusCode] = []
    done = threading.Event()

    def load() -> None:  # a client whose key stays, calling all through the rotation
        with ClientCredentials(api_key=keys["stays"]).channel(server.address) as channel:
            stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
            while not done.is_set():
                try:
                    stub.GetStats(pb.GetStatsRequest(), timeout=10)
                    outcomes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    outcomes.append(exc.code())

    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(0.5)
        rotated = time.monotonic()
        write_keys(keys_file, {"stays": keys["stays"], "new": new})
        while _stats(server.address, new) != grpc.StatusCode.OK:
            assert time.monotonic() - rotated < 3, "the new key was never accepted"
            time.sleep(0.1)
        assert _stats(server.address, keys["old"]) == grpc.StatusCode.UNAUTHENTICATED
        assert time.monotonic() - rotated < 3
        time.sleep(0.5)
    finally:
        done.set()
        thread.join(30)
    assert outcomes and set(outcomes) == {grpc.StatusCode.OK}, set(outcomes)


def test_a_broken_keys_file_keeps_the_previous_keys(keys_file: Path) -> None:
    """A half-written, invalid or emptied file is refused (logged) and the keys in force stay."""
    keys = {"a": new_api_key()}
    write_keys(keys_file, keys)
    security = ServerSecurity.from_settings(
        FeedbackSettings(auth_disabled=False, api_keys_file=keys_file),
        call_roles=feedback.CALL_ROLES,
    )
    store = security.guard.keys
    assert isinstance(store, ReloadingKeyStore)
    assert store.identify(keys["a"]).name == "a"
    for broken in ('[{"name": "a", "sha2', "[]", '[{"name": "b"}]'):
        keys_file.write_text(broken)
        os.utime(keys_file, ns=(time.time_ns(), time.time_ns()))
        assert store.reload_if_changed() is False
        assert store.identify(keys["a"]).name == "a"
    keys_file.unlink()
    assert store.reload_if_changed() is False
    assert store.identify(keys["a"]).name == "a"
    b = new_api_key()
    write_keys(keys_file, {"b": b})
    assert store.reload_if_changed() is True
    assert store.identify(b).name == "b"
    with pytest.raises(UnauthenticatedError):
        store.identify(keys["a"])


# -- certificates ----------------------------------------------------------------------------------
def _served_pem(port: int) -> str:
    import ssl

    pem = ssl.get_server_certificate(("127.0.0.1", port))  # no verification: just look
    return ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(pem))


def _grpc_ok(address: str, ca: Path) -> bool:
    with ClientCredentials(ca_file=ca).channel(address) as channel:
        try:
            feedback_pb2_grpc.FeedbackServiceStub(channel).GetStats(pb.GetStatsRequest(), timeout=5)
        except grpc.RpcError:
            return False
    return True


def test_a_rotated_certificate_is_served_to_new_connections(tmp_path: Path) -> None:
    """Rewrite the certificate and key files: new gRPC connections verify against the new CA
    only, and the HTTP port serves the new certificate, without a restart."""
    import shutil
    import ssl

    from tests.certs import make_tls_files

    old, new = make_tls_files(tmp_path / "old"), make_tls_files(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.pem", live / "server.key"
    shutil.copy(old.server_cert, cert)
    shutil.copy(old.server_key, key)
    server = ServerThread(
        "feedback",
        database_url=f"sqlite:///{tmp_path / 'fb.db'}",
        tls_cert_file=cert,
        tls_key_file=key,
        log_level="WARNING",
    ).start()
    try:
        address = f"localhost:{server.server.port}"
        http_port = server.server.http_port
        old_pem = ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(old.server_cert.read_text()))
        new_pem = ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(new.server_cert.read_text()))
        assert _grpc_ok(address, old.ca) and not _grpc_ok(address, new.ca)
        assert _served_pem(http_port) == old_pem
        with ClientCredentials(ca_file=old.ca).channel(address) as kept:  # opened before
            stub = feedback_pb2_grpc.FeedbackServiceStub(kept)
            stub.GetStats(pb.GetStatsRequest(), timeout=5)
            for src, dst in ((new.server_key, key), (new.server_cert, cert)):  # rename into place
                shutil.copy(src, dst.with_suffix(".tmp"))
                os.replace(dst.with_suffix(".tmp"), dst)
            rotated = time.monotonic()
            while not _grpc_ok(address, new.ca):
                assert time.monotonic() - rotated < 5, "the new certificate was never served"
                time.sleep(0.3)
            assert not _grpc_ok(address, old.ca)
            while _served_pem(http_port) != new_pem:
                assert time.monotonic() - rotated < 5, "HTTP never served the new certificate"
                time.sleep(0.3)
            stub.GetStats(pb.GetStatsRequest(), timeout=5)  # the open connection kept working
    finally:
        server.stop()
