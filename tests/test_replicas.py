"""Many replicas: two reward-service processes follow one registry behind one client address.

The Python client balances over both (gRPC's round_robin), a promotion reaches both within the
poll interval (plus the load), no call fails meanwhile, every call sent after both report the
new version is answered by it, and each replica's ``plaudit_reward_model_info`` shows what it
serves. ``--notify`` makes the fleet converge before the command returns.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from plaudit.cli import main
from plaudit.services.common.process import ServiceProcess, start_service
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.reward.client import RewardClient, RewardRpcError, wait_until_serving
from plaudit.v1 import reward_pb2
from tests.conftest import build_tiny_checkpoint

POLL_INTERVAL_S = 1.0
LOAD_MARGIN_S = 6.0  # verify, load, warm up and smoke-test the tiny model on a busy 2-core box
PROMPTS = ["What is the capital of France?", "Tell me a joke.", "hi"]
COMPLETIONS = ["Paris.", "Why did the chicken cross the road?", "hello there"]


@pytest.fixture(scope="module")
def fleet_registry(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v1 promoted (tiny_registry's model) and v2 exported, not promoted."""
    from plaudit.trainer.export import ExportConfig, export_reward

    root = tmp_path_factory.mktemp("fleet-registry")
    shutil.copytree(tiny_registry, root, dirs_exist_ok=True)
    ckpt = build_tiny_checkpoint(tmp_path_factory.mktemp("fleet-ckpt"), seed=7)
    export_reward(
        ExportConfig(checkpoint=str(ckpt), max_length=64, reference_pairs=8), ModelRegistry(root)
    )
    return root


@pytest.fixture
def fleet(fleet_registry: Path) -> Iterator[list[ServiceProcess]]:
    replicas = [
        start_service(
            "reward",
            "--registry",
            str(fleet_registry),
            "--poll-interval-s",
            str(POLL_INTERVAL_S),
            "--max-wait-ms",
            "2",
        )
        for _ in range(2)
    ]
    try:
        for replica in replicas:
            wait_until_serving(replica.address, timeout=90, service="plaudit.v1.RewardService")
        yield replicas
    finally:
        for replica in replicas:
            replica.stop(timeout=30)


def samples(replica: ServiceProcess, name: str) -> list[Sample]:
    """The samples called ``name`` on the replica's /metrics page."""
    families = text_string_to_metric_families(replica.metrics_text())
    return [sample for family in families for sample in family.samples if sample.name == name]


def live_version(replica: ServiceProcess) -> str:
    """The version a replica serves, as its ``plaudit_reward_model_info`` metric says."""
    versions = [
        s.labels["version"] for s in samples(replica, "plaudit_reward_model_info") if s.value == 1
    ]
    assert len(versions) == 1, versions
    return versions[0]


def score_calls(replica: ServiceProcess) -> float:
    """Score calls the replica answered OK (its own gRPC metrics)."""
    return sum(
        s.value
        for s in samples(replica, "plaudit_grpc_requests_total")
        if s.labels["method"].endswith("RewardService/Score") and s.labels["code"] == "OK"
    )


def test_two_replicas_balance_and_converge_on_a_promotion(
    fleet: list[ServiceProcess], fleet_registry: Path
) -> None:
    reg = ModelRegistry(fleet_registry)
    v1 = reg.promoted()
    assert v1 is not None
    (v2,) = [m.version for m in reg.list_versions() if m.version != v1]
    assert [live_version(r) for r in fleet] == [v1, v1]
    addresses = [r.address for r in fleet]

    # round robin: one client address list, calls spread over both processes
    before = [score_calls(r) for r in fleet]
    with RewardClient(addresses, timeout_s=30) as client:
        for _ in range(40):
            client.score(PROMPTS[:1], COMPLETIONS[:1])
    spread = [score_calls(r) - b for r, b in zip(fleet, before, strict=True)]
    assert sum(spread) == 40 and min(spread) >= 15, spread

    responses: list[tuple[float, float, str, list[float]]] = []  # sent, received, version
    errors: list[BaseException] = []
    stop = threading.Event()

    def drive() -> None:
        with RewardClient(",".join(addresses), timeout_s=30) as client:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    rewards, version = client.score(
                        PROMPTS, COMPLETIONS, normalization=reward_pb2.NORMALIZATION_RAW
                    )
                except RewardRpcError as exc:
                    errors.append(exc)
                    continue
                responses.append((sent, time.monotonic(), version, rewards))

    threads = [threading.Thread(target=drive) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        # promoted without --notify: each replica finds it at its next poll
        promoted_at = time.monotonic()
        assert main(["registry", "promote", v2, "--registry", str(fleet_registry)]) == 0
        converged_at: dict[str, float] = {}
        deadline = promoted_at + POLL_INTERVAL_S + LOAD_MARGIN_S
        while len(converged_at) < len(fleet) and time.monotonic() < deadline:
            for replica in fleet:
                if replica.address not in converged_at and live_version(replica) == v2:
                    converged_at[replica.address] = time.monotonic()
            time.sleep(0.02)
        assert len(converged_at) == len(fleet), f"not converged: {converged_at}"
        fleet_converged = max(converged_at.values())
        load_s = {
            r.address: round(samples(r, "plaudit_reward_model_load_seconds_sum")[0].value, 3)
            for r in fleet
        }  # the initial load and this swap's
        time.sleep(1.5)
        # back to v1 with --notify: every replica swaps before the command returns
        rollback_begun = time.monotonic()
        assert main(["registry", "rollback", "--registry", str(fleet_registry),
                     "--notify", ",".join(addresses)]) == 0  # fmt: skip
        notified = time.monotonic()
        assert [live_version(r) for r in fleet] == [v1, v1]
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)

    assert errors == [], errors[:3]
    lag = {a: round(t - promoted_at, 3) for a, t in converged_at.items()}
    assert max(lag.values()) <= POLL_INTERVAL_S + LOAD_MARGIN_S, lag
    seen = {version for _, _, version, _ in responses}
    assert seen == {v1, v2}
    during = [r for r in responses if promoted_at <= r[0] and r[1] <= notified]
    assert any(v == v2 for _, _, v, _ in during)
    # once both replicas report v2, and until the rollback begins, only v2 answers: every call
    # sent after convergence, and every answer received after it (calls already in a batch on
    # v1 when the last replica swapped get 0.5 s to finish); after --notify returns, only v1
    after_convergence = [
        (sent, received, version)
        for sent, received, version, _ in responses
        if (sent >= fleet_converged or received >= fleet_converged + 0.5)
        and received < rollback_begun
    ]
    assert len(after_convergence) > 10
    for sent, _, version in after_convergence:
        assert version == v2, (round(sent - fleet_converged, 3), version)
    for sent, _, version, _ in responses:
        if sent >= notified:
            assert version == v1, (round(sent - notified, 3), version)
    # the rewards are each version's own: the two models score the same texts differently
    by_version = {v: np.array(r) for _, _, v, r in responses}
    assert not np.allclose(by_version[v1], by_version[v2])
    print(f"poll {POLL_INTERVAL_S} s; converged after {lag} s; load time so far {load_s} s")
