"""Shadow scoring: a candidate version scores a sample of live requests off the request path,
and the service reports how far it agrees with the live version of the same named model.

The request path only *offers* a scored job (:meth:`ShadowScorer.offer`): a random draw against
the shadow's fraction, then a non-blocking put on a queue bounded in requests and in items (a
full queue drops the sample and counts it; a live call never waits). The statistics belong to
one (shadow, live) pair of versions: a new live version starts them afresh. One worker task
scores queued jobs with the shadow version in a worker thread and folds them into
:class:`ShadowStats`.

Agreement is pair order: for a Compare (two items) the one pair, for a multi-item Score every pair
of its items (the first :data:`MAX_ITEMS` items); a pair counts 1 when both versions order it the
same way, 1/2 when either scores it as a tie. Multi-item Scores also give a Spearman rank
correlation each; the status reports their mean.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from plaudit.services.reward.engine import ModelScores, ScoreJob
from plaudit.services.runtime.reward_model import LoadedRewardModel
from plaudit.v1 import reward_pb2

log = logging.getLogger(__name__)

MAX_ITEMS = 64  # items of one request compared pairwise (64 -> 2016 pairs)


def pair_agreement(live: np.ndarray, shadow: np.ndarray) -> tuple[float, int]:
    """(agreeing pairs, pairs) over every pair i < j of the items: 1 per pair ordered the same
    way by both, 1/2 per pair either scores as a tie."""
    live, shadow = live[:MAX_ITEMS].astype(np.float64), shadow[:MAX_ITEMS].astype(np.float64)
    i, j = np.triu_indices(len(live), k=1)
    a, b = np.sign(live[i] - live[j]), np.sign(shadow[i] - shadow[j])
    tie = (a == 0) | (b == 0)
    agreed = float(np.sum((a == b) & ~tie) + 0.5 * np.sum(tie))
    return agreed, len(i)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman(live: np.ndarray, shadow: np.ndarray) -> float | None:
    """Spearman's rank correlation; None with fewer than 3 items or a constant side."""
    if len(live) < 3:
        return None
    a, b = average_ranks(live), average_ranks(shadow)
    if np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


@dataclass
class _Moments:
    """Running mean and variance (Welford)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, values: np.ndarray) -> None:
        for x in values.astype(np.float64).tolist():
            self.n += 1
            delta = x - self.mean
            self.mean += delta / self.n
            self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n > 1 else 0.0


@dataclass
class ShadowStats:
    """What one shadow version showed against one live version so far (reset when either
    changes: agreement never mixes two live versions)."""

    version: str
    fraction: float
    live_version: str = ""  # the live version the samples were scored by ("" until the first)
    requests: int = 0
    agreed: float = 0.0
    pairs: int = 0
    rankings: int = 0
    correlation_sum: float = 0.0
    dropped: int = 0
    error: str = ""
    live: _Moments = field(default_factory=_Moments)
    shadow: _Moments = field(default_factory=_Moments)

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.pairs if self.pairs else None

    def add(self, live_raw: np.ndarray, shadow_raw: np.ndarray) -> None:
        self.requests += 1
        agreed, pairs = pair_agreement(live_raw, shadow_raw)
        self.agreed += agreed
        self.pairs += pairs
        rho = spearman(live_raw, shadow_raw)
        if rho is not None:
            self.rankings += 1
            self.correlation_sum += rho
        self.live.add(live_raw)
        self.shadow.add(shadow_raw)

    def message(self) -> reward_pb2.ShadowStatus:
        return reward_pb2.ShadowStatus(
            version=self.version,
            fraction=self.fraction,
            live_version=self.live_version,
            requests=self.requests,
            pairs=self.pairs,
            agreement=self.agreement or 0.0,
            rankings=self.rankings,
            rank_correlation=self.correlation_sum / self.rankings if self.rankings else 0.0,
            live_mean=self.live.mean,
            live_std=self.live.std,
            shadow_mean=self.shadow.mean,
            shadow_std=self.shadow.std,
            dropped=self.dropped,
            error=self.error,
        )


@dataclass(frozen=True)
class _Sample:
    name: str
    model: LoadedRewardModel
    job: ScoreJob
    live_raw: np.ndarray
    live_version: str


class ShadowScorer:
    """Scores sampled live jobs with each named model's shadow, off the request path."""

    def __init__(
        self,
        score_with: Callable[[LoadedRewardModel, list[ScoreJob], str], list[ModelScores]],
        *,
        queue_size: int = 64,
        queue_items: int = 1024,
        on_update: Callable[[str, ShadowStats], None] | None = None,
        seed: int | None = None,
    ) -> None:
        self._score_with = score_with
        self._queue: asyncio.Queue[_Sample] = asyncio.Queue(maxsize=queue_size)
        self._queue_items = queue_items  # items waiting at most (memory: texts are kept)
        self._queued_items = 0
        self._models: dict[str, LoadedRewardModel] = {}
        self.stats: dict[str, ShadowStats] = {}
        self._on_update = on_update
        self._random = random.Random(seed)
        self._worker: asyncio.Task[None] | None = None

    def set_shadow(self, name: str, model: LoadedRewardModel | None, fraction: float) -> None:
        """Shadow ``name`` with ``model`` on ``fraction`` of its requests (None: stop); the
        statistics start afresh."""
        if model is None:
            self._models.pop(name, None)
            self.stats.pop(name, None)
            return
        self._models[name] = model
        self.stats[name] = ShadowStats(model.version, fraction)

    def offer(self, scores: ModelScores, job: ScoreJob) -> None:
        """Maybe queue ``job`` (which the live version scored as ``scores``) for the shadow of
        ``scores.name``; never blocks, never raises."""
        model = self._models.get(scores.name)
        stats = self.stats.get(scores.name)
        if model is None or stats is None or self._random.random() >= stats.fraction:
            return
        items = len(job.prompts)
        if self._queued_items + items > self._queue_items:
            stats.dropped += 1
            return
        try:
            self._queue.put_nowait(_Sample(scores.name, model, job, scores.raw, scores.version))
        except asyncio.QueueFull:
            stats.dropped += 1
            return
        self._queued_items += items

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    async def _run(self) -> None:
        while True:
            sample = await self._queue.get()
            try:
                await self._score(sample)
            finally:
                self._queued_items -= len(sample.job.prompts)
                self._queue.task_done()

    async def _score(self, sample: _Sample) -> None:
        stats = self.stats.get(sample.name)
        if stats is None or stats.version != sample.model.version:
            return  # the shadow changed or stopped since the job was offered
        try:
            (scores,) = await asyncio.to_thread(
                self._score_with, sample.model, [sample.job], sample.name
            )
        except Exception as exc:  # a broken candidate must not stop the worker
            stats.error = str(exc)
            log.warning("shadow scoring failed", extra={"model": sample.name,
                        "version": sample.model.version, "error": str(exc)})  # fmt: skip
            return
        if self.stats.get(sample.name) is not stats:
            return  # the shadow stopped or changed while this sample was being scored
        if stats.live_version != sample.live_version:
            if stats.live_version:  # the live version changed: start afresh against the new one
                stats = ShadowStats(stats.version, stats.fraction, dropped=stats.dropped)
                self.stats[sample.name] = stats
            stats.live_version = sample.live_version
        stats.add(sample.live_raw, scores.raw)
        if self._on_update is not None:
            self._on_update(sample.name, stats)

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until every queued sample is scored (tests, shutdown)."""
        await asyncio.wait_for(self._queue.join(), timeout)
