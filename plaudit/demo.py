"""``plaudit demo``: drive the closed loop the way its users would, both halves.

Connects to a running ``plaudit up`` (or starts one, with embedded defaults, when nothing answers
on the feedback and reward ports), then feeds the HH-RLHF preference pairs that ship with Plaudit
(``plaudit/data/hh-harmless``; ``--data`` takes any pairs file) through the feedback API in waves.

* Reward half: after each wave the scheduler in ``plaudit up`` retrains the reward model on
  everything stored and the gate decides (beat the live model on the same held-out pairs,
  significantly above chance); the reward service hot-swaps a promoted one.
* Policy half: after a promoted reward model, the scheduler retrains the policy from the live one
  against it, and the policy gate decides (win rate and length-controlled win rate against the
  live policy on the same held-out prompts, KL bound); the generation service hot-swaps it.

The demo shows each retraining and swap as it happens (candidate and live side by side with n,
why a refused candidate was refused, the versions serving, rewards of fixed probe pairs and a
completion of a fixed probe prompt) and ends with a summary table for each half.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import Field

from plaudit.services.common.preference_files import PreferencePair, read_pairs
from plaudit.services.common.process import CLI
from plaudit.services.common.registry import ModelManifest, ModelRegistry
from plaudit.services.common.security.client import ClientCredentials, ClientSecuritySettings
from plaudit.services.generation.client import GenerationClient
from plaudit.services.reward.client import RewardClient, wait_until_serving
from plaudit.v1 import feedback_pb2, feedback_pb2_grpc

# 1,800 HH-RLHF harmless pairs shipped with Plaudit (MIT, Anthropic; see data/hh-harmless/).
HH_PAIRS = Path(__file__).resolve().parent / "data" / "hh-harmless" / "pairs.jsonl"
PROBES = 3
GENERATION_START_TIMEOUT_S = 300.0


class DemoSettings(ClientSecuritySettings):
    """What to feed and where; ``api_key`` (roles submit_feedback, score) for secured services."""

    data: Path = Field(HH_PAIRS, description="HH-RLHF or prompt/chosen/rejected JSONL")
    home: Path = Field(Path(".plaudit"), description="plaudit up's folder (registry, database)")
    feedback_addr: str = Field("127.0.0.1:50052", description="feedback service address")
    reward_addr: str = Field("127.0.0.1:50051", description="reward service address")
    generation_addr: str = Field("127.0.0.1:50053", description="generation service address")
    policy: bool = Field(True, description="also show the policy half (retrain, gate, swap)")
    policy_budget: int = Field(
        8, ge=1, description="per policy training: DPO steps (prompts for rejection sampling)"
    )
    policy_eval_prompts: int = Field(
        48,
        ge=1,
        description="held-out prompts of the policy gate (48: a win rate carries about +/-0.07)",
    )
    policy_max_new_tokens: int = Field(40, ge=1, description="tokens per policy sample")
    policy_batch_size: int = Field(8, ge=1, description="preference pairs per DPO step")
    policy_max_length: int = Field(
        128,
        ge=16,
        description="tokens per policy training sequence (prompt: its last half; the preference "
        "shows in how a response starts): 8 pairs of 128 cost what 4 of 256 do and move the "
        "policy further (docs/benchmarks.md)",
    )
    policy_learning_rate: float = Field(
        5e-5,
        ge=0,
        description="DPO peak rate: 5x plaudit up's, so that 8 steps move the policy measurably",
    )
    train_max_steps: int = Field(
        50,
        ge=0,
        description="optimizer steps per reward training (0: one epoch; 50 keeps the demo "
        "within 15 minutes on 2 cores)",
    )
    train_max_length: int = Field(
        256,
        ge=8,
        description="tokens per item in a reward training (the end is kept: the responses; 86%% "
        "of the shipped HH items fit)",
    )
    waves: int = Field(
        1,
        ge=1,
        description="waves of feedback, each followed by a reward retraining (about 5 minutes "
        "on 2 cores); 1 fits both halves in 15 minutes",
    )
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


def _serving(address: str, credentials: ClientCredentials, timeout: float) -> bool:
    """Whether ``address`` answers SERVING within ``timeout`` seconds."""
    try:
        wait_until_serving(address, timeout=timeout, credentials=credentials)
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
    ece: float | None = None  # the candidate's calibrated ECE on the same held-out pairs
    live_ece: float | None = None  # the live model's, at its own temperature

    @classmethod
    def from_manifest(
        cls, wave: int, stored: int, manifest: ModelManifest, probe_prob: float, seconds: float
    ) -> WaveRow:
        gate = manifest.promotion or {}
        accuracy = gate.get("candidate_accuracy", manifest.metrics.get("eval/accuracy"))
        n = gate.get("eval_pairs", manifest.metrics.get("eval/pairs"))
        calibrated = manifest.calibration.ece_after if manifest.calibration else None
        return cls(
            wave, stored, manifest.version, accuracy, gate.get("current_accuracy"),
            None if n is None else int(n), bool(gate.get("promoted")),
            str(gate.get("reason") or "no gate decision"), probe_prob, seconds,
            gate.get("candidate_ece", calibrated), gate.get("current_ece"),
        )  # fmt: skip

    @property
    def verdict(self) -> str:
        return "promoted" if self.promoted else "refused"


@dataclass
class PolicyRow:
    """One policy training the demo saw: the gate's figures, candidate against live."""

    after_wave: int
    version: str
    win_rate: float | None
    lc_win_rate: float | None
    kl: float | None
    candidate_reward: float | None
    live_reward: float | None
    n: int | None
    promoted: bool
    reason: str
    seconds: float

    @classmethod
    def from_manifest(cls, wave: int, manifest: ModelManifest, seconds: float) -> PolicyRow:
        gate = manifest.promotion or {}
        n = gate.get("eval_prompts")
        return cls(
            wave, manifest.version, gate.get("win_rate"), gate.get("lc_win_rate"),
            gate.get("kl"), gate.get("candidate_reward"), gate.get("baseline_reward"),
            None if n is None else int(n), bool(gate.get("promoted")),
            str(gate.get("reason") or "no gate decision"), seconds,
        )  # fmt: skip


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
        f"{'gate':>8} {'ECE':>6} {'live':>6} {'probe P':>8} {'time s':>7}"
    ]
    for r in rows:
        n = "n/a" if r.n is None else str(r.n)
        lines.append(
            f"{r.wave:>4} {r.stored:>6} {r.version:<32} {_fraction(r.accuracy):>9} "
            f"{_fraction(r.live_accuracy):>6} {n:>5} {r.verdict:>8} {_fraction(r.ece):>6} "
            f"{_fraction(r.live_ece):>6} {r.probe_prob:>8.3f} {r.seconds:>7.0f}"
        )
    lines += [f"wave {r.wave} refused: {r.reason}" for r in rows if not r.promoted]
    return lines


