"""The reward service over a real gRPC channel on loopback: contract, errors, health, reflection,
metrics."""

from __future__ import annotations

import math
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from plaudit.services.common.registry import ModelRegistry
from plaudit.services.reward.settings import RewardSettings
from plaudit.services.runtime.reward_model import LoadedRewardModel
from plaudit.v1 import reward_pb2, reward_pb2_grpc
from tests.conftest import ServerThread

PROMPTS = ["What is the capital of France?", "Tell me a joke.", "hi", "Explain gravity briefly."]
COMPLETIONS = ["Paris.", "Why did the chicken cross the road?", "hello there", "Mass attracts."]


@pytest.fixture(scope="module")
def channel(reward_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(reward_server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> reward_pb2_grpc.RewardServiceStub:
    return reward_pb2_grpc.RewardServiceStub(channel)


def items(n: int | None = None) -> list[reward_pb2.ScoreItem]:
    pairs = list(zip(PROMPTS, COMPLETIONS, strict=True))[:n]
    return [reward_pb2.ScoreItem(prompt=p, completion=c) for p, c in pairs]


def offline_rewards(registry: Path, standardize: bool) -> np.ndarray:
    reg = ModelRegistry(registry, "reward")
    model = LoadedRewardModel.load(reg, reg.promoted() or "", provider="cpu")
    raw, _, _ = model.score_raw(PROMPTS, COMPLETIONS)
    return model.standardize(raw) if standardize else raw


def test_score_returns_one_reward_per_item_in_order(
    stub: reward_pb2_grpc.RewardServiceStub, tiny_registry: Path
) -> None:
    reply = stub.Score(reward_pb2.ScoreRequest(items=items()), timeout=30)
    expected = offline_rewards(tiny_registry, standardize=True)  # the version's default
    np.testing.assert_allclose(reply.rewards, expected, atol=1e-4)
    assert reply.model_version == ModelRegistry(tiny_registry).promoted()
    assert list(reply.truncated) == [False] * 4
    raw = stub.Score(
        reward_pb2.ScoreRequest(items=items(), normalization=reward_pb2.NORMALIZATION_RAW)
    )
    np.testing.assert_allclose(raw.rewards, offline_rewards(tiny_registry, False), atol=1e-4)
    reversed_reply = stub.Score(reward_pb2.ScoreRequest(items=items()[::-1]))
    np.testing.assert_allclose(reversed_reply.rewards, expected[::-1], atol=1e-4)


def test_concurrent_requests_are_batched_and_each_gets_its_own_rewards(
    stub: reward_pb2_grpc.RewardServiceStub, tiny_registry: Path
) -> None:
    expected = offline_rewards(tiny_registry, standardize=True)
    limit = RewardSettings.model_construct().in_flight_limit()  # more: RESOURCE_EXHAUSTED
    futures = [
        stub.Score.future(reward_pb2.ScoreRequest(items=[items()[i % 4]]), timeout=30)
        for i in range(limit)
    ]
    for i, fut in enumerate(futures):
        assert fut.result().rewards[0] == pytest.approx(expected[i % 4], abs=1e-4)


def test_compare_is_bradley_terry(stub: reward_pb2_grpc.RewardServiceStub) -> None:
    """sigmoid(raw_a - raw_b) for this uncalibrated version (T = 1), from the raw rewards
    whatever the normalization the rewards are reported in."""
    reply = stub.Compare(
        reward_pb2.CompareRequest(
            prompt=PROMPTS[0], completion_a=COMPLETIONS[0], completion_b="London."
        )
    )
    raw = stub.Compare(
        reward_pb2.CompareRequest(
            prompt=PROMPTS[0],
            completion_a=COMPLETIONS[0],
            completion_b="London.",
            normalization=reward_pb2.NORMALIZATION_RAW,
        )
    )
    assert raw.prob_a_preferred == pytest.approx(
        1 / (1 + math.exp(-(raw.reward_a - raw.reward_b))), rel=1e-5
    )
    assert reply.prob_a_preferred == pytest.approx(raw.prob_a_preferred, rel=1e-6)
    scored = stub.Score(
        reward_pb2.ScoreRequest(
            items=[
                reward_pb2.ScoreItem(prompt=PROMPTS[0], completion=COMPLETIONS[0]),
                reward_pb2.ScoreItem(prompt=PROMPTS[0], completion="London."),
            ]
        )
    )
    assert [reply.reward_a, reply.reward_b] == pytest.approx(list(scored.rewards), abs=1e-4)
    assert reply.model_version == scored.model_version


def test_get_model_describes_the_active_version(
    stub: reward_pb2_grpc.RewardServiceStub, tiny_registry: Path
) -> None:
    reply = stub.GetModel(reward_pb2.GetModelRequest())
    manifest = ModelRegistry(tiny_registry).manifest(reply.version)
    assert reply.version == ModelRegistry(tiny_registry).promoted()
    assert reply.backbone == manifest.backbone
    assert reply.execution_provider == "CPUExecutionProvider"
    assert reply.precision == "fp32"
    assert reply.max_length == 64
    assert reply.text_format == "pair"
    assert reply.normalization_std == pytest.approx(manifest.normalization.std)
    assert reply.loaded_at.seconds > 0
    assert reply.last_swap_error == ""
    # exported without calibration or training metrics: T = 1, nothing measured, no cursor
    assert manifest.calibration is None
    assert reply.calibration_temperature == 1.0 and reply.calibrated is False
    assert (reply.heldout_pairs, reply.heldout_accuracy, reply.heldout_ece) == (0, 0.0, 0.0)
    assert reply.data_cursor == ""


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (reward_pb2.ScoreRequest(), "items"),
        (
            reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt="a", completion="b")] * 300),
            "items",
        ),
        (reward_pb2.ScoreRequest(items=[*items(2), reward_pb2.ScoreItem()]), "items[2]"),
        (
            reward_pb2.ScoreRequest(
                items=[reward_pb2.ScoreItem(prompt="x" * 70000, completion="b")]
            ),
            "items[0].prompt",
        ),
        (
            reward_pb2.ScoreRequest(
                items=[reward_pb2.ScoreItem(prompt="a", completion="é" * 40000)]
            ),
            "items[0].completion",
        ),
        (reward_pb2.ScoreRequest(items=items(1), normalization=7), "normalization"),  # type: ignore[arg-type]
    ],
)
def test_bad_score_requests_are_invalid_argument_naming_the_field(
    stub: reward_pb2_grpc.RewardServiceStub, request_: reward_pb2.ScoreRequest, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(request_, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":")


def test_limits_are_named_in_the_message(stub: reward_pb2_grpc.RewardServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(reward_pb2.ScoreRequest(items=items(1) * 257))
    assert "257" in err.value.details() and "256" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Compare(reward_pb2.CompareRequest(prompt="p", completion_a="a"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("completion_b:")


def test_health_reports_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "plaudit.v1.RewardService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lets_a_generic_client_call_score(channel: grpc.Channel) -> None:
    """No generated stubs: discover the service through reflection and call it dynamically."""
    database = ProtoReflectionDescriptorDatabase(channel)
    assert "plaudit.v1.RewardService" in database.get_services()
    assert "grpc.health.v1.Health" in database.get_services()
    pool = descriptor_pool.DescriptorPool(database)
    method = pool.FindServiceByName("plaudit.v1.RewardService").FindMethodByName("Score")
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    request: Any = request_cls()
    item = request.items.add()
    item.prompt, item.completion = "hello", "world"
    call = channel.unary_unary(
        "/plaudit.v1.RewardService/Score",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    reply = call(request, timeout=10)
    assert len(reply.rewards) == 1 and reply.model_version


def test_metrics_endpoint_exposes_requests_batches_and_model(
    reward_server: ServerThread, stub: reward_pb2_grpc.RewardServiceStub
) -> None:
    stub.Score(reward_pb2.ScoreRequest(items=items()))
    with pytest.raises(grpc.RpcError):
        stub.Score(reward_pb2.ScoreRequest())
    port = reward_server.server.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for needle in (
        'plaudit_grpc_requests_total{code="OK",method="plaudit.v1.RewardService/Score"}',
        'plaudit_grpc_errors_total{code="INVALID_ARGUMENT",'
        'method="plaudit.v1.RewardService/Score"}',
        "plaudit_grpc_request_duration_seconds_bucket",
        "plaudit_reward_batch_size_bucket",
        "plaudit_reward_queue_wait_seconds_bucket",
        "plaudit_reward_queue_depth",
        "plaudit_reward_tokens_scored_total",
        "plaudit_reward_items_scored_total",
        'execution_provider="CPUExecutionProvider"',
        'plaudit_reward_model_loaded{model="default"} 1.0',
        'data_cursor=""',
        'plaudit_reward_model_calibration_temperature{model="default",version=',
    ):
        assert needle in text, needle


def test_health_is_not_serving_until_a_model_is_promoted(
    tiny_registry: Path, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    server = ServerThread(registry=registry, poll_interval_s=0.1, log_level="WARNING")
    server.start(wait=False)
    try:
        with grpc.insecure_channel(server.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            service = health_pb2.HealthCheckRequest(service="plaudit.v1.RewardService")
            assert health.Check(service).status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = reward_pb2_grpc.RewardServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(reward_pb2.ScoreRequest(items=items(1)))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError) as err:
                stub.GetModel(reward_pb2.GetModelRequest())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            shutil.copytree(tiny_registry, registry)  # publish + promote
            deadline = time.monotonic() + 30
            while health.Check(service).status != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "never became SERVING"
                time.sleep(0.05)
            assert len(stub.Score(reward_pb2.ScoreRequest(items=items())).rewards) == 4
    finally:
        server.stop()


def test_a_full_queue_is_resource_exhausted(tiny_registry: Path) -> None:
    server = ServerThread(
        registry=tiny_registry,
        max_queue_items=4,
        max_items_per_request=4,
        max_batch_size=4,
        max_wait_ms=2000,
        log_level="WARNING",
    ).start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = reward_pb2_grpc.RewardServiceStub(ch)
            first = stub.Score.future(reward_pb2.ScoreRequest(items=items(3)), timeout=30)
            time.sleep(0.3)  # waiting for its batch to fill: 3 of 4 queue slots taken
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(reward_pb2.ScoreRequest(items=items(2)), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue full" in err.value.details()
            assert len(first.result().rewards) == 3
    finally:
        server.stop()


def test_the_client_deadline_is_honoured(tiny_registry: Path) -> None:
    server = ServerThread(registry=tiny_registry, max_wait_ms=1500, log_level="WARNING").start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = reward_pb2_grpc.RewardServiceStub(ch)
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(reward_pb2.ScoreRequest(items=items(1)), timeout=0.2)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - t0 < 1.0
            # the server is fine afterwards
            assert len(stub.Score(reward_pb2.ScoreRequest(items=items(2)), timeout=10).rewards) == 2
    finally:
        server.stop()


def test_many_threads_hammering_never_crash_the_server(
    stub: reward_pb2_grpc.RewardServiceStub,
) -> None:
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(10):
                n = int(rng.integers(1, 9))
                reply = stub.Score(
                    reward_pb2.ScoreRequest(items=[items()[j % 4] for j in range(n)]), timeout=30
                )
                assert len(reply.rewards) == n
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
