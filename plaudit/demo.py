"""``plaudit demo``: drive the closed loop the way its users would.

Connects to a running ``plaudit up`` (or starts one, with embedded defaults, when nothing answers
on the feedback and reward ports), then feeds the shared HH-RLHF preference pairs through the
feedback API in waves. After each wave the scheduler in ``plaudit up`` retrains the reward model
on everything stored and promotes it through the accuracy gate; the demo shows each retraining
and each swap as it happens -- the version serving, its held-out accuracy, and how the rewards of
a few fixed probe pairs change -- and ends with a summary table.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from plaudit.services.common.preference_files import PreferencePair, read_pairs
from plaudit.services.common.process import CLI
from plaudit.services.common.registry import ModelManifest, ModelRegistry
from plaudit.services.common.security.client import ClientCredentials, ClientSecuritySettings
from plaudit.services.reward.client import RewardClient, wait_until_serving
from plaudit.v1 import feedback_pb2, feedback_pb2_grpc

# 1,800 HH-RLHF harmless pairs shipped with Plaudit (MIT, Anthropic; see data/hh-harmless/).
HH_PAIRS = Path(__file__).resolve().parent / "data" / "hh-harmless" / "pairs.jsonl"
PROBES = 3


class DemoSettings(ClientSecuritySettings):
    """What to feed and where; ``api_key`` (roles submit_feedback, score) for secured services."""

    data: Path = Field(HH_PAIRS, description="HH-RLHF or prompt/chosen/rejected JSONL")
    home: Path = Field(Path(".plaudit"), description="plaudit up's folder (registry, database)")
    feedback_addr: str = Field("127.0.0.1:50052", description="feedback service address")
    reward_addr: str = Field("127.0.0.1:50051", description="reward service address")
    waves: int = Field(3, ge=1, description="waves of feedback")
    wave_size: int = Field(400, ge=1, description="preference pairs per wave")
    start: bool = Field(True, description="start `plaudit up` when nothing answers")
    wave_timeout_s: float = Field(1800, gt=0, description="longest wait for a retraining")


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _serving(address: str, credentials: ClientCredentials) -> bool:
    try:
        wait_until_serving(address, timeout=2, credentials=credentials)
    except TimeoutError:
        return False
    return True


@dataclass
class WaveRow:
    wave: int
    stored: int
    version: str
    accuracy: float | None
    promoted: bool
    probe_prob: float
    seconds: float


def _probe(client: RewardClient, probes: list[PreferencePair]) -> tuple[list[float], str]:
    """P(chosen preferred) for each probe pair under the serving model, and its version."""
    probs, version = [], ""
    for pair in probes:
        reply = client.compare(pair.prompt, pair.chosen, pair.rejected)
        probs.append(reply.prob_a_preferred)
        version = reply.model_version
    return probs, version


def _submit_wave(stub: Any, pairs: list[PreferencePair], offset: int) -> tuple[int, int]:
    def events() -> Any:
        for i, pair in enumerate(pairs):
            yield feedback_pb2.SubmitBatchRequest(
                comparison=feedback_pb2.SubmitComparisonRequest(
                    prompt=pair.prompt, chosen=pair.chosen, rejected=pair.rejected,
                    annotator_id="hh-rlhf", idempotency_key=f"demo-hh-{offset + i}",
                    metadata={"source": "plaudit demo"},
                )
            )  # fmt: skip

    reply = stub.SubmitBatch(events(), timeout=300)
    return reply.accepted, reply.rejected


def _wait_for_new_version(registry: ModelRegistry, known: int, timeout: float) -> ModelManifest:
    """The next version the scheduler publishes (promoted or refused by the gate)."""
    deadline = time.monotonic() + timeout
    last_note = time.monotonic()
    while time.monotonic() < deadline:
        versions = registry.list_versions()
        if len(versions) > known:
            return versions[-1]
        if time.monotonic() - last_note > 30:
            _say("      ... still training (plaudit up's log shows progress)")
            last_note = time.monotonic()
        time.sleep(2)
    raise TimeoutError(f"no new reward model within {timeout:.0f}s")


def run_demo(settings: DemoSettings) -> int:
    pairs = [p for p in read_pairs(settings.data) if p.chosen.strip() and p.rejected.strip()]
    probes, pool = pairs[-PROBES:], pairs[:-PROBES]
    up: subprocess.Popen[bytes] | None = None
    credentials = settings.credentials
    if not (
        _serving(settings.feedback_addr, credentials)
        and _serving(settings.reward_addr, credentials)
    ):
        if not settings.start:
            _say(f"nothing serves at {settings.feedback_addr} / {settings.reward_addr}")
            return 1
        _say("[1/3] starting `plaudit up` (feedback + reward services, SQLite, local registry)")
        up = subprocess.Popen(
            [*CLI, "up", "--home", str(settings.home), "--no-generation",
             "--retrain-min-pairs", str(max(1, settings.wave_size // 2)),
             "--check-interval-s", "3", "--log-format", "text"],
        )  # fmt: skip
    try:
        for address in (settings.feedback_addr, settings.reward_addr):
            wait_until_serving(address, timeout=900, credentials=credentials)
        registry = ModelRegistry(settings.home / "registry", "reward")
        rows: list[WaveRow] = []
        with (
            credentials.channel(settings.feedback_addr) as channel,
            RewardClient(settings.reward_addr, credentials) as reward,
        ):
            feedback = feedback_pb2_grpc.FeedbackServiceStub(channel)
            probs, version = _probe(reward, probes)
            _say(f"[2/3] serving {version}; probe pairs P(chosen preferred): "
                 + " ".join(f"{p:.3f}" for p in probs))  # fmt: skip
            stored = 0
            for wave in range(settings.waves):
                batch = pool[wave * settings.wave_size : (wave + 1) * settings.wave_size]
                if not batch:
                    break
                started = time.monotonic()
                known = len(registry.list_versions())
                accepted, rejected = _submit_wave(feedback, batch, wave * settings.wave_size)
                stored += accepted
                _say(
                    f"[wave {wave + 1}/{settings.waves}] {accepted} comparisons stored "
                    f"({rejected} refused), {stored} in all; waiting for the retraining ..."
                )
                manifest = _wait_for_new_version(registry, known, settings.wave_timeout_s)
                promoted = bool((manifest.promotion or {}).get("promoted"))
                if promoted:  # the scheduler notifies the reward service; wait for the swap
                    deadline = time.monotonic() + 120
                    while reward.model().version != manifest.version:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"{manifest.version} never went live")
                        time.sleep(0.5)
                probs, version = _probe(reward, probes)
                accuracy = manifest.metrics.get("eval/accuracy")
                mean_prob = sum(probs) / len(probs)
                elapsed = time.monotonic() - started
                rows.append(
                    WaveRow(
                        wave + 1, stored, manifest.version, accuracy, promoted, mean_prob, elapsed
                    )
                )
                verdict = "promoted, now serving" if promoted else "refused by the gate"
                shown = "n/a" if accuracy is None else f"{accuracy:.3f}"
                probe_text = " ".join(f"{p:.3f}" for p in probs)
                _say(
                    f"      {manifest.version}: held-out accuracy {shown}, {verdict}; "
                    f"serving {version}; probe P(chosen): {probe_text}"
                )
        _say("[3/3] summary")
        _say(f"{'wave':>4} {'pairs':>6} {'version':<32} {'accuracy':>8} {'promoted':>8} "
             f"{'probe P':>8} {'time s':>7}")  # fmt: skip
        for r in rows:
            acc = "n/a" if r.accuracy is None or math.isnan(r.accuracy) else f"{r.accuracy:.3f}"
            _say(f"{r.wave:>4} {r.stored:>6} {r.version:<32} {acc:>8} {r.promoted!s:>8} "
                 f"{r.probe_prob:>8.3f} {r.seconds:>7.0f}")  # fmt: skip
        return 0
    finally:
        if up is not None:
            _say("stopping `plaudit up` (SIGTERM: services drain and exit)")
            up.terminate()
            up.wait(timeout=120)
