"""``plaudit up``: bootstrap an empty registry, retrain on new feedback, hot-swap, stop."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from plaudit.services.common.process import free_port
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.feedback.domain import Comparison
from plaudit.services.feedback.export import FeedbackReader
from plaudit.services.feedback.store import FeedbackStore
from plaudit.services.generation.client import GenerationClient
from plaudit.services.reward.client import RewardClient, wait_until_serving
from plaudit.up import PolicyRetraining, RewardRetraining, UpSettings, gate_line, stop_child
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
         "--feedback-http-port", "0", "--reward-http-port", "0"],
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
        assert "starting the reward training" in output
        assert "waiting for retraining" in output  # the status screen, printed once up
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# -- the scheduler's memory -----------------------------------------------------------------------
def _store_pairs(url: str, start: int, n: int) -> None:
    events = [
        Comparison(
            prompt=p["prompt"], chosen=p["chosen"], rejected=p["rejected"],
            annotator_id="tester", idempotency_key=f"k{start + i}",
        )
        for i, p in enumerate(toy_pairs(n, seed=start, start=start))
    ]  # fmt: skip
    with FeedbackStore(url) as store:
        assert not [r for r in store.submit_many(events) if isinstance(r, Exception)]


def test_a_refused_candidate_is_not_retrained_on_the_same_data_even_after_a_restart(
    tiny_registry: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Issue 15: a refused candidate left the promoted cursor where it was, so every check
    retrained on the same pairs. The scheduler now remembers the cursor it tried."""
    home = tmp_path / "home"
    shutil.copytree(tiny_registry, home / "registry")
    settings = UpSettings(
        home=home, retrain_min_pairs=30, train_backbone=str(tiny_checkpoint),
        promotion_significance=1e-12,  # out of reach for a few held-out pairs: always refused
    )  # fmt: skip
    _store_pairs(settings.feedback_url, 0, 40)
    registry = ModelRegistry(settings.registry, "reward")
    live = registry.promoted()
    with FeedbackReader(settings.feedback_url) as store:
        scheduler = RewardRetraining(settings, store)
        assert scheduler.last_tried is None and scheduler.new_pairs() == 40
        summary = asyncio.run(scheduler.check())
        assert summary is not None and summary["promoted"] is False
        assert "not significantly above chance" in gate_line(summary["promotion"])
        assert registry.promoted() == live and len(registry.list_versions()) == 2
        state = json.loads(settings.scheduler_state.read_text())["reward"]
        assert state["outcome"] == "refused" and state["version"] == summary["version"]
        assert state["cursor"] == int(summary["data_cursor"]) > 0
        assert "not significantly above chance" in state["reason"]
        assert scheduler.new_pairs() == 0
        assert asyncio.run(scheduler.check()) is None  # nothing new: no second training
    with FeedbackReader(settings.feedback_url) as store:
        restarted = RewardRetraining(settings, store)  # a restart reads the memory back
        assert restarted.last_tried == state and restarted.new_pairs() == 0
        assert asyncio.run(restarted.check()) is None
        _store_pairs(settings.feedback_url, 40, 29)
        assert asyncio.run(restarted.check()) is None  # 29 < 30 more
        assert len(registry.list_versions()) == 2
        _store_pairs(settings.feedback_url, 69, 1)
        again = asyncio.run(restarted.check())  # 30 more: it tries again, on all 70
        assert again is not None and again["train_pairs"] + again["eval_pairs"] == 70
        assert len(registry.list_versions()) == 3
        assert restarted.last_tried is not None
        assert restarted.last_tried["cursor"] == int(again["data_cursor"]) > state["cursor"]
        settings.scheduler_state.unlink()  # without the memory, the same 70 pairs look new
        assert RewardRetraining(settings, store).new_pairs() == 70


def test_memory_of_another_database_is_ignored(tmp_path: Path) -> None:
    settings = UpSettings(home=tmp_path)
    settings.scheduler_state.write_text(
        json.dumps({"reward": {"database": "sqlite:///elsewhere.db", "cursor": 99}})
    )
    _store_pairs(settings.feedback_url, 0, 3)
    with FeedbackReader(settings.feedback_url) as store:
        scheduler = RewardRetraining(settings, store)
        assert scheduler.last_tried is None and scheduler.new_pairs() == 3


@pytest.mark.parametrize("method", ["dpo", "rejection-sampling", "rl", "grpo", "ppo"])
def test_every_policy_method_gets_a_training_command_it_accepts(
    method: str, tmp_path: Path
) -> None:
    """The budget and learning-rate flags ``plaudit up`` passes are settings of the method."""
    from plaudit.cli import TrainPolicySettings, build_parser
    from plaudit.services.common.settings import settings_from_args

    settings = UpSettings(home=tmp_path, policy_method=method, policy_budget=7)
    _store_pairs(settings.feedback_url, 0, 1)
    with FeedbackReader(settings.feedback_url) as store:
        args = PolicyRetraining(settings, store).training_args()
    cfg = settings_from_args(TrainPolicySettings, build_parser().parse_args(args)).policy_config()
    assert cfg.method == method
    budget = {"dpo": "max_steps", "rejection-sampling": "max_prompts"}.get(method, "steps")
    assert getattr(cfg, budget) == 7


