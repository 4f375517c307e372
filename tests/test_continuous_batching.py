"""Continuous batching: the decode batch that rows join and leave between steps, and the scheduler
that admits jobs into it (no gRPC: the engine and the batcher on the tiny random policy)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from plaudit.services.common.batching import BatchingConfig
from plaudit.services.common.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    PlauditError,
    ResourceExhaustedError,
)
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.generation.continuous import ContinuousBatcher
from plaudit.services.generation.engine import GenerationEngine
from plaudit.services.runtime.policy_model import (
    DecodeBatch,
    FinishReason,
    GenerateJob,
    GenerateResult,
    LoadedPolicy,
    SamplingParams,
    generate,
)

T = TypeVar("T")
LONG = "Tell me everything you know about the history of the Roman Empire, please."


@pytest.fixture(scope="module")
def policy(tiny_policy_registry: Path) -> LoadedPolicy:
    """The tiny policy with no end-of-sequence token: rows end only at their budget, so the
    tests decide how long each job decodes."""
    reg = ModelRegistry(tiny_policy_registry, "policy")
    model = LoadedPolicy.load(reg, reg.promoted() or "", provider="cpu")
    model.eos_ids = frozenset()
    return model


def greedy(prompt: str, tokens: int) -> GenerateJob:
    return GenerateJob(prompt=prompt, params=SamplingParams(temperature=0.0, max_new_tokens=tokens))


def sampled(prompt: str, n: int, seed: int, tokens: int) -> GenerateJob:
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=seed, max_new_tokens=tokens)
    return GenerateJob(prompt=prompt, n=n, params=params)


def alone(model: LoadedPolicy, job: GenerateJob) -> list[list[int]]:
    ids = model.encode(job)
    (result,) = generate(model, [job], [ids], [job.params.max_new_tokens])
    return [c.token_ids for c in result.completions]


def admit(batch: DecodeBatch, job: GenerateJob) -> list[list[int]]:
    """Admit ``job`` and return the live token lists of its rows."""
    (handle,) = batch.admit([job], [batch.model.encode(job)], [job.params.max_new_tokens])
    return [row.tokens for row in handle.rows]


# -- the decode batch --------------------------------------------------------------------------
def test_left_padding_a_cache_adds_masked_columns_in_front() -> None:
    from plaudit.services.runtime.policy_model import _left_pad

    mask = np.array([[1, 1], [0, 1]])
    assert _left_pad(mask, 4).tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    cache = np.ones((2, 1, 2, 3), dtype=np.float32)
    padded = _left_pad(cache, 3)
    assert padded.shape == (2, 1, 3, 3)
    assert padded[:, :, 0].sum() == 0 and padded[:, :, 1:].sum() == 12
    assert _left_pad(mask, 2) is mask


def test_jobs_that_join_mid_decode_get_what_they_would_get_alone(policy: LoadedPolicy) -> None:
    """A greedy job and a seeded sampled job (n=3) join a batch already decoding a longer prompt,
    at different steps; every completion equals the one generated with nothing beside it."""
    first = greedy(LONG, 30)
    second = sampled("Hi", 3, seed=11, tokens=12)
    third = greedy("What is 2 + 2?", 5)
    batch = DecodeBatch(policy)
    got_first = admit(batch, first)
    for _ in range(4):
        batch.step()
    got_second = admit(batch, second)
    assert batch.rows == 4
    batch.step()
    got_third = admit(batch, third)
    while batch.rows:
        batch.step()
    assert got_first == alone(policy, first)
    assert got_second == alone(policy, second)
    assert got_third == alone(policy, third)
    assert [len(t) for t in got_second] == [12, 12, 12]


def test_finished_rows_leave_at_once_and_their_cache_columns_go(policy: LoadedPolicy) -> None:
    batch = DecodeBatch(policy)
    admit(batch, greedy(LONG, 3))
    long_prompt = batch.width
    admit(batch, greedy("Hi", 20))
    assert batch.rows == 2 and batch.width == long_prompt
    finished = []
    for _ in range(3):
        finished += batch.step()
    assert len(finished) == 1 and finished[0].job.prompt == LONG
    assert batch.rows == 1
    # the short prompt's row attends to its own prompt and 3 tokens only: the rest was padding
    hi = len(policy.encode(greedy("Hi", 1)))
    assert batch.width == hi + 3
    (result,) = [h.result(policy.version) for h in finished]
    assert result.first_token_at is not None and result.finished_at is not None
    assert result.finished_at >= result.first_token_at
    assert [c.finish_reason for c in result.completions] == [FinishReason.LENGTH]


def test_a_dropped_job_leaves_and_the_others_continue(policy: LoadedPolicy) -> None:
    batch = DecodeBatch(policy)
    kept = greedy("What is 2 + 2?", 8)
    got = admit(batch, kept)
    (gone,) = batch.admit([greedy(LONG, 50)], [policy.encode(greedy(LONG, 1))], [50])
    batch.step()
    batch.drop([gone])
    assert batch.rows == 1
    while batch.rows:
        batch.step()
    assert got == alone(policy, kept)


# -- the scheduler -------------------------------------------------------------------------------
def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


class Started:
    """A stream sink that tells the test when its job joined the batch, and counts its text."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.pieces = 0

    def started(self, version: str) -> None:
        self.loop.call_soon_threadsafe(self.event.set)

    def text(self, index: int, delta: str) -> None:
        self.pieces += 1


