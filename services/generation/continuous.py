"""Continuous batching for Plaudit's own engine: a request that arrives while others decode joins
the running batch at the next step, and a finished row leaves at once.

One scheduler thread drives one :class:`~plaudit.services.runtime.policy_model.DecodeBatch`.
Between two decode steps it takes waiting jobs, in arrival order, as many as fit in
``max_batch_rows`` rows, ``max_batch_tokens`` estimated tokens and ``prefill_tokens`` prompt
tokens (a longer prompt still goes alone), prefills them in one graph call and merges them in;
then it steps every row once. So a burst of long prompts is prefilled over several steps while
the running rows keep decoding, and the earliest arrivals see their first token first. A job's
result is handed to its caller the step its last row ends.

Invariants:

* A batch decodes on one model version. After a hot swap nothing more joins it; it finishes on
  the version it started with, and waiting jobs start a new batch on the new one (so a response
  never mixes versions, and no request fails because of a swap).
* A job whose prompt is refused gets its own error; a failed prefill fails only the jobs it
  admitted; a failed step fails the jobs of that batch. The scheduler thread keeps running.
* The queue is bounded (``max_queue_items`` completions: RESOURCE_EXHAUSTED beyond it); a job
  whose deadline passes while it waits gets DEADLINE_EXCEEDED; a job whose caller gives up
  (cancelled) is skipped, or its rows leave the batch at the next step.
* :meth:`ContinuousBatcher.close` refuses new jobs and finishes everything queued or decoding.

The interface is :class:`~plaudit.services.common.batching.Batcher`'s, so the backend and the
server use either batcher the same way (``--batching static`` keeps the flush batcher).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from plaudit.services.common.batching import BatchingConfig, BatchMetrics
from plaudit.services.common.errors import (
    DeadlineExceededError,
    PlauditError,
    ResourceExhaustedError,
    UnavailableError,
)
from plaudit.services.generation.engine import GenerationEngine
from plaudit.services.runtime.policy_model import (
    DecodeBatch,
    GenerateJob,
    GenerateResult,
    JobHandle,
)

log = logging.getLogger(__name__)

Outcome = GenerateResult | PlauditError


@dataclass(eq=False)
class _Waiting:
    job: GenerateJob
    size: int  # completions (rows)
    cost: int  # estimated tokens
    deadline: float | None
    future: asyncio.Future[Outcome]
    enqueued: float = field(default_factory=time.monotonic)
    ids: list[int] | None = None  # the prompt as ``encoded_by`` encoded it
    encoded_by: object = None
    handle: JobHandle | None = None
    gone: bool = False  # the caller gave up (set on the event loop)


def _wanted(waiting: _Waiting, now: float) -> bool:
    """Still to be generated: its caller waits and its deadline has not passed."""
    return not (
        waiting.gone
        or waiting.future.done()
        or (waiting.deadline is not None and now >= waiting.deadline)
    )


class ContinuousBatcher:
    """Admits jobs into the running decode batch between steps; see the module doc."""

    def __init__(
        self,
        engine: GenerationEngine,
        config: BatchingConfig,
        *,
        prefill_tokens: int = 512,
        metrics: BatchMetrics | None = None,
        name: str = "generation-continuous",
    ) -> None:
        self._engine = engine
        self.config = config
        self._prefill_tokens = prefill_tokens
        self._metrics = metrics
        self._name = name
        self._ready = threading.Condition()
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._queued_items = 0
        self._accepting = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # owned by the scheduler thread
        self._batch: DecodeBatch | None = None
        self._running: list[_Waiting] = []
        self._running_cost = 0

    @property
    def queued_items(self) -> int:
        return self._queued_items

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    async def submit(
        self, payload: GenerateJob, *, size: int = 1, cost: int = 1, timeout: float | None = None
    ) -> Outcome:
        """Queue ``payload`` (``size`` rows, ``cost`` estimated tokens) and wait for its
        outcome; ``timeout`` is the caller's remaining time."""
        if not self._accepting:
            raise UnavailableError("server is shutting down")
        if self._thread is not None and not self._thread.is_alive():
            raise UnavailableError("the generation scheduler stopped; see the service log")
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        deadline = None if timeout is None else time.monotonic() + timeout
        waiting = _Waiting(payload, size, cost, deadline, future)
        with self._ready:
            if self._queued_items + size > self.config.max_queue_items:
                raise ResourceExhaustedError(
                    f"queue full ({self._queued_items} items waiting, limit "
                    f"{self.config.max_queue_items}); retry later"
                )
            self._queued_items += size
            self._waiting.append(waiting)
            self._set_depth()
            self._ready.notify()
        future.add_done_callback(lambda f: self._gave_up(waiting, f))
        return await future

    def _gave_up(self, waiting: _Waiting, future: asyncio.Future[Outcome]) -> None:
        if future.cancelled():
            waiting.gone = True

    async def close(self) -> None:
        """Refuse new jobs, finish every queued and running one, stop the thread."""
        self._accepting = False
        with self._ready:
            self._stopping = True
            self._ready.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # -- the scheduler thread ----------------------------------------------------------------
    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(self._queued_items)

    def _resolve(self, waiting: _Waiting, outcome: Outcome) -> None:
        assert self._loop is not None

        def deliver() -> None:
            if not waiting.future.done():
                waiting.future.set_result(outcome)

        self._loop.call_soon_threadsafe(deliver)

    def _fail(self, waiting: _Waiting, exc: BaseException) -> None:
        assert self._loop is not None

        def deliver() -> None:
            if not waiting.future.done():
                waiting.future.set_exception(exc)

        self._loop.call_soon_threadsafe(deliver)

    def _take(self) -> list[_Waiting]:
        """Waiting jobs that fit beside the running rows (called holding the lock), and those
        no longer wanted anywhere in the queue (they cost nothing; :meth:`_admit` answers the
        expired ones). Nothing joins a batch whose version is no longer live; a job larger than
        an empty batch's budget still runs alone."""
        now = time.monotonic()
        taken = [w for w in self._waiting if not _wanted(w, now)]
        if taken:
            self._waiting = collections.deque(w for w in self._waiting if _wanted(w, now))
            self._queued_items -= sum(w.size for w in taken)
        batch = self._batch
        rows = batch.rows if batch is not None else 0
        stale = batch is not None and rows > 0 and batch.model is not self._engine.model
        cost = self._running_cost
        first = True
        while self._waiting and not stale:
            nxt = self._waiting[0]
            if not (rows == 0 and first) and (
                rows + nxt.size > self.config.max_batch_size
                or cost + nxt.cost > self.config.max_batch_tokens
            ):
                break
            self._waiting.popleft()
            self._queued_items -= nxt.size
            rows += nxt.size
            cost += nxt.cost
            taken.append(nxt)
            first = False
        self._set_depth()
        return taken

    def _put_back(self, waitings: list[_Waiting]) -> None:
        """Return jobs to the front of the queue, in order (they join at a later step)."""
        with self._ready:
            self._waiting.extendleft(reversed(waitings))
            self._queued_items += sum(w.size for w in waitings)
            self._set_depth()

    def _run(self) -> None:
        """The scheduler loop. An unexpected error fails the jobs it concerns (those being
        admitted, or the batch's) and the loop goes on: it never dies with requests waiting."""
        while True:
            with self._ready:
                while not self._waiting and not self._running and not self._stopping:
                    self._ready.wait()
                if self._stopping and not self._waiting and not self._running:
                    return
                taken = self._take()
            if taken:
                try:
                    self._admit(taken)
                except Exception as exc:
                    log.error("admission failed", exc_info=exc)
                    running = set(map(id, self._running))
                    for waiting in taken:
                        if id(waiting) not in running:
                            self._fail(waiting, exc)
            if self._running:
                try:
                    self._step()
                except Exception as exc:
                    log.error("decode step failed", exc_info=exc)
                    self._fail_batch(exc)
            elif self._batch is not None and self._batch.rows:
                self._batch = None  # rows nobody waits for any more: drop them

    def _fail_batch(self, exc: BaseException) -> None:
        """Fail every job of the batch and start the next one afresh."""
        for waiting in self._running:
            self._fail(waiting, exc)
        self._forget(list(self._running))
        self._batch = None

    def _admit(self, taken: list[_Waiting]) -> None:
        """Prefill the jobs of ``taken`` that are still wanted, at most ``prefill_tokens``
        prompt tokens (the first job always), and merge them into the batch; the rest go back
        to the front of the queue for the next step, so prefills interleave with decode steps
        and the earliest arrivals start first."""
        now = time.monotonic()
        live: list[_Waiting] = []
        for waiting in taken:
            if _wanted(waiting, now):
                live.append(waiting)
            elif not (waiting.gone or waiting.future.done()):
                self._fail(waiting, DeadlineExceededError("deadline passed while queued"))
        if not live:
            return
        if self._batch is None or not self._batch.rows:
            try:
                self._batch = DecodeBatch(self._engine.require_model())
            except PlauditError as exc:
                for waiting in live:
                    self._fail(waiting, exc)
                return
        batch = self._batch
        model = batch.model  # encodes, budgets and decodes: one version per response
        ready: list[_Waiting] = []
        prompts: list[list[int]] = []
        budgets: list[int] = []
        tokens = 0
        for i, waiting in enumerate(live):
            try:
                cached = waiting.ids is not None and waiting.encoded_by is model
                ids = waiting.ids if cached and waiting.ids else model.encode(waiting.job)
            except PlauditError as exc:
                self._resolve(waiting, exc)
                continue
            if ready and tokens + len(ids) > self._prefill_tokens:
                waiting.ids, waiting.encoded_by = ids, model
                self._put_back(live[i:])
                break
            tokens += len(ids)
            ready.append(waiting)
            prompts.append(ids)
            budgets.append(model.token_budget(waiting.job, len(ids), self._engine.max_new_tokens))
        if not ready:
            return
        if self._metrics is not None:
            for waiting in ready:
                self._metrics.queue_wait.observe(now - waiting.enqueued)
        try:
            handles = batch.admit([w.job for w in ready], prompts, budgets)
        except Exception as exc:
            log.error("prefill failed", extra={"requests": len(ready)}, exc_info=exc)
            for waiting in ready:
                self._fail(waiting, exc)
            return
        for waiting, handle in zip(ready, handles, strict=True):
            waiting.handle = handle
            self._running.append(waiting)
            self._running_cost += waiting.cost

    def _step(self) -> None:
        batch = self._batch
        assert batch is not None
        gone = [w for w in self._running if w.gone]
        if gone:
            batch.drop([w.handle for w in gone if w.handle is not None])
            self._forget(gone)
            if not batch.rows:
                return
        if self._metrics is not None:
            self._metrics.batch_size.observe(batch.rows)
        try:
            finished = batch.step()
        except Exception as exc:
            log.error("decode step failed", extra={"requests": len(self._running)}, exc_info=exc)
            self._answer(batch, batch.ended)  # complete before the failed graph call
            self._fail_batch(exc)
            return
        self._answer(batch, finished)

    def _answer(self, batch: DecodeBatch, finished: list[JobHandle]) -> None:
        """Hand the ``finished`` jobs of ``batch`` their results."""
        if finished:
            ended = {id(h) for h in finished}
            done = [w for w in self._running if w.handle is not None and id(w.handle) in ended]
            for waiting in done:
                assert waiting.handle is not None
                self._resolve(waiting, waiting.handle.result(batch.model.version))
            self._forget(done)

    def _forget(self, waitings: list[_Waiting]) -> None:
        gone = set(map(id, waitings))
        self._running = [w for w in self._running if id(w) not in gone]
        self._running_cost -= sum(w.cost for w in waitings)