def policy_summary_lines(rows: list[PolicyRow]) -> list[str]:
    """The policy half's table (candidate against the live policy on the same held-out prompts,
    judged by the live reward model), then why each refused candidate was refused."""
    lines = [
        f"{'wave':>4} {'version':<32} {'win':>6} {'LC win':>6} {'KL':>6} {'reward':>7} "
        f"{'live':>7} {'n':>4} {'gate':>8} {'time s':>7}"
    ]
    for r in rows:
        n = "n/a" if r.n is None else str(r.n)
        kl = "n/a" if r.kl is None else f"{r.kl:.2f}"
        lines.append(
            f"{r.after_wave:>4} {r.version:<32} {_fraction(r.win_rate):>6} "
            f"{_fraction(r.lc_win_rate):>6} {kl:>6} {_signed(r.candidate_reward):>7} "
            f"{_signed(r.live_reward):>7} {n:>4} {'promoted' if r.promoted else 'refused':>8} "
            f"{r.seconds:>7.0f}"
        )
    lines += [f"policy {r.version} refused: {r.reason}" for r in rows if not r.promoted]
    return lines


def _signed(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.3f}"


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
    """The next version the scheduler publishes to ``registry`` (promoted or refused)."""
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
    raise TimeoutError(f"no new {registry.kind} version within {timeout:.0f}s")


PROBE_PROMPT = "How can I keep my neighbour's dog out of my garden?"