def engine_for(model: LoadedPolicy) -> GenerationEngine:
    engine = GenerationEngine(max_new_tokens=1024)
    engine.set_model(model)
    return engine


def result_of(outcome: GenerateResult | PlauditError) -> GenerateResult:
    assert isinstance(outcome, GenerateResult), outcome
    return outcome


def test_a_request_arriving_mid_decode_finishes_before_the_long_one(
    policy: LoadedPolicy,
) -> None:
    """The short request joins the running batch: it ends while the long one still decodes (a
    static batcher would make it wait for the whole long request)."""

    async def scenario() -> None:
        batcher = ContinuousBatcher(engine_for(policy), BatchingConfig(max_batch_size=8))
        batcher.start()
        sink = Started()
        long_job = dataclasses.replace(greedy(LONG, 200), sink=sink)
        long_task = asyncio.create_task(batcher.submit(long_job, size=1))
        await asyncio.wait_for(sink.event.wait(), 30)
        short = result_of(await batcher.submit(greedy("Hi", 3), size=1))
        assert not long_task.done()
        assert [len(c.token_ids) for c in short.completions] == [3]
        long = result_of(await long_task)
        assert [len(c.token_ids) for c in long.completions] == [200]
        assert long.completions[0].token_ids == alone(policy, greedy(LONG, 200))[0]
        assert sink.pieces > 1  # streamed as it decoded
        await batcher.close()

    run(scenario())


def test_after_a_swap_new_jobs_wait_for_the_old_batch_and_run_on_the_new_version(
    policy: LoadedPolicy,
) -> None:
    newer = dataclasses.replace(
        policy, manifest=policy.manifest.model_copy(update={"version": "policy-newer"})
    )
    newer.eos_ids = frozenset()

    async def scenario() -> None:
        engine = engine_for(policy)
        batcher = ContinuousBatcher(engine, BatchingConfig(max_batch_size=8))
        batcher.start()
        sink = Started()
        old_task = asyncio.create_task(
            batcher.submit(dataclasses.replace(greedy(LONG, 60), sink=sink))
        )
        await asyncio.wait_for(sink.event.wait(), 30)
        engine.set_model(newer)
        new = result_of(await batcher.submit(greedy("Hi", 2)))
        assert old_task.done()  # it waited for the old batch to drain
        old = result_of(await old_task)
        assert (old.version, new.version) == (policy.version, "policy-newer")
        await batcher.close()

    run(scenario())


