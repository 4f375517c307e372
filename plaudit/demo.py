"""``plaudit demo``: drive the closed loop the way its users would.

Connects to a running ``plaudit up`` (or starts one, with embedded defaults, when nothing answers
on the feedback and reward ports), then feeds the HH-RLHF preference pairs that ship with Plaudit
(``plaudit/data/hh-harmless``; ``--data`` takes any pairs file) through the feedback API in waves.
After each wave the scheduler in ``plaudit up`` retrains the reward model on everything stored
and the gate decides (beat the live model on the same held-out pairs, significantly above
chance); the demo shows each retraining and each swap as it happens -- candidate and live
held-out accuracy side by side with n, why a refused candidate was refused, the version serving,
and how the rewards of a few fixed probe pairs change -- and ends with a summary table.
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
    wave_size: int = Field(
        0,
        ge=0,
        description="preference pairs per wave; 0 = all the pairs, split evenly over the waves",
    )
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
    accuracy: float | None  # the candidate's held-out accuracy (the gate's measurement)
    live_accuracy: float | None  # the live model's, on the same held-out pairs
    n: int | None  # held-out pairs
    promoted: bool
    reason: str  # the gate's reason, rounded figures
    probe_prob: float
    seconds: float

    @classmethod
    def from_manifest(
        cls, wave: int, stored: int, manifest: ModelManifest, probe_prob: float, seconds: float
    ) -> WaveRow:
        gate = manifest.promotion or {}
        accuracy = gate.get("candidate_accuracy", manifest.metrics.get("eval/accuracy"))
        n = gate.get("eval_pairs", manifest.metrics.get("eval/pairs"))
        return cls(
            wave, stored, manifest.version, accuracy, gate.get("current_accuracy"),
            None if n is None else int(n), bool(gate.get("promoted")),
            str(gate.get("reason") or "no gate decision"), probe_prob, seconds,
        )  # fmt: skip

    @property
    def verdict(self) -> str:
        return "promoted" if self.promoted else "refused"


def _fraction(value: float | None) -> str:
    """0.631, or n/a: never 0.4594594594594595."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def load_pairs(path: Path) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """The demo's data: (probe pairs, the pool the waves are cut from); pairs with an empty side
    are left out. The default file ships inside the package, so a fresh clone has it."""
    pairs = [p for p in read_pairs(path) if p.chosen.strip() and p.rejected.strip()]
    if len(pairs) <= PROBES:
        raise ValueError(f"{path}: {len(pairs)} usable pairs, the demo needs more than {PROBES}")
    return pairs[-PROBES:], pairs[:-PROBES]


def summary_lines(rows: list[WaveRow]) -> list[str]:
    """The summary table, then one line per refused candidate saying why."""
    lines = [
        f"{'wave':>4} {'pairs':>6} {'version':<32} {'candidate':>9} {'live':>6} {'n':>5} "
        f"{'gate':>8} {'probe P':>8} {'time s':>7}"
    ]
    for r in rows:
        n = "n/a" if r.n is None else str(r.n)
        lines.append(
            f"{r.wave:>4} {r.stored:>6} {r.version:<32} {_fraction(r.accuracy):>9} "
            f"{_fraction(r.live_accuracy):>6} {n:>5} {r.verdict:>8} {r.probe_prob:>8.3f} "
            f"{r.seconds:>7.0f}"
        )
    lines += [f"wave {r.wave} refused: {r.reason}" for r in rows if not r.promoted]
    return lines


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
    probes, pool = load_pairs(settings.data)
    _say(f"{len(pool) + len(probes)} preference pairs from {settings.data}")
    wave_size = settings.wave_size or -(-len(pool) // settings.waves)
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
             "--retrain-min-pairs", str(max(1, wave_size // 2)),
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
                batch = pool[wave * wave_size : (wave + 1) * wave_size]
                if not batch:
                    break
                started = time.monotonic()
                known = len(registry.list_versions())
                accepted, rejected = _submit_wave(feedback, batch, wave * wave_size)
                stored += accepted
                _say(
                    f"[wave {wave + 1}/{settings.waves}] {accepted} comparisons stored "
                    f"({rejected} refused), {stored} in all; waiting for the retraining ..."
                )
                manifest = _wait_for_new_version(registry, known, settings.wave_timeout_s)
                row = WaveRow.from_manifest(wave + 1, stored, manifest, 0.0, 0.0)
                if row.promoted:  # the scheduler notifies the reward service; wait for the swap
                    deadline = time.monotonic() + 120
                    while reward.model().version != manifest.version:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"{manifest.version} never went live")
                        time.sleep(0.5)
                probs, version = _probe(reward, probes)
                row.probe_prob = sum(probs) / len(probs)
                row.seconds = time.monotonic() - started
                rows.append(row)
                verdict = "promoted, now serving" if row.promoted else "refused by the gate"
                probe_text = " ".join(f"{p:.3f}" for p in probs)
                _say(f"      {manifest.version}: {verdict}: {row.reason}")
                _say(f"      serving {version}; probe P(chosen): {probe_text}")
        _say("[3/3] summary: reward model candidate vs live held-out accuracy, n pairs")
        for line in summary_lines(rows):
            _say(line)
        return 0
    finally:
        if up is not None:
            _say("stopping `plaudit up` (SIGTERM: services drain and exit)")
            up.terminate()
            up.wait(timeout=120)
