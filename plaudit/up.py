"""``plaudit up``: the whole loop on one machine with embedded defaults.

Starts the feedback, reward and (when a policy is promoted or can be bootstrapped) generation
services as child processes on their default ports, with SQLite and a local registry under
``--home``, and runs the retraining scheduler, for both halves of the loop, one training at a
time, each in its own process (the trainer needs torch; this process does not):

* reward model: when at least ``--retrain-min-pairs`` new preference pairs have arrived after
  both the promoted reward model's data cursor and the last training's (checked every
  ``--check-interval-s``), ``plaudit train reward --promote`` on everything stored;
* policy: after a reward model trained on feedback is promoted (and ``--policy-min-pairs`` new
  pairs have arrived since the last policy training), ``plaudit train policy --base live
  --promote`` against the live reward model, with ``--policy-method`` and ``--policy-budget``.

A promoted version is hot-swapped by the service that serves it (the scheduler notifies it). A
candidate the gate refuses is published but not promoted: a reward model must beat the live one
on the same held-out pairs and be significantly above chance; a policy must beat the live policy
on the same held-out prompts, judged by the live reward model, in plain and length-controlled win
rate, within ``--policy-max-kl`` of it.

The scheduler remembers what it last tried (``<home>/scheduler.json``: the data cursor it trained
up to and the outcome), so a refused or failed training is not repeated on the same data: the next
one waits for ``--retrain-min-pairs`` more pairs after that cursor, across restarts too.
A service child that exits unexpectedly (a crash, an OOM kill) is restarted with the same
arguments and ports after a backoff (1, 2, 4 ... 30 s; back to 1 s once it has served a minute)
while the others keep serving (:func:`supervise`); only SIGTERM/SIGINT stop ``plaudit up``.
SIGTERM/SIGINT stop a running training child (SIGTERM, then SIGKILL after a few seconds) before
the services; the registry publishes through a hidden staging folder renamed into place, so a
killed child leaves no half-published version.

On the first start with an empty registry a reward model is bootstrapped (the MiniLM backbone
with a fresh scalar head), so scoring works from the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import Field

from plaudit.services.common.admin import notify_reload
from plaudit.services.common.process import CLI, ServiceProcess, start_service
from plaudit.services.common.registry import ModelKind, ModelRegistry
from plaudit.services.common.security.client import ClientSecuritySettings
from plaudit.services.common.server import wait_for_termination
from plaudit.services.feedback.export import FeedbackReader
from plaudit.services.reward.client import wait_until_serving
from plaudit.trainer.policy_config import CONFIGS as POLICY_CONFIGS
from plaudit.trainer.policy_config import (  # pydantic models: no torch import
    DEFAULT_MAX_KL,
    DEFAULT_MIN_LC_WIN_RATE,
    DEFAULT_MIN_WIN_RATE,
    PolicyMethod,
)

log = logging.getLogger(__name__)


def print_status(settings: UpSettings) -> None:
    """The ``plaudit status`` screen of what this process started, on stdout."""
    from plaudit.status import print_status as show  # plaudit.status imports this module

    show(settings)


class UpSettings(ClientSecuritySettings):
    home: Path = Field(Path(".plaudit"), description="folder for the database, registry and runs")
    database_url: str = Field("", description="feedback database (default: SQLite under home)")
    reward_port: int = Field(50051, ge=0, le=65535, description="reward service gRPC port")
    reward_metrics_port: int = Field(9091, ge=0, le=65535, description="reward /metrics port")
    reward_http_port: int = Field(
        8081, ge=0, le=65535, description="reward HTTP JSON port (0 picks a free port)"
    )
    feedback_port: int = Field(50052, ge=0, le=65535, description="feedback service gRPC port")
    feedback_metrics_port: int = Field(9092, ge=0, le=65535, description="feedback /metrics")
    feedback_http_port: int = Field(
        8080, ge=0, le=65535, description="labelling page and JSON API (0 picks a free port)"
    )
    generation: bool = Field(
        True, description="also serve the policy (needs a promoted policy or a bootstrap)"
    )
    generation_port: int = Field(50053, ge=0, le=65535, description="generation gRPC port")
    generation_metrics_port: int = Field(9093, ge=0, le=65535, description="generation /metrics")
    generation_http_port: int = Field(
        8082, ge=0, le=65535, description="generation OpenAI-style HTTP API (0 picks a free port)"
    )
    bootstrap_checkpoint: str = Field("minilm", description="reward backbone for an empty registry")
    bootstrap_policy: str = Field("smollm2", description="policy for an empty registry")
    retrain_min_pairs: int = Field(
        200, ge=1, description="new preference pairs that trigger a reward-model retraining"
    )
    check_interval_s: float = Field(10.0, gt=0, description="how often the scheduler looks")
    train_backbone: str = Field("minilm", description="backbone each retraining starts from")
    train_epochs: int = Field(1, ge=1, description="epochs per retraining")
    train_max_steps: int = Field(0, ge=0, description="optimizer steps per retraining (0: all)")
    train_max_length: int = Field(
        512, ge=8, description="tokens per item in a retraining (truncation keeps the end)"
    )
    promotion_tolerance: float = Field(
        0.0, ge=0, le=1, description="held-out accuracy a retrained model may lose to the live one"
    )
    promotion_significance: float = Field(
        0.05, gt=0, le=1, description="gate floor: one-sided binomial level against accuracy 0.5"
    )
    promotion_max_ece: float | None = Field(
        None, ge=0, le=1, description="gate: highest calibrated held-out ECE a retrained model "
        "may have (unset: not gated)",
    )  # fmt: skip
    policy_retrain: bool = Field(
        True, description="retrain the policy after a reward model is promoted (needs generation)"
    )
    policy_method: PolicyMethod = Field(
        "rejection-sampling",
        description="policy training method: rejection sampling improved the policy most at "
        "equal length under both judges for the same training time (the method race, "
        "bench/bench_policy_methods.py, docs/benchmarks.md)",
    )
    policy_min_pairs: int = Field(
        1, ge=0, description="new preference pairs since the last policy training it also needs"
    )
    policy_learning_rate: float = Field(
        1e-5, ge=0, description="policy peak learning rate (rejection sampling: its fine-tuning)"
    )
    policy_budget: int = Field(
        50,
        ge=0,
        description="per policy training: prompts sampled (rejection-sampling), optimizer steps "
        "(rl, dpo), rollout batches (grpo, ppo); 0: the method's default",
    )
    policy_max_new_tokens: int = Field(64, ge=1, description="tokens per policy sample")
    policy_batch_size: int = Field(
        4,
        ge=1,
        description="policy training micro-batch, one per optimizer step: sequences "
        "(dpo: preference pairs)",
    )
    policy_max_length: int = Field(
        512,
        ge=16,
        description="prompt + completion tokens per training sequence (the prompt keeps its "
        "last half); shorter sequences make each policy step cheaper",
    )
    policy_eval_prompts: int = Field(64, ge=1, description="held-out prompts the policy gate uses")
    policy_min_win_rate: float = Field(
        DEFAULT_MIN_WIN_RATE,
        ge=0,
        le=1,
        description="policy gate: win rate vs the live policy",
    )
    policy_min_lc_win_rate: float = Field(
        DEFAULT_MIN_LC_WIN_RATE, ge=0, le=1, description="policy gate: length-controlled win rate"
    )
    policy_max_kl: float = Field(
        DEFAULT_MAX_KL, gt=0, description="policy gate: KL to the live policy, nats per sequence"
    )
    auth_disabled: bool = Field(
        True,
        description="run the services (on 127.0.0.1) without authentication; with "
        "--no-auth-disabled they read PLAUDIT_API_KEYS(_FILE) and this process calls them "
        "with PLAUDIT_API_KEY (roles score, admin)",
    )

    @property
    def registry(self) -> Path:
        return self.home / "registry"

    @property
    def feedback_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'feedback.db').resolve()}"

    @property
    def reward_address(self) -> str:
        return f"127.0.0.1:{self.reward_port}"

    @property
    def generation_address(self) -> str:
        return f"127.0.0.1:{self.generation_port}"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def scheduler_state(self) -> Path:
        return self.home / "scheduler.json"


STOP_GRACE_S = 5.0  # a training child gets this long after SIGTERM before SIGKILL


async def stop_child(proc: asyncio.subprocess.Process, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM ``proc``, wait up to ``grace_s``, then SIGKILL; returns once it has exited."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def run_cli(args: list[str], what: str) -> dict[str, Any]:
    """Run a ``plaudit`` command in a child process; its last stdout line is a JSON summary.

    Cancelling the call stops the child (:func:`stop_child`) before the cancellation goes on,
    so no child outlives the caller's wish to stop. A failing child raises RuntimeError.
    """
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    log.info("%s started (pid %d)", what, proc.pid)
    try:
        out, err = await proc.communicate()
    except asyncio.CancelledError:
        log.warning("stopping %s (pid %d)", what, proc.pid)
        await stop_child(proc)
        raise
    if proc.returncode != 0:
        stderr = err.decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"{what} failed ({proc.returncode}): {stderr}")
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    summary: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    summary["wall_s"] = round(time.monotonic() - started, 1)
    return summary


def gate_line(promotion: dict[str, Any] | None) -> str:
    """The gate's decision in one line: candidate and live accuracy side by side, n, p-value,
    and why it was refused (the record's own reason when it has one)."""
    if not promotion:
        return "no promotion decision"
    if promotion.get("reason"):
        return str(promotion["reason"])
    cand, live = promotion.get("candidate_accuracy"), promotion.get("current_accuracy")
    shown = "n/a" if live is None else f"{live:.3f}"
    verdict = "promoted" if promotion.get("promoted") else "refused"
    return f"candidate {cand:.3f} vs live {shown} on {promotion.get('eval_pairs')} pairs: {verdict}"


async def bootstrap(settings: UpSettings) -> None:
    """Give an empty registry a reward model (and a policy), saying how long it takes."""
    registry = settings.registry
    if ModelRegistry(registry, "reward").promoted() is None:
        log.info(
            "empty registry: bootstrapping a reward model from %s (about a minute on 2 cores)",
            settings.bootstrap_checkpoint,
        )
        summary = await run_cli(
            ["export", "reward", "--checkpoint", settings.bootstrap_checkpoint,
             "--registry", str(registry), "--promote", "--log-level", "WARNING"],
            "reward bootstrap",
        )  # fmt: skip
        log.info("reward model %s ready in %.0f s", summary.get("version"), summary["wall_s"])
    if settings.generation and ModelRegistry(registry, "policy").promoted() is None:
        log.info(
            "bootstrapping the policy from %s (a few minutes on 2 cores)",
            settings.bootstrap_policy,
        )
        try:
            summary = await run_cli(
                ["export", "policy", "--checkpoint", settings.bootstrap_policy,
                 "--registry", str(registry), "--promote", "--log-level", "WARNING"],
                "policy bootstrap",
            )  # fmt: skip
            log.info("policy %s ready in %.0f s", summary.get("version"), summary["wall_s"])
        except RuntimeError as exc:
            log.error("no policy: generation stays off (%s)", exc)


class Retraining:
    """One kind of model's retraining: when it is due, the ``plaudit train`` command that does
    it (in a child process), and its memory.

    Memory: the last training tried (data cursor, outcome, ...) is kept under ``KIND`` in
    ``settings.scheduler_state`` (written aside, then renamed), so a restart remembers it and a
    refused or failed training is not repeated on the same data. A cancelled training is not
    remembered: it stopped, it did not try.
    """

    KIND: ModelKind = "reward"  # the registry's kind and the memory's key
    WHAT: str = ""  # for log lines: "reward training"
    SERVICE: str = ""  # the service that serves it

    def __init__(self, settings: UpSettings, store: FeedbackReader) -> None:
        self.settings = settings
        self.store = store
        self.registry = ModelRegistry(settings.registry, self.KIND)
        self.trainings: list[dict[str, Any]] = []
        self.last_tried: dict[str, Any] | None = self._load_state()

    # -- memory ----------------------------------------------------------------------------
    def _load_state(self) -> dict[str, Any] | None:
        path = self.settings.scheduler_state
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable scheduler state %s: %s", path, exc)
            return None
        tried = state.get(self.KIND) if isinstance(state, dict) else None
        if not isinstance(tried, dict) or tried.get("database") != self.settings.feedback_url:
            return None  # another database's cursor means nothing here
        return tried

    def _remember(self, cursor: int, outcome: str, **details: Any) -> None:
        """Record the last training tried, atomically (write aside, then rename)."""
        self.last_tried = {
            "database": self.settings.feedback_url,
            "cursor": cursor,
            "outcome": outcome,
            "at": datetime.now(UTC).isoformat(),
            **details,
        }
        path = self.settings.scheduler_state
        try:
            state = json.loads(path.read_text())
            state = state if isinstance(state, dict) else {}
        except (OSError, ValueError):
            state = {}
        state[self.KIND] = self.last_tried
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, path)

    def cursor(self) -> int:
        """The cursor new pairs are counted after: the later of the promoted version's data
        cursor and the last tried training's."""
        version = self.registry.promoted()
        promoted = 0
        if version is not None:
            promoted = int(self.registry.manifest(version).data_cursor or 0)
        tried = int(self.last_tried["cursor"]) if self.last_tried else 0
        return max(promoted, tried)

    def pending(self) -> tuple[int, int]:
        """How many pairs lie after :meth:`cursor`, and the last one's cursor."""
        count, last = 0, self.cursor()
        for pair in self.store.export_pairs(last):
            count += 1
            last = max(last, pair.cursor)
        return count, last

    def new_pairs(self) -> int:
        """Pairs exported after :meth:`cursor`."""
        return self.pending()[0]

    # -- what each kind says -----------------------------------------------------------------
    def due(self) -> tuple[str, int] | None:
        """Why a training is due now and the data cursor it will have seen, or None."""
        raise NotImplementedError

    def training_args(self) -> list[str]:
        raise NotImplementedError

    def remembered(self) -> dict[str, Any]:
        """What else the memory keeps about a training that ran."""
        return {}

    @property
    def serving_address(self) -> str:
        """The service to notify when a version is promoted."""
        raise NotImplementedError

    # -- one training ------------------------------------------------------------------------
    async def retrain(self, seen_cursor: int) -> dict[str, Any]:
        """One training, in its own process; remembered whatever its outcome."""
        extra = self.remembered()
        try:
            summary = await run_cli(self.training_args(), self.WHAT)
        except RuntimeError as exc:
            self._remember(seen_cursor, "failed", error=str(exc)[-500:], **extra)
            raise
        promotion = summary.get("promotion") or {}
        cursor = summary.get("data_cursor")
        self._remember(
            int(cursor) if cursor is not None else seen_cursor,
            "promoted" if summary.get("promoted") else "refused",
            version=summary.get("version"),
            reason=promotion.get("reason"),
            **extra,
        )
        self.trainings.append(summary)
        return summary

    async def check(self) -> dict[str, Any] | None:
        """One look: train (and notify serving) when due; the training's summary, or None."""
        try:
            due = await asyncio.to_thread(self.due)
        except Exception as exc:  # the database may be briefly unavailable: try again later
            log.warning("scheduler could not look at new feedback: %s", exc)
            return None
        if due is None:
            return None
        why, seen = due
        log.info("%s: starting the %s", why, self.WHAT)
        try:
            summary = await self.retrain(seen)
        except RuntimeError as exc:
            log.error("%s failed (not retried on the same data): %s", self.WHAT, exc)
            return None
        log.info(
            "%s: %s in %.0f s: %s",
            self.WHAT, summary.get("version"), summary["wall_s"],
            gate_line(summary.get("promotion")),
        )  # fmt: skip
        if summary.get("promoted"):
            reply = await asyncio.to_thread(
                notify_reload, self.serving_address, credentials=self.settings.credentials
            )
            log.info("the %s service now serves %s", self.SERVICE, reply.live_version)
        return summary


