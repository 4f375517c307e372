"""Which task an annotator labels next: the queue, active learning and new-task sources.

:class:`TaskPicker` answers "next task for annotator A" (docs/labelling.md tells the story):

1. A's live lease, if A was handed a task and has not labelled or skipped it (a reload shows the
   same task, so the page's idempotency key stays the same).
2. Otherwise a sample of the tasks A may take (unfinished, not labelled, skipped or leased by A,
   room left under the label target once other annotators' live leases are counted). With no
   :class:`UncertaintyScorer` the sample is the oldest tasks and they go in queue order.
3. With a scorer (the reward service) the sample is uniform at random; with probability
   ``explore_fraction`` the task is picked uniformly from it ("explore": keeps the labelled data
   an unbiased sample of the queue), otherwise the task whose completions the reward model tells
   apart least ("uncertain": the smallest gap between two of its rewards). If scoring fails the
   pick is random and the failure is logged.
4. The pick is leased to A (atomically re-checking the room left); if another annotator took
   the last place meanwhile, the next in order is tried.
5. If nothing is left and :class:`TaskSource` s are configured (e.g. the generation service),
   they are asked for new tasks, which are queued and picked from like imported ones.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import grpc
from plaudit.v1 import reward_pb2, reward_pb2_grpc

from services.common.security import INSECURE, ClientCredentials
from services.feedback.domain import LabellingTask, NewTask, validate_identifier
from services.feedback.settings import FeedbackSettings
from services.feedback.store import FeedbackStore
from services.feedback.task_store import TaskStats

log = logging.getLogger(__name__)

PickReason = Literal["resumed", "uncertain", "explore", "queue", "random"]
SCORE_CHUNK_ITEMS = 64  # items per reward-service Score call (its default limit is 256)


class TaskSource(Protocol):
    """Makes new tasks on demand, e.g. prompts sent to the generation service for completions.

    The picker calls :meth:`fetch` when an annotator has nothing left to label; what it returns
    is queued (deduplicated by key, ``source`` naming this source) and picked like imported tasks.
    """

    name: str

    async def fetch(self, limit: int) -> Sequence[NewTask]:
        """Up to ``limit`` new tasks (fewer or none when there is nothing to generate)."""
        ...


class UncertaintyScorer(Protocol):
    """Says how sure a reward model is about each task: a smaller margin is less certain."""

    async def margins(self, tasks: Sequence[LabellingTask]) -> dict[int, float]:
        """task_id -> the smallest reward gap between two of the task's completions."""
        ...

    async def close(self) -> None: ...


def smallest_gap(rewards: Sequence[float]) -> float:
    """The smallest |r_i - r_j| over pairs of rewards (the pair the model is least sure of)."""
    ordered = sorted(rewards)
    return min(b - a for a, b in itertools.pairwise(ordered))


class RewardServiceScorer:
    """:class:`UncertaintyScorer` backed by the reward service's ``Score`` RPC (grpc.aio)."""

    def __init__(
        self, address: str, *, timeout_s: float, credentials: ClientCredentials = INSECURE
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = credentials.aio_channel(address)
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)

    async def margins(self, tasks: Sequence[LabellingTask]) -> dict[int, float]:
        chunks: list[list[tuple[int, str, str]]] = [[]]
        for task in tasks:  # one task's completions always share a call (one model version)
            if chunks[-1] and len(chunks[-1]) + len(task.completions) > SCORE_CHUNK_ITEMS:
                chunks.append([])
            chunks[-1].extend((task.task_id, task.prompt, c) for c in task.completions)
        replies = await asyncio.gather(*(self._score(chunk) for chunk in chunks if chunk))
        rewards: dict[int, list[float]] = {}
        for chunk, reply in zip((c for c in chunks if c), replies, strict=True):
            for (task_id, _, _), reward in zip(chunk, reply, strict=True):
                rewards.setdefault(task_id, []).append(reward)
        return {task_id: smallest_gap(values) for task_id, values in rewards.items()}

    async def _score(self, items: list[tuple[int, str, str]]) -> list[float]:
        request = reward_pb2.ScoreRequest(
            items=[reward_pb2.ScoreItem(prompt=p, completion=c) for _, p, c in items]
        )
        reply = await self._stub.Score(request, timeout=self.timeout_s)
        return list(reply.rewards)

    async def close(self) -> None:
        await self._channel.close()


@dataclass(frozen=True)
class TaskPick:
    """The task handed out and why; ``margin`` is its reward gap when it was scored."""

    task: LabellingTask
    reason: PickReason
    margin: float | None = None


def least_certain_first(
    candidates: Sequence[LabellingTask], margins: Mapping[int, float]
) -> list[LabellingTask]:
    """Candidates by ascending reward gap (ties keep their order; unscored tasks go last)."""
    inf = float("inf")
    return sorted(candidates, key=lambda t: margins.get(t.task_id, inf))


def shuffled(candidates: Sequence[LabellingTask], rng: random.Random) -> list[LabellingTask]:
    out = list(candidates)
    rng.shuffle(out)
    return out