def _completion(client: GenerationClient) -> tuple[str, str]:
    """A seeded completion of the probe prompt under the serving policy (one line, cut at 110
    characters), and the policy's version."""
    reply = client.generate(PROBE_PROMPT, max_new_tokens=48, seed=0, temperature=0.7)
    text = " ".join(reply.completions[0].text.split())
    return (text[:110] + "...") if len(text) > 110 else text, reply.model_version


def _policy_failure(state: Path, since: float) -> str | None:
    """The error of a policy training the scheduler tried after ``since`` and saw fail."""
    try:
        tried = json.loads(state.read_text()).get("policy") or {}
    except (OSError, ValueError, AttributeError):
        return None
    at = tried.get("at")
    if tried.get("outcome") != "failed" or not at:
        return None
    return str(tried.get("error")) if datetime.fromisoformat(at).timestamp() >= since else None


def _up_command(settings: DemoSettings, wave_size: int) -> list[str]:
    """``plaudit up`` as the demo starts it: retrain once nine tenths of a wave are stored (the
    rest is what the feedback service may refuse), look every 3 s."""
    command = [
        *CLI, "up", "--home", str(settings.home),
        "--retrain-min-pairs", str(max(1, wave_size * 9 // 10)),
        "--check-interval-s", "3", "--log-format", "text",
        # the demo's four-minute policy step is the measured 8-step DPO recipe (docs/benchmarks.md
        # "The demo's policy step"); `plaudit up` itself defaults to rejection sampling
        "--policy-method", "dpo",
        "--policy-budget", str(settings.policy_budget),
        "--policy-eval-prompts", str(settings.policy_eval_prompts),
        "--policy-max-new-tokens", str(settings.policy_max_new_tokens),
        "--policy-max-length", str(settings.policy_max_length),
        "--policy-batch-size", str(settings.policy_batch_size),
        "--policy-learning-rate", str(settings.policy_learning_rate),
        "--train-max-length", str(settings.train_max_length),
    ]  # fmt: skip
    if settings.train_max_steps:
        command += ["--train-max-steps", str(settings.train_max_steps)]
    return command + ([] if settings.policy else ["--no-generation"])


def run_demo(settings: DemoSettings) -> int:
    probes, pool = load_pairs(settings.data)
    _say(f"{len(pool) + len(probes)} preference pairs from {settings.data}")
    wave_size = settings.wave_size or -(-len(pool) // settings.waves)
    up: subprocess.Popen[bytes] | None = None
    credentials = settings.credentials
    if not (
        _serving(settings.feedback_addr, credentials, 2)
        and _serving(settings.reward_addr, credentials, 2)
    ):
        if not settings.start:
            _say(f"nothing serves at {settings.feedback_addr} / {settings.reward_addr}")
            return 1
        half = "feedback + reward" + (" + generation" if settings.policy else "")
        _say(f"[1/3] starting `plaudit up` ({half} services, SQLite, local registry)")
        up = subprocess.Popen(_up_command(settings, wave_size))
    try:
        # a `plaudit up` started here brings generation up last; one already running has it or not
        generation_wait_s = GENERATION_START_TIMEOUT_S if up is not None else 2.0
        return _drive(settings, probes, pool, wave_size, generation_wait_s)
    finally:
        if up is not None:
            _say("stopping `plaudit up` (SIGTERM: services drain and exit)")
            up.terminate()
            up.wait(timeout=120)


def _drive(
    settings: DemoSettings,
    probes: list[PreferencePair],
    pool: list[PreferencePair],
    size: int,
    generation_wait_s: float,
) -> int:
    credentials = settings.credentials
    for address in (settings.feedback_addr, settings.reward_addr):
        wait_until_serving(address, timeout=900, credentials=credentials)
    # a bootstrap that failed leaves generation down: the demo goes on without the policy half
    policy = settings.policy and _serving(settings.generation_addr, credentials, generation_wait_s)
    if settings.policy and not policy:
        _say(f"no generation service at {settings.generation_addr}: the policy half is skipped")
    rewards = ModelRegistry(settings.home / "registry", "reward")
    policies = ModelRegistry(settings.home / "registry", "policy")
    rows: list[WaveRow] = []
    policy_rows: list[PolicyRow] = []
    with contextlib.ExitStack() as stack:
        channel = stack.enter_context(credentials.channel(settings.feedback_addr))
        reward = stack.enter_context(RewardClient(settings.reward_addr, credentials))
        generation = (
            stack.enter_context(GenerationClient(settings.generation_addr, credentials))
            if policy
            else None
        )
        feedback = feedback_pb2_grpc.FeedbackServiceStub(channel)
        probs, version = _probe(reward, probes)
        _say(f"[2/3] serving {version}; probe pairs P(chosen preferred): "
             + " ".join(f"{p:.3f}" for p in probs))  # fmt: skip
        if generation is not None:
            text, served = _completion(generation)
            _say(f"      serving policy {served}; probe prompt: {PROBE_PROMPT!r}")
            _say(f"      -> {text}")
        stored = 0
        for wave in range(settings.waves):
            batch = pool[wave * size : (wave + 1) * size]
            if not batch:
                break
            started = time.monotonic()
            known = len(rewards.list_versions())
            known_policies = len(policies.list_versions())
            accepted, refused = _submit_wave(feedback, batch, wave * size)
            stored += accepted
            _say(
                f"[wave {wave + 1}/{settings.waves}] {accepted} comparisons stored "
                f"({refused} refused), {stored} in all; waiting for the reward retraining ..."
            )
            manifest = _wait_for_new_version(rewards, known, settings.wave_timeout_s)
            row = WaveRow.from_manifest(wave + 1, stored, manifest, 0.0, 0.0)
            if row.promoted:  # the scheduler notifies the reward service; wait for the swap
                _wait_until_live(lambda: reward.model().version, manifest.version)
            probs, version = _probe(reward, probes)
            row.probe_prob = sum(probs) / len(probs)
            row.seconds = time.monotonic() - started
            rows.append(row)
            verdict = "promoted, now serving" if row.promoted else "refused by the gate"
            _say(f"      reward {manifest.version}: {verdict}: {row.reason}")
            _say(
                f"      serving {version}; probe P(chosen): " + " ".join(f"{p:.3f}" for p in probs)
            )
            if generation is not None and row.promoted:
                policy_row = _policy_round(settings, policies, known_policies, generation, wave)
                if policy_row is not None:
                    policy_rows.append(policy_row)
    _say("[3/3] summary")
    _say(
        "reward model: candidate vs live held-out accuracy on the same n pairs, and each one's "
        "calibrated expected calibration error (ECE) on them"
    )
    for line in summary_lines(rows):
        _say(line)
    if policy:
        _say("")
        _say("policy: candidate vs live policy on the same n held-out prompts, judged by the "
             "live reward model (win rate, length-controlled win rate, KL to the live policy, "
             "mean rewards)")  # fmt: skip
        for line in policy_summary_lines(policy_rows) if policy_rows else ["no policy training"]:
            _say(line)
    return 0


def _wait_until_live(serving: Callable[[], str], version: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while serving() != version:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{version} never went live")
        time.sleep(0.5)


def _policy_round(
    settings: DemoSettings,
    policies: ModelRegistry,
    known: int,
    generation: GenerationClient,
    wave: int,
) -> PolicyRow | None:
    """Wait for the policy training a promoted reward model starts, and its swap."""
    _say("      the policy retrains from the live one; the new reward model judges it ...")
    started = time.monotonic()
    since = time.time() - 60
    deadline = started + settings.wave_timeout_s
    while len(policies.list_versions()) <= known:
        failure = _policy_failure(settings.home / "scheduler.json", since)
        if failure:
            _say(f"      the policy training failed: {failure[-300:]}")
            return None
        if time.monotonic() > deadline:
            raise TimeoutError(f"no new policy within {settings.wave_timeout_s:.0f}s")
        time.sleep(2)
    manifest = policies.list_versions()[-1]
    row = PolicyRow.from_manifest(wave + 1, manifest, 0.0)
    if row.promoted:
        _wait_until_live(lambda: _completion(generation)[1], manifest.version)
    row.seconds = time.monotonic() - started
    verdict = "promoted, now serving" if row.promoted else "refused by the gate"
    _say(f"      policy {manifest.version}: {verdict}: {row.reason}")
    text, served = _completion(generation)
    _say(f"      serving policy {served}; probe prompt -> {text}")
    return row
