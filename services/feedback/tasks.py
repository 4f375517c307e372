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
4. The pick is leased to A (atomically re-checking the room left, and the API key's lease limit
   ``max_leases_per_principal`` counted in the database); if another annotator took the last
   place meanwhile, the next in order is tried.
5. If nothing is left and :class:`TaskSource` s are configured (e.g. the generation service),
   they are asked for new tasks, which are queued and picked from like imported ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import grpc
import numpy as np

from plaudit.services.common.errors import AlreadyExistsError, InvalidArgumentError
from plaudit.services.common.preference_files import read_prompts
from plaudit.services.common.security.client import INSECURE, ClientCredentials
from plaudit.services.feedback.domain import (
    LabellingTask,
    NewTask,
    validate_identifier,
    validate_task,
)
from plaudit.services.feedback.settings import FeedbackSettings
from plaudit.services.feedback.store import FeedbackStore
from plaudit.services.feedback.task_store import TaskStats
from plaudit.services.generation.client import generate_request
from plaudit.services.reward.client import AsyncRewardClient
from plaudit.v1 import generation_pb2, generation_pb2_grpc

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

    async def close(self) -> None: ...


class UncertaintyScorer(Protocol):
    """Says how sure a reward model is about each task: a smaller margin is less certain."""

    async def margins(self, tasks: Sequence[LabellingTask]) -> dict[int, float]:
        """task_id -> how sure the model is of its least sure pair of the task's completions
        (:func:`smallest_gap`, or with an ensemble :func:`least_agreement`)."""
        ...

    async def close(self) -> None: ...


def smallest_gap(rewards: Sequence[float]) -> float:
    """The smallest |r_i - r_j| over pairs of rewards (the pair the model is least sure of)."""
    ordered = sorted(rewards)
    return min(b - a for a, b in itertools.pairwise(ordered))


def least_agreement(members: np.ndarray) -> float:
    """For an ensemble's rewards of one task's completions, ``(completions, heads)``: the
    smallest ``|mean_k d_k| / std_k d_k`` over pairs of completions, ``d_k`` head k's reward
    gap. Small when the heads disagree about the pair, not only when the mean gap is small:
    disagreement first (the pairs an ensemble is split on are the ones it gets wrong most often,
    docs/benchmarks.md). Unanimous heads with a gap give a large value."""
    best = math.inf
    for i, j in itertools.combinations(range(len(members)), 2):
        d = members[i].astype(np.float64) - members[j].astype(np.float64)
        best = min(best, abs(float(d.mean())) / (float(d.std()) + 1e-6))
    return best


class RewardMarginScorer:
    """:class:`UncertaintyScorer` backed by the reward service (:class:`AsyncRewardClient`);
    a failed call raises the server's ``grpc.aio.AioRpcError``."""

    def __init__(
        self, address: str, *, timeout_s: float, credentials: ClientCredentials = INSECURE
    ) -> None:
        self.client = AsyncRewardClient(address, timeout_s, credentials=credentials)

    async def margins(self, tasks: Sequence[LabellingTask]) -> dict[int, float]:
        chunks: list[list[tuple[int, str, str]]] = [[]]
        for task in tasks:  # one task's completions always share a call (one model version)
            if chunks[-1] and len(chunks[-1]) + len(task.completions) > SCORE_CHUNK_ITEMS:
                chunks.append([])
            chunks[-1].extend((task.task_id, task.prompt, c) for c in task.completions)
        chunks = [c for c in chunks if c]
        replies = await asyncio.gather(
            *(
                self.client.score_response([p for _, p, _ in c], [t for _, _, t in c])
                for c in chunks
            )
        )
        rewards: dict[int, list[float]] = {}
        members: dict[int, list[np.ndarray]] = {}
        for chunk, reply in zip(chunks, replies, strict=True):
            heads = reply.ensemble_members
            each = np.asarray(reply.member_rewards, dtype=np.float32).reshape(len(chunk), -1)
            for n, ((task_id, _, _), reward) in enumerate(zip(chunk, reply.rewards, strict=True)):
                rewards.setdefault(task_id, []).append(reward)
                if heads > 1:
                    members.setdefault(task_id, []).append(each[n])
        return {
            task_id: least_agreement(np.stack(members[task_id]))
            if task_id in members
            else smallest_gap(values)
            for task_id, values in rewards.items()
        }

    async def close(self) -> None:
        await self.client.close()