class RewardRetraining(Retraining):
    """Retrains the reward model when ``retrain_min_pairs`` new pairs lie after both the
    promoted version's data cursor and the last training tried."""

    KIND, WHAT, SERVICE = "reward", "reward training", "reward"

    def due(self) -> tuple[str, int] | None:
        count, last = self.pending()
        if count < self.settings.retrain_min_pairs:
            return None
        return f"{count} new preference pairs", last

    @property
    def serving_address(self) -> str:
        return self.settings.reward_address

    def training_args(self) -> list[str]:
        args = [
            "train", "reward", "--registry", str(self.settings.registry),
            "--runs-dir", str(self.settings.runs_dir),
            "--database-url", self.settings.feedback_url,
            "--backbone", self.settings.train_backbone, "--epochs",
            str(self.settings.train_epochs), "--promote", "--no-progress",
            "--promotion-tolerance", str(self.settings.promotion_tolerance),
            "--promotion-significance", str(self.settings.promotion_significance),
            "--max-length", str(self.settings.train_max_length), "--log-level", "WARNING",
        ]  # fmt: skip
        if self.settings.train_max_steps:
            args += ["--max-steps", str(self.settings.train_max_steps)]
        if self.settings.promotion_max_ece is not None:
            args += ["--promotion-max-ece", str(self.settings.promotion_max_ece)]
        return args