def _now_ms() -> int:
    return int(time.time() * 1000)


class TaskPicker:
    """Hands out tasks to annotators and records their labels and skips (see module doc).

    ``rng`` is public so tests can seed it.
    """

    def __init__(
        self,
        store: Callable[[], FeedbackStore],
        *,
        labels_per_task: int = 3,
        lease_s: float = 600.0,
        explore_fraction: float = 0.2,
        candidates: int = 32,
        scorer: UncertaintyScorer | None = None,
        sources: Sequence[TaskSource] = (),
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self.labels_per_task = labels_per_task
        self.lease_ms = int(lease_s * 1000)
        self.explore_fraction = explore_fraction
        self.candidates = candidates
        self.scorer = scorer
        self.sources = list(sources)
        self.rng = rng or random.Random()

    @classmethod
    def from_settings(
        cls, store: Callable[[], FeedbackStore], settings: FeedbackSettings
    ) -> TaskPicker:
        scorer = (
            RewardServiceScorer(
                settings.reward_addr,
                timeout_s=settings.reward_timeout_s,
                credentials=settings.credentials,
            )
            if settings.reward_addr
            else None
        )
        return cls(
            store,
            labels_per_task=settings.labels_per_task,
            lease_s=settings.task_lease_s,
            explore_fraction=settings.explore_fraction,
            candidates=settings.task_candidates,
            scorer=scorer,
        )

    async def close(self) -> None:
        if self.scorer is not None:
            await self.scorer.close()

    async def next_task(self, annotator_id: str) -> TaskPick | None:
        """Lease the next task to the annotator; None when there is nothing for them."""
        tasks = self._store().tasks
        validate_identifier("annotator_id", annotator_id, tasks.limits)
        now = _now_ms()
        held = await asyncio.to_thread(
            tasks.leased,
            annotator_id,
            now_ms=now,
            lease_ms=self.lease_ms,
            labels_needed=self.labels_per_task,
        )
        if held is not None:
            return TaskPick(held, "resumed")
        pick = await self._pick(annotator_id)
        if pick is None and self.sources:
            for source in self.sources:
                try:
                    fresh = await source.fetch(self.candidates)
                except Exception as exc:  # a source that is down leaves the queue as it is
                    log.warning(
                        "task source failed", extra={"source": source.name, "error": str(exc)}
                    )
                    continue
                if fresh:
                    await asyncio.to_thread(tasks.import_tasks, fresh)
            pick = await self._pick(annotator_id)
        return pick

    async def _pick(self, annotator_id: str) -> TaskPick | None:
        tasks = self._store().tasks
        candidates = await asyncio.to_thread(
            tasks.candidates,
            annotator_id,
            now_ms=_now_ms(),
            lease_ms=self.lease_ms,
            labels_needed=self.labels_per_task,
            limit=self.candidates,
            shuffle=self.scorer is not None,
        )
        if not candidates:
            return None
        margins: dict[int, float] | None = None
        reason: PickReason
        if self.scorer is None:
            order, reason = list(candidates), "queue"
        elif self.rng.random() < self.explore_fraction:
            order, reason = shuffled(candidates, self.rng), "explore"
        elif (margins := await self._margins(candidates)) is None:
            order, reason = shuffled(candidates, self.rng), "random"
        else:
            order, reason = least_certain_first(candidates, margins), "uncertain"
        for task in order:
            claimed = await asyncio.to_thread(
                tasks.claim,
                task.task_id,
                annotator_id,
                now_ms=_now_ms(),
                lease_ms=self.lease_ms,
                labels_needed=self.labels_per_task,
            )
            if claimed:
                margin = None if margins is None else margins.get(task.task_id)
                return TaskPick(task, reason, margin)
        return None

    async def _margins(self, candidates: Sequence[LabellingTask]) -> dict[int, float] | None:
        assert self.scorer is not None
        try:
            return await self.scorer.margins(candidates)
        except Exception as exc:  # any scoring failure: fall back to a random pick
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            log.warning(
                "cannot score tasks for active learning; picking at random",
                extra={"scorer": type(self.scorer).__name__, "error": detail},
            )
            return None

    async def record_label(self, task_id: int, annotator_id: str, feedback_id: int) -> int:
        """The annotator labelled the task (idempotent); returns its label count."""
        tasks = self._store().tasks
        return await asyncio.to_thread(
            tasks.record_label, task_id, annotator_id, feedback_id, now_ms=_now_ms()
        )

    async def skip(self, task_id: int, annotator_id: str) -> None:
        """The annotator passes on the task; it is not offered to them again."""
        tasks = self._store().tasks
        validate_identifier("annotator_id", annotator_id, tasks.limits)
        await asyncio.to_thread(tasks.skip, task_id, annotator_id, now_ms=_now_ms())

    async def stats(self, annotator_id: str | None = None) -> TaskStats:
        tasks = self._store().tasks
        return await asyncio.to_thread(tasks.stats, self.labels_per_task, annotator_id)
