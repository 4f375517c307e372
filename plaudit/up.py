"""``plaudit up``: the whole loop on one machine with embedded defaults.

Starts the feedback, reward and (when a policy is promoted or can be bootstrapped) generation
services as child processes on their default ports, with SQLite and a local registry under
``--home``, and runs the retraining scheduler: when at least ``--retrain-min-pairs`` new preference
pairs have arrived since the promoted reward model's data cursor (checked every
``--check-interval-s``), it runs ``plaudit train reward --promote`` on everything stored, in its
own process (the trainer needs torch; this process does not), then tells the reward service to
pick up the result. Serving hot-swaps it without a restart; a candidate that loses on the held-out
set is published but not promoted.

On the first start with an empty registry a reward model is bootstrapped (the MiniLM backbone
with a fresh scalar head), so scoring works from the start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from plaudit.services.common.admin import notify_reload
from plaudit.services.common.process import CLI, ServiceProcess, start_service
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.common.security.client import ClientSecuritySettings
from plaudit.services.common.server import wait_for_termination
from plaudit.services.feedback.export import FeedbackReader
from plaudit.services.reward.client import wait_until_serving

log = logging.getLogger(__name__)


class UpSettings(ClientSecuritySettings):
    home: Path = Field(Path(".plaudit"), description="folder for the database, registry and runs")
    database_url: str = Field("", description="feedback database (default: SQLite under home)")
    reward_port: int = Field(50051, ge=0, le=65535, description="reward service gRPC port")
    reward_metrics_port: int = Field(9091, ge=0, le=65535, description="reward /metrics port")
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
    bootstrap_checkpoint: str = Field("minilm", description="reward backbone for an empty registry")
    bootstrap_policy: str = Field("smollm2", description="policy for an empty registry")
    retrain_min_pairs: int = Field(
        200, ge=1, description="new preference pairs that trigger a reward-model retraining"
    )
    check_interval_s: float = Field(10.0, gt=0, description="how often the scheduler looks")
    train_backbone: str = Field("minilm", description="backbone each retraining starts from")
    train_epochs: int = Field(1, ge=1, description="epochs per retraining")
    train_max_steps: int = Field(0, ge=0, description="optimizer steps per retraining (0: all)")
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


def _run_cli(args: list[str], what: str) -> dict[str, Any]:
    """Run a ``plaudit`` command in a child process; its last stdout line is a JSON summary."""
    started = time.monotonic()
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    summary: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    summary["wall_s"] = round(time.monotonic() - started, 1)
    return summary


def bootstrap(settings: UpSettings) -> None:
    """Give an empty registry a reward model (and a policy), saying how long it takes."""
    registry = settings.registry
    if ModelRegistry(registry, "reward").promoted() is None:
        log.info(
            "empty registry: bootstrapping a reward model from %s (about a minute on 2 cores)",
            settings.bootstrap_checkpoint,
        )
        summary = _run_cli(
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
            summary = _run_cli(
                ["export", "policy", "--checkpoint", settings.bootstrap_policy,
                 "--registry", str(registry), "--promote", "--log-level", "WARNING"],
                "policy bootstrap",
            )  # fmt: skip
            log.info("policy %s ready in %.0f s", summary.get("version"), summary["wall_s"])
        except RuntimeError as exc:
            log.error("no policy: generation stays off (%s)", exc)


class Scheduler:
    """Retrains the reward model when enough new feedback has arrived."""

    def __init__(self, settings: UpSettings, store: FeedbackReader) -> None:
        self.settings = settings
        self.store = store
        self.registry = ModelRegistry(settings.registry, "reward")
        self.trainings: list[dict[str, Any]] = []

    def new_pairs(self) -> int:
        """Pairs exported after the promoted version's data cursor."""
        version = self.registry.promoted()
        cursor = 0
        if version is not None:
            cursor = int(self.registry.manifest(version).data_cursor or 0)
        return sum(1 for _ in self.store.export_pairs(cursor))

    def retrain(self) -> dict[str, Any]:
        args = [
            "train", "reward", "--registry", str(self.settings.registry),
            "--database-url", self.settings.feedback_url,
            "--backbone", self.settings.train_backbone, "--epochs",
            str(self.settings.train_epochs), "--promote", "--no-progress",
            "--log-level", "WARNING",
        ]  # fmt: skip
        if self.settings.train_max_steps:
            args += ["--max-steps", str(self.settings.train_max_steps)]
        summary = _run_cli(args, "reward training")
        self.trainings.append(summary)
        return summary

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.check_interval_s)
            try:
                pending = await asyncio.to_thread(self.new_pairs)
            except Exception as exc:  # the database may be briefly unavailable: try again later
                log.warning("scheduler could not count new pairs: %s", exc)
                continue
            if pending < self.settings.retrain_min_pairs:
                continue
            log.info("%d new preference pairs: retraining the reward model", pending)
            try:
                summary = await asyncio.to_thread(self.retrain)
            except RuntimeError as exc:
                log.error("retraining failed: %s", exc)
                continue
            log.info(
                "trained %s in %.0f s: held-out accuracy %s, promoted %s",
                summary.get("version"), summary["wall_s"],
                summary.get("metrics", {}).get("eval/accuracy"), summary.get("promoted"),
            )  # fmt: skip
            if summary.get("promoted"):
                reply = await asyncio.to_thread(
                    notify_reload,
                    self.settings.reward_address,
                    credentials=self.settings.credentials,
                )
                log.info("reward service now serves %s", reply.live_version)


async def run_up(settings: UpSettings) -> int:
    settings.home.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(bootstrap, settings)
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
                port=settings.reward_port, metrics_port=settings.reward_metrics_port,
                auth_disabled=no_auth,
            )
        )  # fmt: skip
        if settings.generation and ModelRegistry(settings.registry, "policy").promoted():
            children.append(
                start_service(
                    "generation", "--registry", str(settings.registry),
                    "--reward-addr", settings.reward_address,
                    port=settings.generation_port, metrics_port=settings.generation_metrics_port,
                    auth_disabled=no_auth,
                )
            )  # fmt: skip
        for child in children:
            await asyncio.to_thread(
                wait_until_serving, child.address, 300.0, credentials=settings.credentials
            )
        log.info(
            "plaudit is up: %s; labelling page %s",
            ", ".join(f"{c.service} {c.address} (metrics :{c.metrics_port})" for c in children),
            f"http://127.0.0.1:{settings.feedback_http_port}/"
            if settings.feedback_http_port
            else "on a free port (see the feedback service's log)",
        )
        store = FeedbackReader(settings.feedback_url)  # read-only: the service migrated it
        scheduler = asyncio.ensure_future(Scheduler(settings, store).run())
        stopped = asyncio.ensure_future(wait_for_termination())
        watched = [asyncio.ensure_future(asyncio.to_thread(c.process.wait)) for c in children]
        done, _ = await asyncio.wait([stopped, *watched], return_when=asyncio.FIRST_COMPLETED)
        scheduler.cancel()
        store.close()
        if stopped not in done:
            log.error("a service exited unexpectedly; stopping the others")
            return 1
        return 0
    finally:
        for child in reversed(children):
            child.stop()


def main(settings: UpSettings) -> int:
    return asyncio.run(run_up(settings))


if __name__ == "__main__":
    sys.exit(main(UpSettings()))