# -- stopping -------------------------------------------------------------------------------------
@pytest.mark.parametrize("ignores_sigterm", [False, True])
def test_stop_child_terminates_then_kills(ignores_sigterm: bool) -> None:
    code = "import signal, sys, time\n"
    if ignores_sigterm:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(600)\n"

    async def scenario() -> tuple[int | None, float]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None
        assert await proc.stdout.readline() == b"ready\n"  # the SIGTERM disposition is set
        started = time.monotonic()
        await stop_child(proc, grace_s=1.0)
        return proc.returncode, time.monotonic() - started

    returncode, took = asyncio.run(scenario())
    if ignores_sigterm:
        assert returncode == -signal.SIGKILL and 1.0 <= took < 10
    else:
        assert returncode == -signal.SIGTERM and took < 1.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by a parent that is gone) counts as stopped
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


def test_sigterm_stops_a_running_training_and_exits_within_seconds(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Issue 15: SIGTERM stopped the services but ``plaudit up`` waited minutes for the training
    child. A training that would run for hours is stopped and ``up`` exits within seconds,
    leaving no half-published version (at most a hidden staging folder, which listing skips)."""
    ports = {name: free_port() for name in ("reward", "rm", "feedback", "fm")}
    home = tmp_path / "home"
    env = {**os.environ, "PLAUDIT_EARLY_STOPPING_PATIENCE": "0"}  # train every epoch
    proc = subprocess.Popen(
        [sys.executable, "-m", "plaudit.cli", "up", "--home", str(home), "--no-generation",
         "--bootstrap-checkpoint", str(tiny_checkpoint), "--train-backbone", str(tiny_checkpoint),
         "--train-epochs", "100000", "--retrain-min-pairs", "30", "--check-interval-s", "0.5",
         "--log-format", "text", "--log-level", "INFO",
         "--reward-port", str(ports["reward"]), "--reward-metrics-port", str(ports["rm"]),
         "--feedback-port", str(ports["feedback"]), "--feedback-metrics-port", str(ports["fm"]),
         "--feedback-http-port", "0", "--reward-http-port", "0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    started = threading.Event()
    pid: list[int] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            found = re.search(r"reward training started \(pid (\d+)\)", line)
            if found:
                pid.append(int(found.group(1)))
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until_serving(f"127.0.0.1:{ports['feedback']}", timeout=120)
        _store_pairs(f"sqlite:///{(home / 'feedback.db').resolve()}", 0, 40)
        assert started.wait(120), "".join(lines)
        time.sleep(3)  # well into the training
        assert _alive(pid[0]), "".join(lines)
        stop_sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - stop_sent
        reader.join(timeout=10)
        output = "".join(lines)
        assert proc.returncode == 0, output
        assert took < 20, f"plaudit up took {took:.1f}s to stop"
        assert not _alive(pid[0]), "the training child outlived plaudit up"
        assert "stopping reward training" in output
        registry = ModelRegistry(home / "registry", "reward")
        assert len(registry.list_versions()) == 1  # the bootstrap only: nothing half-published
        assert not list(Path(registry.versions_dir).glob(".staging-*"))
        assert not (home / "scheduler.json").exists()  # a stopped training was not "tried"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_unwinds_a_training_like_ctrl_c(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """``plaudit train`` turns SIGTERM into KeyboardInterrupt: ``finally`` blocks run (a publish
    under way removes its staging folder) and it exits 130, not killed by the signal."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in toy_pairs(40)))
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "plaudit.cli", "train", "reward", "--data", str(data),
         "--backbone", str(tiny_checkpoint), "--epochs", "100000",
         "--early-stopping-patience", "0", "--output-dir", str(run), "--no-progress",
         "--registry", str(tmp_path / "registry"), "--promote"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not run.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the training never started"
            time.sleep(0.2)
        time.sleep(2)
        assert proc.poll() is None, proc.communicate()
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 130, err
        assert time.monotonic() - sent < 10
        versions = tmp_path / "registry" / "reward" / "versions"
        assert not versions.exists() or not any(versions.iterdir())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_a_stale_staging_folder_or_manifestless_version_does_not_break_listing(
    tiny_registry: Path, tmp_path: Path
) -> None:
    """What a killed publisher can leave behind (a local staging folder, or on an object store
    files without their manifest) is invisible: listing, the scheduler's cursor and promotion
    read only complete versions."""
    root = tmp_path / "registry"
    shutil.copytree(tiny_registry, root)
    registry = ModelRegistry(root, "reward")
    versions = Path(registry.versions_dir)
    staging = versions / ".staging-killed"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"half a model")
    (versions / "v-half").mkdir()
    (versions / "v-half" / "model.onnx").write_bytes(b"no manifest")
    listed = registry.list_versions()
    assert [m.version for m in listed] == [registry.promoted()]
    settings = UpSettings(home=tmp_path)
    _store_pairs(settings.feedback_url, 0, 2)
    with FeedbackReader(settings.feedback_url) as store:
        assert RewardRetraining(settings, store).new_pairs() == 2