class GenerationTaskSource:
    """:class:`TaskSource` backed by the generation service: each task is one prompt of a pool
    with ``n`` completions sampled from the promoted policy (``Generate``, grpc.aio).

    Prompts are taken in a shuffled order and reshuffled after each pass, so every prompt comes
    up once per pass; a prompt comes back with new samples on a later pass. A prompt whose
    samples are not at least two distinct, non-empty texts makes no task. A call that fails is
    logged and its prompt skipped; when every call of a fetch fails the first error is raised
    (the picker logs it and leaves the queue as it is).
    """

    name = "generation"

    def __init__(
        self,
        address: str,
        prompts: Sequence[str],
        *,
        completions: int = 2,
        per_fetch: int = 4,
        temperature: float = 1.0,
        max_new_tokens: int = 0,
        timeout_s: float = 120.0,
        credentials: ClientCredentials = INSECURE,
        rng: random.Random | None = None,
    ) -> None:
        if not prompts:
            raise ValueError("GenerationTaskSource needs at least one prompt")
        self.address = address
        self.prompts = list(prompts)
        self.completions = completions
        self.per_fetch = per_fetch
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s
        self.rng = rng or random.Random()
        self._pending: list[str] = []
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None  # opened in the event loop, on first use

    def _next_prompts(self, k: int) -> list[str]:
        out: list[str] = []
        while len(out) < k:
            if not self._pending:
                self._pending = self.rng.sample(self.prompts, len(self.prompts))
            out.append(self._pending.pop())
        return out

    async def fetch(self, limit: int) -> list[NewTask]:
        prompts = self._next_prompts(min(limit, self.per_fetch, len(self.prompts)))
        replies = await asyncio.gather(
            *(self._generate(p) for p in prompts), return_exceptions=True
        )
        tasks: list[NewTask] = []
        errors: list[BaseException] = []
        for prompt, reply in zip(prompts, replies, strict=True):
            if isinstance(reply, BaseException):
                errors.append(reply)
                detail = reply.details() if isinstance(reply, grpc.aio.AioRpcError) else reply
                log.warning("generation failed for a task prompt", extra={"error": str(detail)})
                continue
            distinct: dict[str, str] = {}  # the queue tells completions apart by stripped text
            for c in reply.completions:
                if c.text.strip():
                    distinct.setdefault(c.text.strip(), c.text)
            texts = list(distinct.values())
            if len(texts) < 2:
                continue
            metadata = {"model_version": reply.model_version, "temperature": str(self.temperature)}
            tasks.append(
                NewTask(prompt=prompt, completions=texts, metadata=metadata, source=self.name)
            )
        if errors and len(errors) == len(prompts):
            raise errors[0]
        return tasks

    async def _generate(self, prompt: str) -> generation_pb2.GenerateResponse:
        request = generate_request(
            prompt,
            n=self.completions,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
        )
        if self._channel is None:
            self._channel = self._credentials.aio_channel(self.address)
        stub = generation_pb2_grpc.GenerationServiceStub(self._channel)
        reply: generation_pb2.GenerateResponse = await stub.Generate(
            request, timeout=self.timeout_s
        )
        return reply

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


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
        refill_below: int = 0,
        max_leases_per_principal: int = 0,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self.max_leases_per_principal = max_leases_per_principal
        self.labels_per_task = labels_per_task
        self.lease_ms = int(lease_s * 1000)
        self.explore_fraction = explore_fraction
        self.candidates = candidates
        self.scorer = scorer
        self.sources = list(sources)
        self.refill_below = refill_below
        self.rng = rng or random.Random()
        # the one fetch from the sources under way (an empty queue's or a background refill);
        # its result says whether it asked the sources
        self._refill: asyncio.Task[bool] | None = None
        self._closed = False

    @classmethod
    def from_settings(
        cls, store: Callable[[], FeedbackStore], settings: FeedbackSettings
    ) -> TaskPicker:
        scorer = (
            RewardMarginScorer(
                settings.reward_addr,
                timeout_s=settings.reward_timeout_s,
                credentials=settings.credentials,
            )
            if settings.reward_addr
            else None
        )
        sources: list[TaskSource] = []
        if settings.generation_addr and settings.task_prompts_file is not None:
            sources.append(
                GenerationTaskSource(
                    settings.generation_addr,
                    read_prompts(settings.task_prompts_file),
                    completions=settings.generated_completions,
                    per_fetch=settings.generated_tasks_per_fetch,
                    temperature=settings.generation_temperature,
                    max_new_tokens=settings.generation_max_new_tokens,
                    timeout_s=settings.generation_timeout_s,
                    credentials=settings.credentials,
                )
            )
        return cls(
            store,
            labels_per_task=settings.labels_per_task,
            lease_s=settings.task_lease_s,
            explore_fraction=settings.explore_fraction,
            candidates=settings.task_candidates,
            scorer=scorer,
            sources=sources,
            refill_below=settings.task_refill_below,
            max_leases_per_principal=settings.max_leases_per_principal,
        )

    async def close(self) -> None:
        self._closed = True
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill
        if self.scorer is not None:
            await self.scorer.close()
        for source in self.sources:
            await source.close()

    async def next_task(self, annotator_id: str, principal: str | None = None) -> TaskPick | None:
        """Lease the next task to the annotator; None when there is nothing for them.

        ``principal``: the API key asking (None while authentication is off); a new lease is
        RESOURCE_EXHAUSTED when that key already holds ``max_leases_per_principal`` annotators'
        live leases, counted in the database (every process sharing it)."""
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
        pick = await self._pick(annotator_id, principal)
        if pick is None and self.sources and not self._closed:
            # one fetch at a time, shared by every annotator who finds the queue empty
            refill, fetched = self._refill, False
            if refill is not None and not refill.done():
                fetched = await asyncio.shield(refill)  # False: it found enough and did not ask
            if not fetched:
                self._refill = refill = asyncio.create_task(self._fetch_from_sources())
                await asyncio.shield(refill)
            pick = await self._pick(annotator_id, principal)
        idle = self._refill is None or self._refill.done()
        if self.sources and self.refill_below and idle and not self._closed:
            self._refill = asyncio.create_task(self._refill_if_low())
        return pick

    async def _fetch_from_sources(self) -> bool:
        """Ask every source for new tasks and queue them; a failing source is logged, skipped."""
        tasks = self._store().tasks
        for source in self.sources:
            try:
                fresh = await source.fetch(self.candidates)
            except Exception as exc:  # a source that is down leaves the queue as it is
                log.warning("task source failed", extra={"source": source.name, "error": str(exc)})
                continue
            valid = []
            for task in fresh:  # one bad task (too long, say) must not cost the others
                try:
                    validate_task(task, tasks.limits)
                except InvalidArgumentError as exc:
                    log.warning(
                        "task source made a task the queue refuses",
                        extra={"source": source.name, "error": str(exc)},
                    )
                else:
                    valid.append(task)
            if valid:
                try:
                    await asyncio.to_thread(tasks.import_tasks, valid)
                except AlreadyExistsError as exc:  # a key reused with other content
                    log.warning(
                        "task source made tasks the queue refuses",
                        extra={"source": source.name, "error": str(exc)},
                    )
        return True

    async def _refill_if_low(self) -> bool:
        """In the background, after a pick: fetch new tasks while fewer than ``refill_below``
        still need labels, so the next annotator does not wait for the generation service."""
        try:
            stats = await asyncio.to_thread(self._store().tasks.stats, self.labels_per_task)
            if stats.pending < self.refill_below:
                return await self._fetch_from_sources()
        except Exception as exc:  # never an unhandled task error; the next pick tries again
            log.warning("background task refill failed", extra={"error": str(exc)})
        return False

    async def _pick(self, annotator_id: str, principal: str | None) -> TaskPick | None:
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
                principal=principal,
                max_leases=self.max_leases_per_principal,
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
