"""Hot swap: the watcher on its own, then the reward service under load through promotions."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pytest

from plaudit.cli import main
from plaudit.services.common.hotswap import ModelWatcher
from plaudit.services.common.registry import ModelManifest, ModelRegistry
from plaudit.services.runtime.reward_model import LoadedRewardModel
from plaudit.trainer.export import ExportConfig, export_reward
from plaudit.v1 import admin_pb2, admin_pb2_grpc, reward_pb2, reward_pb2_grpc
from tests.conftest import ServerThread, build_tiny_checkpoint


# -- the watcher alone -------------------------------------------------------------------------
def publish(reg: ModelRegistry, tmp: Path, version: str, payload: str) -> None:
    src = tmp / f"src-{version}"
    src.mkdir()
    (src / "weights.txt").write_text(payload)
    manifest = ModelManifest(
        version=version, kind="reward", created_at=datetime.now(UTC), backbone="test",
        onnx_files={}, text_format={}, input_names=[],
    )  # fmt: skip
    reg.publish(src, manifest)


def test_watcher_swaps_only_to_candidates_that_load(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    for version, payload in [("good1", "1"), ("nan", "NaN"), ("good2", "2")]:
        publish(reg, tmp_path, version, payload)
    loads: list[str] = []

    def load(version: str) -> float:
        loads.append(version)
        value = float((reg.checkout(version)[1] / "weights.txt").read_text())
        if not np.isfinite(value):
            raise ValueError("smoke batch scored NaN")
        return value

    live: list[float] = []

    async def activate(model: float) -> None:
        live.append(model)

    async def scenario() -> None:
        watcher = ModelWatcher(reg, load, activate, poll_interval_s=60)
        assert (await watcher.check()).live_version is None  # nothing promoted yet
        reg.promote("good1")
        outcome = await watcher.check()
        assert outcome.swapped and outcome.live_version == "good1"
        reg.promote("nan")
        outcome = await watcher.check()
        assert not outcome.swapped and outcome.live_version == "good1"
        assert "nan: smoke batch scored NaN" in watcher.last_error
        await watcher.check()  # same pointer: no retry
        assert loads.count("nan") == 1
        reg.promote("nan")  # promoted anew: retried (and fails again)
        await watcher.check()
        assert loads.count("nan") == 2 and watcher.live_version == "good1"
        (Path(reg.versions_dir) / "good2" / "weights.txt").write_text(
            "3"
        )  # tampered after publishing
        with pytest.raises(Exception, match="sha256"):
            reg.promote("good2")  # the registry itself refuses to promote a tampered version
        reg.rollback()  # nan -> good1, already live: the error clears
        outcome = await watcher.check()
        assert not outcome.swapped and outcome.error == "" and watcher.live_version == "good1"

    asyncio.run(scenario())
    assert live == [1.0]


def test_a_tampered_candidate_is_rejected_by_hash(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    publish(reg, tmp_path, "v1", "1")
    publish(reg, tmp_path, "v2", "2")
    reg.promote("v1")
    reg.promote("v2")
    (Path(reg.versions_dir) / "v2" / "weights.txt").write_text("evil")  # corrupted after promotion

    async def activate(model: str) -> None:
        pass

    async def scenario() -> str:
        watcher = ModelWatcher(reg, lambda v: reg.verify(v).version, activate, poll_interval_s=60)
        await watcher.check()
        return watcher.last_error

    assert "sha256 of weights.txt" in asyncio.run(scenario())


# -- the reward service under load -------------------------------------------------------------
PROMPTS = ["What is the capital of France?", "Tell me a joke.", "hi"]
COMPLETIONS = ["Paris.", "Why did the chicken cross the road?", "hello there"]


@pytest.fixture(scope="module")
def swap_registry(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v1 promoted (from tiny_registry); v2 and v3 two other models (the test corrupts v3)."""
    root = tmp_path_factory.mktemp("swap-registry")
    shutil.copytree(tiny_registry, root, dirs_exist_ok=True)
    reg = ModelRegistry(root)
    for seed in (1, 2):
        ckpt = build_tiny_checkpoint(tmp_path_factory.mktemp(f"ckpt{seed}"), seed=seed)
        export_reward(ExportConfig(checkpoint=str(ckpt), max_length=64, reference_pairs=8), reg)
    return root