# -- the policy half -------------------------------------------------------------------------------
def test_up_retrains_gates_and_hot_swaps_the_policy_after_a_reward_promotion(
    tiny_registry: Path,
    tiny_policy_registry: Path,
    tiny_checkpoint: Path,
    tmp_path: Path,
) -> None:
    """Issue 15, done when: feedback arrives, the reward model is retrained and promoted, then
    the policy is retrained from the live one against the live reward model, gated, promoted
    and hot-swapped by the generation service, without a person; nothing runs twice."""
    home = tmp_path / "home"
    shutil.copytree(tiny_registry, home / "registry")
    shutil.copytree(tiny_policy_registry / "policy", home / "registry" / "policy")
    policies = ModelRegistry(home / "registry", "policy")
    live_policy = policies.promoted()
    assert live_policy is not None
    ports = {name: free_port() for name in ("reward", "rm", "feedback", "fm", "gen", "gm")}
    log = tmp_path / "up.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "plaudit.cli", "up", "--home", str(home),
         "--train-backbone", str(tiny_checkpoint), "--retrain-min-pairs", "150",
         "--check-interval-s", "0.5", "--log-format", "text",
         # the reward gate lets anything through; the policy gate keeps its rules, loosened
         "--promotion-tolerance", "1", "--promotion-significance", "1",
         "--policy-budget", "8", "--policy-max-new-tokens", "8", "--policy-eval-prompts", "24",
         "--policy-min-win-rate", "0", "--policy-min-lc-win-rate", "0",
         "--policy-max-kl", "1e9",
         "--reward-port", str(ports["reward"]), "--reward-metrics-port", str(ports["rm"]),
         "--feedback-port", str(ports["feedback"]), "--feedback-metrics-port", str(ports["fm"]),
         "--generation-port", str(ports["gen"]), "--generation-metrics-port", str(ports["gm"]),
         "--feedback-http-port", "0", "--reward-http-port", "0", "--generation-http-port", "0"],
        cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        generation_addr = f"127.0.0.1:{ports['gen']}"
        for port in ("feedback", "reward", "gen"):
            wait_until_serving(f"127.0.0.1:{ports[port]}", timeout=120)
        with GenerationClient(generation_addr) as generation:
            assert generation.generate("Hi", max_new_tokens=2).model_version == live_policy
            _submit(f"127.0.0.1:{ports['feedback']}", toy_pairs(160))
            deadline = time.monotonic() + 400
            while len(policies.list_versions()) < 2:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.5)
            trained = policies.list_versions()[-1]
            gate = trained.promotion
            assert gate is not None and gate["promoted"], (gate, log.read_text()[-3000:])
            rewards = ModelRegistry(home / "registry", "reward")
            assert (
                gate["reward_model"]
                == [rewards.promoted()]
                != [ModelRegistry(tiny_registry).promoted()]
            )
            assert trained.parent == live_policy and gate["baseline"] == f"parent {live_policy}"
            assert gate["kl_reference"] == f"live policy {live_policy}"
            assert gate["eval_prompts"] > 0 and gate["lc_win_rate"] is not None
            while generation.generate("Hi", max_new_tokens=2).model_version != trained.version:
                assert time.monotonic() < deadline, "the new policy never went live"
                time.sleep(0.2)
        memory: dict[str, Any] = {}
        while "policy" not in memory:  # serving may poll the registry before it is told
            assert time.monotonic() < deadline, "the scheduler never remembered the training"
            memory = json.loads((home / "scheduler.json").read_text())
            time.sleep(0.2)
        assert memory["policy"]["outcome"] == "promoted"
        assert memory["policy"]["reward_version"] == rewards.promoted()
        time.sleep(2)  # several more checks: nothing new, so no second training of either kind
        assert len(policies.list_versions()) == 2 and len(rewards.list_versions()) == 2
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        output = log.read_text()
        assert proc.returncode == 0, output[-3000:]
        assert "starting the policy training" in output
        assert "the generation service now serves" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _submit(address: str, pairs: list[dict[str, str]]) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        events = (
            feedback_pb2.SubmitBatchRequest(
                comparison=feedback_pb2.SubmitComparisonRequest(
                    prompt=p["prompt"], chosen=p["chosen"], rejected=p["rejected"],
                    annotator_id="tester", idempotency_key=f"p{i}",
                )
            )
            for i, p in enumerate(pairs)
        )  # fmt: skip
        assert stub.SubmitBatch(events, timeout=60).accepted == len(pairs)


