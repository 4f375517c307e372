"""``plaudit up``: bootstrap an empty registry, retrain on new feedback, hot-swap, stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from plaudit.services.common.process import free_port
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.reward.client import RewardClient, wait_until_serving
from plaudit.v1 import feedback_pb2, feedback_pb2_grpc
from tests.conftest import REPO, toy_pairs


def test_up_bootstraps_retrains_on_feedback_and_swaps(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    ports = {name: free_port() for name in ("reward", "rm", "feedback", "fm")}
    home = tmp_path / "home"
    proc = subprocess.Popen(
        [sys.executable, "-m", "plaudit.cli", "up", "--home", str(home), "--no-generation",
         "--bootstrap-checkpoint", str(tiny_checkpoint), "--train-backbone", str(tiny_checkpoint),
         "--retrain-min-pairs", "30", "--check-interval-s", "0.5", "--log-format", "text",
         "--reward-port", str(ports["reward"]), "--reward-metrics-port", str(ports["rm"]),
         "--feedback-port", str(ports["feedback"]), "--feedback-metrics-port", str(ports["fm"]),
         "--feedback-http-port", "0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        reward_addr = f"127.0.0.1:{ports['reward']}"
        feedback_addr = f"127.0.0.1:{ports['feedback']}"
        wait_until_serving(feedback_addr, timeout=120)
        wait_until_serving(reward_addr, timeout=120)
        registry = ModelRegistry(home / "registry")
        bootstrap = registry.promoted()
        assert bootstrap is not None
        with RewardClient(reward_addr) as reward:
            assert reward.model().version == bootstrap
            with grpc.insecure_channel(feedback_addr) as channel:
                stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
                events = (
                    feedback_pb2.SubmitBatchRequest(
                        comparison=feedback_pb2.SubmitComparisonRequest(
                            prompt=p["prompt"], chosen=p["chosen"], rejected=p["rejected"],
                            annotator_id="tester", idempotency_key=f"k{i}",
                        )
                    )
                    for i, p in enumerate(toy_pairs(60))
                )  # fmt: skip
                assert stub.SubmitBatch(events, timeout=60).accepted == 60
            deadline = time.monotonic() + 240
            while len(registry.list_versions()) < 2:
                assert time.monotonic() < deadline, "the scheduler never retrained"
                assert proc.poll() is None, proc.communicate()[0]
                time.sleep(0.5)
            trained = registry.list_versions()[-1]
            assert trained.data_cursor and trained.parent == bootstrap
            assert trained.promotion is not None and "promoted" in trained.promotion
            if trained.promotion["promoted"]:
                while reward.model().version != trained.version:
                    assert time.monotonic() < deadline, "the new version never went live"
                    time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
        assert "bootstrapping a reward model" in output
        assert "retraining the reward model" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