def test_promotion_corrupt_candidate_and_rollback_under_load(swap_registry: Path) -> None:
    reg = ModelRegistry(swap_registry)
    v1, v2, v3 = (m.version for m in reg.list_versions())
    assert reg.promoted() == v1
    offline = {
        v: LoadedRewardModel.load(reg, v, provider="cpu").score_raw(PROMPTS, COMPLETIONS)[0]
        for v in (v1, v2)
    }
    assert not np.allclose(offline[v1], offline[v2])
    # swaps come from --notify / ReloadModel (the poll is tested elsewhere): deterministic steps
    server = ServerThread(registry=swap_registry, poll_interval_s=3600, log_level="ERROR").start()
    # (version, earliest time it may answer, latest time it may answer)
    windows: dict[str, list[list[float]]] = {v1: [[0.0, float("inf")]]}
    responses: list[tuple[float, float, str, list[float]]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            request = reward_pb2.ScoreRequest(
                items=[reward_pb2.ScoreItem(prompt=p, completion=c)
                       for p, c in zip(PROMPTS, COMPLETIONS, strict=True)],
                normalization=reward_pb2.NORMALIZATION_RAW,
            )  # fmt: skip
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    reply = stub.Score(request, timeout=30)
                except grpc.RpcError as exc:
                    errors.append(exc)
                    continue
                responses.append((sent, time.monotonic(), reply.model_version, list(reply.rewards)))

    def swap(cli: list[str], expect_live: str) -> None:
        begun = time.monotonic()
        assert main([*cli, "--registry", str(swap_registry), "--notify", server.address]) == 0
        done = time.monotonic()
        for version, spans in windows.items():
            if version != expect_live and spans[-1][1] == float("inf"):
                spans[-1][1] = done  # the old version may answer until the swap is confirmed
        if expect_live not in windows or windows[expect_live][-1][1] != float("inf"):
            windows.setdefault(expect_live, []).append([begun, float("inf")])

    threads = [threading.Thread(target=client) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        swap(["registry", "promote", v2], v2)
        time.sleep(1.0)
        reg.promote(v3)
        onnx_file = (
            Path(reg.versions_dir) / v3 / "model.onnx"
        )  # corrupted after promotion (bad disk)
        onnx_file.write_bytes(onnx_file.read_bytes()[:-100])
        with grpc.insecure_channel(server.address) as channel:
            reply = admin_pb2_grpc.AdminServiceStub(channel).ReloadModel(
                admin_pb2.ReloadModelRequest(), timeout=30
            )
            assert reply.live_version == v2 and reply.promoted_version == v3
            assert v3 in reply.last_swap_error
            model = reward_pb2_grpc.RewardServiceStub(channel).GetModel(
                reward_pb2.GetModelRequest()
            )
            assert model.version == v2 and v3 in model.last_swap_error
        time.sleep(1.0)
        swap(["registry", "rollback"], v2)  # v3 -> v2, already live: the error clears
        with grpc.insecure_channel(server.address) as channel:
            model = reward_pb2_grpc.RewardServiceStub(channel).GetModel(
                reward_pb2.GetModelRequest()
            )
            assert model.version == v2 and model.last_swap_error == ""
        swap(["registry", "rollback"], v1)  # v2 -> v1
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
        server.stop()

    assert errors == [], errors[:3]
    assert len(responses) > 50
    seen = {version for _, _, version, _ in responses}
    assert seen == {v1, v2}  # the corrupt v3 never answered
    for sent, received, version, rewards in responses:
        assert any(start <= received and sent <= end for start, end in windows[version]), (
            f"{version} answered at {received:.3f}, outside {windows[version]}"
        )
        np.testing.assert_allclose(rewards, offline[version], atol=1e-4)
    last_versions = [v for _, _, v, _ in sorted(responses)[-5:]]
    assert last_versions == [v1] * 5


def test_the_reward_service_serves_and_swaps_from_a_registry_on_s3(
    tiny_registry: Path, s3_bucket: str, tmp_path: Path
) -> None:
    """The cluster setup: the trainer publishes to S3 (``plaudit export``), serving loads from
    S3 through its local cache, and ``plaudit registry promote --notify`` swaps it."""
    url = f"{s3_bucket}/{uuid.uuid4().hex}/registry"
    local = ModelRegistry(tiny_registry)
    v1 = local.promoted()
    assert v1 is not None
    remote = ModelRegistry(url, cache_dir=tmp_path / "publisher-cache")
    remote.publish(local.checkout(v1)[1], local.manifest(v1))
    remote.promote(v1)
    ckpt = build_tiny_checkpoint(tmp_path / "ckpt", seed=3)
    export = ["export", "reward", "--checkpoint", str(ckpt), "--registry", url,
              "--max-length", "64", "--reference-pairs", "8", "--log-level", "ERROR"]  # fmt: skip
    assert main(export) == 0
    (v2,) = {m.version for m in remote.list_versions()} - {v1}

    cache = tmp_path / "serving-cache"
    server = ServerThread(
        registry=url, registry_cache=cache, poll_interval_s=3600, log_level="ERROR"
    ).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            request = reward_pb2.ScoreRequest(
                items=[reward_pb2.ScoreItem(prompt=PROMPTS[0], completion=COMPLETIONS[0])],
                normalization=reward_pb2.NORMALIZATION_RAW,
            )
            assert stub.Score(request, timeout=30).model_version == v1
            assert main(["registry", "promote", v2, "--registry", url,
                         "--notify", server.address]) == 0  # fmt: skip
            reply = stub.Score(request, timeout=30)
            assert reply.model_version == v2
            offline = LoadedRewardModel.load(remote, v2, provider="cpu")
            raw = offline.score_raw([PROMPTS[0]], [COMPLETIONS[0]])[0]
            np.testing.assert_allclose(reply.rewards, raw, atol=1e-4)
            model = stub.GetModel(reward_pb2.GetModelRequest())
            assert model.version == v2 and model.last_swap_error == ""
    finally:
        server.stop()
    cached = {p.name for p in cache.rglob("*") if p.is_dir() and p.name in (v1, v2)}
    assert cached == {v1, v2}  # serving ran from its local copies


def test_a_storage_error_is_retried_at_the_next_poll(tmp_path: Path) -> None:
    """A download cut off (OSError) is no verdict on the candidate: the same pointer is tried
    again; a rejected candidate (any other error) waits for a new promotion."""
    reg = ModelRegistry(tmp_path / "reg")
    publish(reg, tmp_path, "v1", "1")
    reg.promote("v1")
    failures = [ConnectionResetError("connection reset by peer")]

    def load(version: str) -> str:
        if failures:
            raise failures.pop()
        return version

    live: list[str] = []

    async def activate(model: str) -> None:
        live.append(model)

    async def scenario() -> tuple[bool, bool]:
        watcher = ModelWatcher(reg, load, activate, poll_interval_s=60)
        first = await watcher.check()
        second = await watcher.check()
        return first.swapped, second.swapped

    assert asyncio.run(scenario()) == (False, True)
    assert live == ["v1"]
