"""Dynamic batching: many concurrent requests, one model call.

One owner task takes requests from a queue of (payload, future) and flushes a batch when it holds
``max_batch_size`` items, when it would exceed ``max_batch_tokens`` (the padding-aware cost of the
batch), or when the oldest request has waited ``max_wait_s``. The batch runs in a worker thread,
off the event loop. Each result goes to its caller's future; an exception reaches every caller in
the batch. Requests are never split across batches, so one request is always served by one call
(and so by one model version). Expired and cancelled requests are skipped before the model runs.
A full queue is refused at once with RESOURCE_EXHAUSTED rather than letting latency grow without
bound.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Gauge, Histogram

from plaudit.services.common.errors import (
    DeadlineExceededError,
    ResourceExhaustedError,
    UnavailableError,
)

log = logging.getLogger(__name__)

_STOP = object()  # queued by close(): everything before it is still processed

P = TypeVar("P")
R = TypeVar("R")
P_in = TypeVar("P_in", contravariant=True)
R_out = TypeVar("R_out", covariant=True)


class BatchMetrics:
    """Batch size, queue wait and queue depth, labelled by batcher name."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.batch_size = Histogram(
            f"{prefix}_batch_size",
            "Items per executed batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=registry,
        )
        self.queue_wait = Histogram(
            f"{prefix}_queue_wait_seconds",
            "Time a request waited in the queue before its batch started.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )
        self.queue_depth = Gauge(
            f"{prefix}_queue_depth", "Items waiting in the queue.", registry=registry
        )


class Batcher(Protocol[P_in, R_out]):
    """What a service submits jobs to: :class:`DynamicBatcher` (flushes), or a batcher of the
    same interface (the generation service's continuous batcher)."""

    @property
    def queued_items(self) -> int: ...

    def start(self) -> None:
        """Start taking jobs (inside the running event loop)."""

    async def submit(
        self, payload: P_in, *, size: int = 1, cost: int = 1, timeout: float | None = None
    ) -> R_out:
        """Queue ``payload`` and wait for its result; RESOURCE_EXHAUSTED when the queue is full,
        UNAVAILABLE once closing."""
        ...

    async def close(self) -> None:
        """Stop accepting, finish everything already queued."""


@dataclass
class BatchingConfig:
    max_batch_size: int = 64
    max_batch_tokens: int = 16384
    max_wait_s: float = 0.005
    max_queue_items: int = 4096


@dataclass
class _Pending(Generic[P, R]):
    payload: P
    size: int
    cost: int
    deadline: float | None
    future: asyncio.Future[R]
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher(Generic[P, R]):
    """Collects payloads from concurrent callers and runs ``process`` on batches of them.

    ``process(payloads) -> results`` runs in a worker thread and must return one result per
    payload, in order.
    """

    def __init__(
        self,
        process: Callable[[Sequence[P]], Sequence[R]],
        config: BatchingConfig,
        *,
        metrics: BatchMetrics | None = None,
        name: str = "batcher",
    ) -> None:
        self._process = process
        self.config = config
        self._metrics = metrics
        self._name = name
        self._queue: asyncio.Queue[_Pending[P, R] | object] = asyncio.Queue()
        self._carry: collections.deque[_Pending[P, R] | object] = collections.deque()
        self._queued_items = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._task: asyncio.Task[None] | None = None
        self._accepting = False

    @property
    def queued_items(self) -> int:
        return self._queued_items

    def start(self) -> None:
        self._accepting = True
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def submit(
        self, payload: P, *, size: int = 1, cost: int = 1, timeout: float | None = None
    ) -> R:
        """Queue ``payload`` and wait for its result; ``timeout`` is the caller's remaining time."""
        if not self._accepting:
            raise UnavailableError("server is shutting down")
        if self._queued_items + size > self.config.max_queue_items:
            raise ResourceExhaustedError(
                f"queue full ({self._queued_items} items waiting, limit "
                f"{self.config.max_queue_items}); retry later"
            )
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        deadline = None if timeout is None else time.monotonic() + timeout
        self._queued_items += size
        self._set_depth()
        self._queue.put_nowait(_Pending(payload, size, cost, deadline, future))
        return await future  # a cancelled caller cancels the future; the owner then skips it

    async def close(self) -> None:
        """Stop accepting, finish everything already queued, then stop the owner task."""
        self._accepting = False
        if self._task is not None and not self._task.done():
            self._queue.put_nowait(_STOP)
            await self._task
        self._executor.shutdown(wait=True)

    # -- owner task --------------------------------------------------------------------------
    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(self._queued_items)

    async def _next(self, timeout: float | None) -> _Pending[P, R] | object | None:
        """The next queued entry (or _STOP); None if ``timeout`` passes first."""
        if self._carry:
            return self._carry.popleft()
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def _collect(self) -> list[_Pending[P, R]] | None:
        """Gather one batch; None once the stop signal is reached."""
        first = await self._next(None)
        if not isinstance(first, _Pending):
            return None
        batch, size, cost = [first], first.size, first.cost
        flush_at = first.enqueued + self.config.max_wait_s
        while size < self.config.max_batch_size and cost < self.config.max_batch_tokens:
            nxt = await self._next(flush_at - time.monotonic())
            if nxt is None:
                break
            if not isinstance(nxt, _Pending) or (
                size + nxt.size > self.config.max_batch_size
                or cost + nxt.cost > self.config.max_batch_tokens
            ):
                self._carry.append(nxt)
                break
            batch.append(nxt)
            size += nxt.size
            cost += nxt.cost
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while (batch := await self._collect()) is not None:
            self._queued_items -= sum(p.size for p in batch)
            self._set_depth()
            now = time.monotonic()
            live = []
            for pending in batch:
                if pending.future.done():
                    continue  # caller gave up (cancelled or deadline passed in gRPC)
                if pending.deadline is not None and now >= pending.deadline:
                    pending.future.set_exception(
                        DeadlineExceededError("deadline passed while the request was queued")
                    )
                    continue
                live.append(pending)
                if self._metrics is not None:
                    self._metrics.queue_wait.observe(now - pending.enqueued)
            if not live:
                continue
            if self._metrics is not None:
                self._metrics.batch_size.observe(sum(p.size for p in live))
            try:
                results = await loop.run_in_executor(
                    self._executor, self._process, [p.payload for p in live]
                )
                if len(results) != len(live):
                    raise RuntimeError(
                        f"batch returned {len(results)} results for {len(live)} requests"
                    )
            except Exception as exc:
                log.error(
                    "batch failed",
                    extra={"batcher": self._name, "requests": len(live)},
                    exc_info=exc,
                )
                for pending in live:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            for pending, result in zip(live, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)