class PolicyRetraining(Retraining):
    """Retrains the policy against the live reward model after one trained on feedback was
    promoted: due when the live reward model is not the one the last policy training (tried
    here, or published to the registry) was judged by, and ``policy_min_pairs`` new pairs lie
    after that training's cursor. It starts from the live policy (``--base live``), so the gate
    bounds the KL to it, and compares with it on the same held-out prompts."""

    KIND, WHAT, SERVICE = "policy", "policy training", "generation"

    def live_reward(self) -> str | None:
        """The promoted reward model, when it was trained on feedback (a bootstrapped head
        knows nothing to train a policy against)."""
        rewards = ModelRegistry(self.settings.registry, "reward")
        version = rewards.promoted()
        if version is None or not rewards.manifest(version).data_cursor:
            return None
        return version

    def judged_by(self) -> set[str]:
        """The reward models the last policy training was judged by (memory, then registry)."""
        judges = set()
        if self.last_tried and self.last_tried.get("reward_version"):
            judges.add(str(self.last_tried["reward_version"]))
        versions = self.registry.list_versions()
        if versions and versions[-1].promotion:
            judges.update(versions[-1].promotion.get("reward_model") or [])
        return judges

    def due(self) -> tuple[str, int] | None:
        if self.registry.promoted() is None:
            return None  # nothing to start from (the bootstrap failed): generation is off
        live = self.live_reward()
        if live is None or live in self.judged_by():
            return None
        count, last = self.pending()
        if count < self.settings.policy_min_pairs:
            return None
        return f"reward model {live} is new ({count} new preference pairs)", last

    def remembered(self) -> dict[str, Any]:
        return {"reward_version": self.live_reward()}

    @property
    def serving_address(self) -> str:
        return self.settings.generation_address

    def training_args(self) -> list[str]:
        s = self.settings
        args = [
            "train", "policy", "--method", s.policy_method, "--base", "live",
            "--registry", str(s.registry), "--runs-dir", str(s.runs_dir),
            "--database-url", s.feedback_url, "--reward-addr", s.reward_address,
            "--eval-prompts", str(s.policy_eval_prompts),
            "--eval-max-new-tokens", str(s.policy_max_new_tokens),
            "--max-length", str(s.policy_max_length),
            "--batch-size", str(s.policy_batch_size),
            "--max-prompt-length", str(s.policy_max_length // 2),
            "--promotion-min-win-rate", str(s.policy_min_win_rate),
            "--promotion-min-lc-win-rate", str(s.policy_min_lc_win_rate),
            "--promotion-max-kl", str(s.policy_max_kl),
            "--promote", "--no-progress", "--log-level", "WARNING",
        ]  # fmt: skip
        if s.policy_method != "dpo":
            args += ["--max-new-tokens", str(s.policy_max_new_tokens)]
        if s.policy_budget:
            budget = POLICY_CONFIGS[s.policy_method].budget_field
            args += ["--" + budget.replace("_", "-"), str(s.policy_budget)]
        sft = s.policy_method == "rejection-sampling"
        args += ["--sft-learning-rate" if sft else "--learning-rate", str(s.policy_learning_rate)]
        return args


class Scheduler:
    """The one retraining scheduler of ``plaudit up``: every ``check_interval_s`` it looks at
    the reward model first, then the policy (which waits for a new reward model), one training
    at a time, each in its own process."""

    def __init__(self, settings: UpSettings, store: FeedbackReader, policy: bool = True) -> None:
        self.settings = settings
        self.reward = RewardRetraining(settings, store)
        self.policy = PolicyRetraining(settings, store) if policy else None

    async def check(self) -> list[dict[str, Any]]:
        """One look at each kind; the summaries of the trainings that ran."""
        ran = []
        for kind in (self.reward, self.policy):
            if kind is None:
                continue
            summary = await kind.check()
            if summary is not None:
                ran.append(summary)
                if kind is self.reward and not summary.get("promoted"):
                    log.info(
                        "the next reward training waits for %d new pairs after cursor %s",
                        self.settings.retrain_min_pairs,
                        kind.last_tried and kind.last_tried["cursor"],
                    )
        if ran:
            await asyncio.to_thread(print_status, self.settings)
        return ran

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.check_interval_s)
            try:
                await self.check()
            except Exception as exc:  # e.g. a service being restarted missed a reload notice
                log.error("retraining check failed (tried again next time): %s", exc)