def test_refused_expired_and_overflowing_jobs_fail_alone(policy: LoadedPolicy) -> None:
    async def scenario() -> None:
        config = BatchingConfig(max_batch_size=4, max_queue_items=4)
        batcher = ContinuousBatcher(engine_for(policy), config)
        batcher.start()
        sink = Started()
        busy = asyncio.create_task(
            batcher.submit(dataclasses.replace(greedy(LONG, 100), sink=sink), size=1)
        )
        await asyncio.wait_for(sink.event.wait(), 30)
        refused = await batcher.submit(GenerateJob(prompt="x" * 5000), size=1)
        assert isinstance(refused, InvalidArgumentError) and refused.field == "prompt"
        with pytest.raises(DeadlineExceededError):
            await batcher.submit(greedy("Hi", 2), size=1, timeout=0)
        with pytest.raises(ResourceExhaustedError):
            await batcher.submit(greedy("Hi", 2), size=5)
        result_of(await busy)
        await batcher.close()

    run(scenario())


def test_a_cancelled_caller_frees_its_rows_and_close_finishes_the_rest(
    policy: LoadedPolicy,
) -> None:
    async def scenario() -> None:
        batcher = ContinuousBatcher(engine_for(policy), BatchingConfig(max_batch_size=8))
        batcher.start()
        sink = Started()
        doomed = asyncio.create_task(
            batcher.submit(dataclasses.replace(greedy(LONG, 250), sink=sink), size=1)
        )
        await asyncio.wait_for(sink.event.wait(), 30)
        doomed.cancel()
        queued = [asyncio.create_task(batcher.submit(greedy("Hi", 4), size=1)) for _ in range(3)]
        for outcome in await asyncio.gather(*queued):
            assert len(result_of(outcome).completions[0].token_ids) == 4
        # the cancelled job's 250 rows-steps are not being decoded any more
        assert batcher._batch is None or batcher._batch.rows == 0
        assert doomed.cancelled()
        last = asyncio.create_task(batcher.submit(greedy("Hi", 30), size=1))
        await asyncio.sleep(0)
        await batcher.close()  # finishes what is queued or decoding
        assert len(result_of(last.result()).completions[0].token_ids) == 30

    run(scenario())


def test_a_burst_is_prefilled_a_few_prompt_tokens_at_a_time_in_arrival_order(
    policy: LoadedPolicy,
) -> None:
    """With room for one prompt per step, three jobs sent together join at three successive
    steps: the first sent samples its first token first, and all get their own completions."""

    async def scenario() -> None:
        config = BatchingConfig(max_batch_size=8)
        batcher = ContinuousBatcher(engine_for(policy), config, prefill_tokens=1)
        batcher.start()
        jobs = [greedy(LONG, 6), greedy("Hi", 6), greedy("What is 2 + 2?", 6)]
        results = [result_of(r) for r in await asyncio.gather(*map(batcher.submit, jobs))]
        firsts = [r.first_token_at or 0.0 for r in results]
        assert 0.0 not in firsts and firsts == sorted(firsts) and len(set(firsts)) == 3
        for job, result in zip(jobs, results, strict=True):
            assert [c.token_ids for c in result.completions] == alone(policy, job)
        await batcher.close()

    run(scenario())


