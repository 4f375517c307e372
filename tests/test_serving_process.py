"""The reward service as a real process: no torch, structured logs, graceful SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from plaudit.services.common.process import free_port
from plaudit.services.reward.client import wait_until_serving
from plaudit.v1 import reward_pb2, reward_pb2_grpc
from tests.conftest import NO_TORCH_PRELUDE, REPO


def test_sigterm_drains_in_flight_requests_and_exits_zero_without_torch(
    tiny_registry: Path,
) -> None:
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "PLAUDIT_MAX_WAIT_MS": "400", "PLAUDIT_GRACE_PERIOD_S": "20"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            NO_TORCH_PRELUDE,
            "serve",
            "reward",
            "--registry",
            str(tiny_registry),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--log-format",
            "json",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        address = f"127.0.0.1:{port}"
        wait_until_serving(address, timeout=60, service="plaudit.v1.RewardService")
        with grpc.insecure_channel(address) as channel, ThreadPoolExecutor(16) as pool:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            request = reward_pb2.ScoreRequest(
                items=[reward_pb2.ScoreItem(prompt="How are you?", completion="Fine, thanks.")]
            )
            assert len(stub.Score(request, timeout=30).rewards) == 1
            in_flight = [pool.submit(stub.Score, request, timeout=30) for _ in range(16)]
            time.sleep(0.15)  # they wait up to 400 ms for their batch: SIGTERM arrives now
            proc.send_signal(signal.SIGTERM)
            replies = [f.result() for f in in_flight]  # every one completes OK
        assert all(len(r.rewards) == 1 and r.model_version for r in replies)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert records, f"no JSON log lines in: {stderr[:2000]}"
    messages = [r["msg"] for r in records]
    assert "serving" in messages
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert "Traceback" not in stderr
    assert "CUDA" not in stderr  # no provider warnings on a machine without a GPU


def test_new_calls_after_shutdown_are_refused(tiny_registry: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            NO_TORCH_PRELUDE,
            "serve",
            "reward",
            "--registry",
            str(tiny_registry),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            str(free_port()),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_serving(f"127.0.0.1:{port}", timeout=60)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            try:
                stub.GetModel(reward_pb2.GetModelRequest(), timeout=2)
            except grpc.RpcError as err:
                assert err.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            else:
                raise AssertionError("a stopped server answered")
    finally:
        if proc.poll() is None:
            proc.kill()
