"""The dynamic batcher on its own: flush rules, failures, limits, deadlines, draining."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import pytest

from plaudit.services.common.batching import BatchingConfig, DynamicBatcher
from plaudit.services.common.errors import (
    DeadlineExceededError,
    ResourceExhaustedError,
    UnavailableError,
)

T = TypeVar("T")


class Recorder:
    """A process function that doubles its inputs and records every batch it saw."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.fail = fail
        self.threads: set[str] = set()

    def __call__(self, payloads: Sequence[int]) -> list[int]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(payloads))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("model exploded")
        return [2 * p for p in payloads]


def run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(coro_fn())


def test_flushes_when_the_batch_is_full() -> None:
    rec = Recorder()

    async def main() -> list[int]:
        batcher = DynamicBatcher(rec, BatchingConfig(max_batch_size=4, max_wait_s=10))
        batcher.start()
        results = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(i) for i in range(8))), timeout=5
        )
        await batcher.close()
        return list(results)

    assert run(main) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert rec.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]  # size flush, never a 10 s wait


def test_flushes_after_max_wait_with_a_partial_batch() -> None:
    rec = Recorder()

    async def main() -> tuple[int, float]:
        batcher = DynamicBatcher(rec, BatchingConfig(max_batch_size=64, max_wait_s=0.05))
        batcher.start()
        t0 = time.monotonic()
        result = await batcher.submit(21)
        elapsed = time.monotonic() - t0
        await batcher.close()
        return result, elapsed

    result, elapsed = run(main)
    assert result == 42
    assert 0.04 <= elapsed < 1.0
    assert rec.batches == [[21]]


def test_token_budget_cuts_batches_and_requests_are_never_split() -> None:
    rec = Recorder()

    async def main() -> None:
        batcher = DynamicBatcher(
            rec, BatchingConfig(max_batch_size=100, max_batch_tokens=100, max_wait_s=0.2)
        )
        batcher.start()
        await asyncio.gather(*(batcher.submit(i, size=3, cost=40) for i in range(5)))
        await batcher.close()

    run(main)
    # 40 + 40 fits in 100, a third would not: pairs of requests, each request whole
    assert rec.batches == [[0, 1], [2, 3], [4]]


def test_a_failure_reaches_every_caller_in_the_batch_and_the_batcher_survives() -> None:
    rec = Recorder(fail=True)

    async def main() -> tuple[list[object], int]:
        batcher = DynamicBatcher(rec, BatchingConfig(max_batch_size=3, max_wait_s=0.5))
        batcher.start()
        outcomes = await asyncio.gather(
            *(batcher.submit(i) for i in range(3)), return_exceptions=True
        )
        rec.fail = False
        after = await batcher.submit(5)
        await batcher.close()
        return list(outcomes), after

    outcomes, after = run(main)
    assert all(isinstance(o, RuntimeError) and "exploded" in str(o) for o in outcomes)
    assert after == 10


def test_wrong_result_count_fails_the_batch_instead_of_misrouting() -> None:
    async def main() -> None:
        batcher: DynamicBatcher[int, int] = DynamicBatcher(
            lambda ps: [1], BatchingConfig(max_batch_size=2, max_wait_s=1)
        )
        batcher.start()
        outcomes = await asyncio.gather(
            batcher.submit(1), batcher.submit(2), return_exceptions=True
        )
        await batcher.close()
        assert all(isinstance(o, RuntimeError) for o in outcomes)

    run(main)


def test_full_queue_is_refused_at_once() -> None:
    rec = Recorder(delay=0.3)

    async def main() -> None:
        batcher = DynamicBatcher(
            rec, BatchingConfig(max_batch_size=1, max_wait_s=0, max_queue_items=2)
        )
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(1, size=2))
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhaustedError, match="queue full"):
            await batcher.submit(2)
        assert await first == 2
        await batcher.close()

    run(main)


def test_expired_requests_are_skipped_before_the_model_runs() -> None:
    rec = Recorder(delay=0.2)

    async def main() -> None:
        batcher = DynamicBatcher(rec, BatchingConfig(max_batch_size=1, max_wait_s=0))
        batcher.start()
        busy = asyncio.ensure_future(batcher.submit(1))  # occupies the worker for 0.2 s
        await asyncio.sleep(0.01)
        with pytest.raises(DeadlineExceededError):
            await batcher.submit(2, timeout=0.05)
        assert await busy == 2
        await batcher.close()

    run(main)
    assert rec.batches == [[1]]  # the expired request never reached the model


def test_cancelled_requests_are_skipped() -> None:
    rec = Recorder(delay=0.2)

    async def main() -> None:
        batcher = DynamicBatcher(rec, BatchingConfig(max_batch_size=1, max_wait_s=0))
        batcher.start()
        busy = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.01)
        doomed = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0.01)
        doomed.cancel()
        assert await busy == 2
        assert await batcher.submit(3) == 6
        await batcher.close()

    run(main)
    assert [2] not in rec.batches


def test_close_drains_queued_work_then_refuses_new_work() -> None:
    rec = Recorder(delay=0.05)

    async def main() -> list[int]:
        batcher = DynamicBatcher(rec, BatchingConfig(max_batch_size=2, max_wait_s=0))
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(i)) for i in range(6)]
        await asyncio.sleep(0)
        await batcher.close()
        with pytest.raises(UnavailableError):
            await batcher.submit(99)
        return [p.result() for p in pending]  # all done: close() waited for them

    assert run(main) == [0, 2, 4, 6, 8, 10]


def test_inference_runs_off_the_event_loop() -> None:
    rec = Recorder(delay=0.2)

    async def main() -> int:
        batcher = DynamicBatcher(rec, BatchingConfig(max_batch_size=1, max_wait_s=0))
        batcher.start()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        await batcher.submit(1)
        task.cancel()
        await batcher.close()
        return ticks

    assert run(main) >= 5  # the loop kept ticking while the batch slept in its thread
    assert all(name != "MainThread" for name in rec.threads)