# -- over gRPC -----------------------------------------------------------------------------------
@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_both_batching_modes_answer_concurrent_callers_alike(
    batching: str, tiny_policy_registry: Path, policy: LoadedPolicy
) -> None:
    """Eight callers at once with mixed prompts and budgets, through the real service: each gets
    the greedy tokens its request gets alone, in either mode."""
    from concurrent.futures import ThreadPoolExecutor

    from plaudit.services.generation.client import GenerationClient
    from tests.conftest import ServerThread

    prompts = [LONG, "Hi", "What is 2 + 2?", "Tell me a joke about cats and dogs."]
    server = ServerThread(
        "generation", registry=tiny_policy_registry, batching=batching, log_level="WARNING"
    ).start()
    try:
        with GenerationClient(server.address) as client, ThreadPoolExecutor(8) as pool:
            replies = list(
                pool.map(
                    lambda i: client.generate(
                        prompts[i % 4], temperature=0.0, max_new_tokens=4 + 3 * i
                    ),
                    range(8),
                )
            )
    finally:
        server.stop()
    reference = LoadedPolicy.load(
        ModelRegistry(tiny_policy_registry, "policy"), policy.version, provider="cpu"
    )
    for i, reply in enumerate(replies):
        expected = alone(reference, greedy(prompts[i % 4], 4 + 3 * i))[0]
        assert list(reply.completions[0].token_ids) == expected


class FailingSink:
    """A stream sink whose owner breaks when told the job started."""

    def started(self, version: str) -> None:
        raise RuntimeError("sink broke")

    def text(self, index: int, delta: str) -> None:
        pass


def test_an_unexpected_error_fails_its_job_and_the_scheduler_goes_on(
    policy: LoadedPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing sink (at admission) and a bug in budgeting fail their own jobs only; the batch
    decoding beside them finishes and later jobs are served."""
    model = dataclasses.replace(policy)
    model.eos_ids = frozenset()
    budget = model.token_budget

    def token_budget(job: GenerateJob, prompt_tokens: int, limit: int) -> int:
        if job.prompt == "boom":
            raise ValueError("a bug")
        return budget(job, prompt_tokens, limit)

    monkeypatch.setattr(model, "token_budget", token_budget)

    async def scenario() -> None:
        batcher = ContinuousBatcher(engine_for(model), BatchingConfig(max_batch_size=8))
        batcher.start()
        sink = Started()
        running = asyncio.create_task(
            batcher.submit(dataclasses.replace(greedy(LONG, 40), sink=sink))
        )
        await asyncio.wait_for(sink.event.wait(), 30)
        with pytest.raises(RuntimeError, match="sink broke"):
            await batcher.submit(dataclasses.replace(greedy("Hi", 3), sink=FailingSink()))
        with pytest.raises(ValueError, match="a bug"):
            await batcher.submit(GenerateJob(prompt="boom"))
        after = result_of(await batcher.submit(greedy("What is 2 + 2?", 3)))
        assert [len(c.token_ids) for c in after.completions] == [3]
        assert [len(c.token_ids) for c in result_of(await running).completions] == [40]
        await batcher.close()

    run(scenario())


def test_expired_jobs_leave_the_queue_while_a_swap_drains_the_old_batch(
    policy: LoadedPolicy,
) -> None:
    """While the old version's batch drains nothing joins; a job whose deadline passes meanwhile
    is answered DEADLINE_EXCEEDED at once and frees its queue room for the next caller."""
    newer = dataclasses.replace(
        policy, manifest=policy.manifest.model_copy(update={"version": "policy-newer"})
    )

    async def scenario() -> None:
        engine = engine_for(policy)
        batcher = ContinuousBatcher(engine, BatchingConfig(max_batch_size=8, max_queue_items=2))
        batcher.start()
        sink = Started()
        old = asyncio.create_task(batcher.submit(dataclasses.replace(greedy(LONG, 220), sink=sink)))
        await asyncio.wait_for(sink.event.wait(), 30)
        engine.set_model(newer)
        with pytest.raises(DeadlineExceededError):
            await batcher.submit(greedy("Hi", 2), size=2, timeout=0.01)
        assert not old.done()  # answered before the old batch drained
        new = result_of(await batcher.submit(greedy("Hi", 2), size=2))  # the room is free
        assert new.version == "policy-newer"
        assert result_of(await old).version == policy.version
        await batcher.close()

    run(scenario())