# -- supervision -----------------------------------------------------------------------------------
def test_restart_delay_backs_off_and_caps() -> None:
    from plaudit.up import restart_delay

    assert [restart_delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_killed_reward_service_is_restarted_while_feedback_keeps_arriving(
    tiny_registry: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Issue 17 item 8: ``plaudit up`` stopped every service when one child exited. SIGKILL the
    reward service under load: feedback keeps being accepted (nothing acknowledged is lost),
    scoring is back within seconds, and ``up`` keeps running until SIGTERM (then exits 0)."""
    home = tmp_path / "home"
    shutil.copytree(tiny_registry, home / "registry")  # no bootstrap
    ports = {name: free_port() for name in ("reward", "rm", "feedback", "fm")}
    log = tmp_path / "up.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "plaudit.cli", "up", "--home", str(home), "--no-generation",
         "--train-backbone", str(tiny_checkpoint), "--retrain-min-pairs", "100000",
         "--check-interval-s", "0.5", "--log-format", "text", "--log-level", "INFO",
         "--reward-port", str(ports["reward"]), "--reward-metrics-port", str(ports["rm"]),
         "--feedback-port", str(ports["feedback"]), "--feedback-metrics-port", str(ports["fm"]),
         "--feedback-http-port", "0", "--reward-http-port", "0"],
        cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    reward_addr = f"127.0.0.1:{ports['reward']}"
    feedback_addr = f"127.0.0.1:{ports['feedback']}"
    acknowledged: dict[str, int] = {}
    submit_errors: list[str] = []
    scores: list[tuple[float, bool]] = []  # (monotonic time, succeeded)
    done = threading.Event()

    def submit() -> None:
        pairs = toy_pairs(400)
        with grpc.insecure_channel(feedback_addr) as channel:
            stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
            for i in range(100_000):
                if done.is_set():
                    return
                p = pairs[i % len(pairs)]
                key = f"sup{i}"
                try:
                    reply = stub.SubmitComparison(
                        feedback_pb2.SubmitComparisonRequest(
                            prompt=p["prompt"], chosen=p["chosen"] + f" ({i})",
                            rejected=p["rejected"], annotator_id="tester", idempotency_key=key,
                        ),
                        timeout=10,
                    )  # fmt: skip
                    acknowledged[key] = reply.feedback_id
                except grpc.RpcError as exc:
                    submit_errors.append(str(exc.code()))
                time.sleep(0.02)

    def score() -> None:
        with RewardClient(reward_addr) as reward:
            while not done.is_set():
                try:
                    reward.score(["How are you?"], ["Fine, thanks."], timeout=2)
                    scores.append((time.monotonic(), True))
                except Exception:
                    scores.append((time.monotonic(), False))
                    time.sleep(0.1)
                time.sleep(0.02)

    threads = [threading.Thread(target=submit), threading.Thread(target=score)]
    try:
        wait_until_serving(feedback_addr, timeout=120)
        wait_until_serving(reward_addr, timeout=120)
        deadline = time.monotonic() + 60
        while not (
            found := re.search(r"started the reward service \(pid (\d+)\)", log.read_text())
        ):
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        reward_pid = int(found.group(1))
        for thread in threads:
            thread.start()
        time.sleep(2)  # both under way
        assert scores and scores[-1][1], log.read_text()[-3000:]
        acked_before = len(acknowledged)
        assert acked_before > 0, submit_errors
        killed = time.monotonic()
        os.kill(reward_pid, signal.SIGKILL)
        while not any(ok and at > killed + 0.5 for at, ok in scores):
            assert time.monotonic() - killed < 15, f"scoring not back: {log.read_text()[-3000:]}"
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        back_after = min(at for at, ok in scores if ok and at > killed + 0.5) - killed
        time.sleep(1)  # feedback kept flowing through it all
        done.set()
        for thread in threads:
            thread.join(timeout=30)
        assert len(acknowledged) > acked_before + 10, (len(acknowledged), submit_errors)
        assert proc.poll() is None, "plaudit up stopped when the reward service died"
        output = log.read_text()
        assert f"the reward service (pid {reward_pid}) exited unexpectedly" in output, output
        assert "restarted the reward service" in output
        assert back_after < 10, back_after
        with FeedbackReader(f"sqlite:///{(home / 'feedback.db').resolve()}") as store:
            for key, feedback_id in acknowledged.items():
                stored = store.get(feedback_id)
                assert stored.event.idempotency_key == key
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert proc.returncode == 0, log.read_text()[-3000:]
    finally:
        done.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