async def _stop(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait for it (a training child it runs is stopped on the way)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def _serving(child: ServiceProcess, settings: UpSettings, timeout: float = 300.0) -> None:
    """Wait until ``child`` reports SERVING, in short blocking probes (a stop is never held up
    by a waiting thread); raises when it exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await asyncio.to_thread(
                wait_until_serving, child.address, 2.0, credentials=settings.credentials
            )
            return
        except TimeoutError:
            if child.process.poll() is not None:
                raise RuntimeError(f"the {child.service} service exited while starting") from None
            if time.monotonic() > deadline:
                raise


RESTART_FIRST_DELAY_S = 1.0  # a crashed service is restarted after 1, 2, 4 ... s
RESTART_MAX_DELAY_S = 30.0
RESTART_RESET_AFTER_S = 60.0  # a service that served this long starts again from the first delay
POLL_S = 0.2


def restart_delay(crashes: int) -> float:
    """The wait before restarting a service after its ``crashes``-th exit in a row (1-based)."""
    return min(RESTART_MAX_DELAY_S, RESTART_FIRST_DELAY_S * 2 ** max(0, crashes - 1))


async def supervise(child: ServiceProcess) -> None:
    """Keep ``child`` running until cancelled: when it exits (a crash, an OOM kill: anything but
    the shutdown, which cancels this first), log it and start the same command again (same
    ports) after :func:`restart_delay`; the other services keep serving meanwhile. The backoff
    starts over once a restarted service has run :data:`RESTART_RESET_AFTER_S`."""
    crashes = 0
    while True:
        started = time.monotonic()
        while child.process.poll() is None:  # polled: cancelling leaves no thread waiting
            await asyncio.sleep(POLL_S)
        if time.monotonic() - started >= RESTART_RESET_AFTER_S:
            crashes = 0
        crashes += 1
        delay = restart_delay(crashes)
        log.error(
            "the %s service (pid %d) exited unexpectedly with code %s; restarting it in %.0f s "
            "(exit %d in a row); the other services keep serving",
            child.service, child.pid, child.process.returncode, delay, crashes,
        )  # fmt: skip
        await asyncio.sleep(delay)
        try:
            child.restart()
        except OSError as exc:  # could not even start it: count it as another crash
            log.error("could not restart the %s service: %s", child.service, exc)
            continue
        log.warning(
            "restarted the %s service (pid %d) on %s", child.service, child.pid, child.address
        )


async def run_up(settings: UpSettings) -> int:
    settings.home.mkdir(parents=True, exist_ok=True)
    stopped = asyncio.ensure_future(wait_for_termination())
    await asyncio.sleep(0)  # the signal handlers are in place from here on
    booting = asyncio.ensure_future(bootstrap(settings))
    await asyncio.wait([stopped, booting], return_when=asyncio.FIRST_COMPLETED)
    if stopped.done():
        await _stop(booting)
        return 0
    booting.result()  # a failed reward bootstrap stops here
    children: list[ServiceProcess] = []
    no_auth = settings.auth_disabled
    try:
        children.append(
            start_service(
                "feedback", "--database-url", settings.feedback_url,
                "--http-port", str(settings.feedback_http_port),
                "--reward-addr", settings.reward_address,
                port=settings.feedback_port, metrics_port=settings.feedback_metrics_port,
                auth_disabled=no_auth,
            )
        )  # fmt: skip
        children.append(
            start_service(
                "reward", "--registry", str(settings.registry),
                "--http-port", str(settings.reward_http_port),
                port=settings.reward_port, metrics_port=settings.reward_metrics_port,
                auth_disabled=no_auth,
            )
        )  # fmt: skip
        if settings.generation and ModelRegistry(settings.registry, "policy").promoted():
            children.append(
                start_service(
                    "generation", "--registry", str(settings.registry),
                    "--reward-addr", settings.reward_address,
                    "--http-port", str(settings.generation_http_port),
                    port=settings.generation_port, metrics_port=settings.generation_metrics_port,
                    auth_disabled=no_auth,
                )
            )  # fmt: skip
        for child in children:
            log.info(
                "started the %s service (pid %d) on %s", child.service, child.pid, child.address
            )
        serving: asyncio.Future[Any] = asyncio.ensure_future(
            asyncio.gather(*(_serving(c, settings) for c in children))
        )
        await asyncio.wait([stopped, serving], return_when=asyncio.FIRST_COMPLETED)
        if stopped.done():
            await _stop(serving)
            return 0
        serving.result()
        log.info(
            "plaudit is up: %s; labelling page %s",
            ", ".join(f"{c.service} {c.address} (metrics :{c.metrics_port})" for c in children),
            f"http://127.0.0.1:{settings.feedback_http_port}/"
            if settings.feedback_http_port
            else "on a free port (see the feedback service's log)",
        )
        await asyncio.to_thread(print_status, settings)
        store = FeedbackReader(settings.feedback_url)  # read-only: the service migrated it
        serves_policy = any(c.service == "generation" for c in children)
        scheduler = asyncio.ensure_future(
            Scheduler(settings, store, policy=serves_policy and settings.policy_retrain).run()
        )
        supervisors = [asyncio.ensure_future(supervise(c)) for c in children]
        await stopped  # only SIGTERM/SIGINT stop plaudit up: a crashed service is restarted
        for supervisor in supervisors:
            await _stop(supervisor)  # no restart from here on
        await _stop(scheduler)  # stops a running training child first
        store.close()
        return 0
    finally:
        for child in reversed(children):
            child.stop()


def main(settings: UpSettings) -> int:
    return asyncio.run(run_up(settings))


if __name__ == "__main__":
    sys.exit(main(UpSettings()))
