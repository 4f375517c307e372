"""Tasks made by the generation service when the labelling queue runs dry: the prompt file, the
source against a real generation service (tiny policy), its failures, and the feedback service
wired to it end to end over HTTP."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from plaudit.services.common.preference_files import read_prompts
from plaudit.services.common.process import free_port
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.feedback.domain import NewTask
from plaudit.services.feedback.settings import FeedbackSettings
from plaudit.services.feedback.store import FeedbackStore
from plaudit.services.feedback.tasks import GenerationTaskSource, TaskPicker
from tests.conftest import ServerThread, write_jsonl
from tests.test_feedback_http import call, next_task

PROMPTS = ["What is the capital of France?", "Name a prime number.", "Say hello."]


# -- the prompt file ---------------------------------------------------------------------------
def test_read_prompts_takes_every_supported_line_once(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": "Plain?"},
            {"prompt": [{"role": "user", "content": "Chat?"}]},
            {"chosen": "\n\nHuman: HH?\n\nAssistant: yes",
             "rejected": "\n\nHuman: HH?\n\nAssistant: no"},
            {"prompt": "TRL?", "chosen": "a", "rejected": "b"},
            {"prompt": "Plain?"},  # a repeat
        ],
    )  # fmt: skip
    assert read_prompts(path) == [
        "Plain?", "\n\nHuman: Chat?\n\nAssistant:", "\n\nHuman: HH?\n\nAssistant:", "TRL?",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("line", "message"),
    [("not json", "2:"), ('{"prompt": 3}', "2: 'prompt' must be"), ('{"prompt": " "}', "2: empty")],
)
def test_read_prompts_names_the_bad_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_prompts(path)


def test_every_prompt_comes_up_once_per_pass() -> None:
    source = GenerationTaskSource("127.0.0.1:1", PROMPTS, rng=random.Random(0))
    try:
        first, second = source._next_prompts(3), source._next_prompts(3)
        assert sorted(first) == sorted(second) == sorted(PROMPTS)
    finally:
        asyncio.run(source.close())


def test_generation_without_prompts_is_refused_at_start_up() -> None:
    with pytest.raises(ValueError, match="task_prompts_file"):
        FeedbackSettings(generation_addr="localhost:50053", auth_disabled=True)


# -- against the generation service ------------------------------------------------------------
def test_the_source_samples_distinct_completions_from_the_promoted_policy(
    generation_server: ServerThread, tiny_policy_registry: Path
) -> None:
    async def fetch() -> list[NewTask]:
        source = GenerationTaskSource(
            generation_server.address, PROMPTS, completions=4, per_fetch=2, max_new_tokens=8
        )
        try:
            return await source.fetch(10)
        finally:
            await source.close()

    tasks = asyncio.run(fetch())
    promoted = ModelRegistry(tiny_policy_registry, "policy").promoted()
    assert 1 <= len(tasks) <= 2  # per_fetch caps the prompts sent
    for task in tasks:
        assert task.prompt in PROMPTS and task.source == "generation"
        assert 2 <= len(task.completions) == len(set(task.completions)) <= 4
        assert all(c.strip() for c in task.completions)
        assert task.metadata["model_version"] == promoted


def test_a_generation_outage_leaves_the_queue_as_it_is(database_url: str) -> None:
    """Nothing listens on the address: the fetch fails, the picker logs it and hands out nothing."""
    source = GenerationTaskSource(f"127.0.0.1:{free_port()}", PROMPTS, timeout_s=2)
    with FeedbackStore(database_url) as store:
        picker = TaskPicker(lambda: store, labels_per_task=1, sources=[source])

        async def scenario() -> object:
            try:
                return await picker.next_task("ann")
            finally:
                await picker.close()

        assert asyncio.run(scenario()) is None
        assert store.tasks.stats(1).total == 0


def test_the_labelling_api_serves_generated_tasks(
    generation_server: ServerThread, tmp_path: Path
) -> None:
    """Feedback service + generation service: an empty queue fills itself from the policy, and
    the annotator's label of a generated task is stored as a comparison."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    feedback = ServerThread(
        "feedback",
        database_url=f"sqlite:///{tmp_path / 'feedback.db'}",
        generation_addr=generation_server.address,
        task_prompts_file=prompts,
        generated_completions=3,
        generation_max_new_tokens=8,
        labels_per_task=1,
        log_level="WARNING",
    ).start()
    try:
        reply = next_task(feedback.http_url, "ann-1")
        task = reply["task"]
        assert task["source"] == "generation" and task["prompt"] in PROMPTS
        assert len(task["completions"]) >= 2 and task["metadata"]["model_version"]
        first, second = task["completions"][:2]
        body = {
            "prompt": task["prompt"], "chosen": first, "rejected": second,
            "annotator_id": "ann-1", "idempotency_key": "generated-1", "task_id": task["task_id"],
        }  # fmt: skip
        status, stored, _ = call(feedback.http_url, "POST", "/api/v1/comparisons", body)
        assert status in (200, 201), stored
    finally:
        feedback.stop()
    with FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}") as store:
        pairs = list(store.export_pairs(after_cursor=0, limit=10))
        assert [(p.chosen, p.rejected) for p in pairs] == [(first, second)]


def test_prompts_file_is_read_by_the_server_settings(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "x"}) + "\n")
    settings = FeedbackSettings(
        generation_addr="127.0.0.1:1", task_prompts_file=path, auth_disabled=True
    )
    picker = TaskPicker.from_settings(lambda: None, settings)  # type: ignore[arg-type, return-value]
    try:
        (source,) = picker.sources
        assert isinstance(source, GenerationTaskSource) and source.prompts == ["x"]
    finally:
        asyncio.run(picker.close())


class CountingSource:
    """A task source whose every fetch makes ``per_fetch`` new tasks."""

    name = "counting"

    def __init__(self, per_fetch: int) -> None:
        self.per_fetch = per_fetch
        self.fetches = 0

    async def fetch(self, limit: int) -> list[NewTask]:
        self.fetches += 1
        return [
            NewTask(prompt=f"p{self.fetches}.{i}", completions=["a", "b"], source=self.name)
            for i in range(min(limit, self.per_fetch))
        ]

    async def close(self) -> None:
        pass


def test_a_low_queue_is_refilled_in_the_background(tmp_path: Path) -> None:
    """After a pick leaves fewer than ``refill_below`` tasks needing labels, new ones are fetched
    behind the annotator's back; a queue with enough left is not refilled."""
    source = CountingSource(per_fetch=2)
    with FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}") as store:
        picker = TaskPicker(lambda: store, labels_per_task=1, sources=[source], refill_below=3)

        async def scenario() -> list[int]:
            totals = []
            try:
                for annotator in ("a", "b"):
                    assert await picker.next_task(annotator) is not None
                    assert picker._refill is not None
                    await picker._refill
                    totals.append(store.tasks.stats(1).total)
            finally:
                await picker.close()
            return totals

        # a: the empty queue is filled at once (2), the pick leaves 2 < 3 pending: refill (4);
        # b: 4 pending (b's lease still needs its label) >= 3: no refill
        assert asyncio.run(scenario()) == [4, 4]
        assert source.fetches == 2


class MixedSource(CountingSource):
    """Each fetch: one task the queue refuses (a completion over the size limit), one good."""

    async def fetch(self, limit: int) -> list[NewTask]:
        self.fetches += 1
        await asyncio.sleep(0.05)  # long enough for every waiting annotator to pile up
        return [
            NewTask(prompt="too long", completions=["x" * 70_000, "y"], source=self.name),
            NewTask(prompt=f"good {self.fetches}", completions=["a", "b"], source=self.name),
        ]


def test_annotators_share_one_fetch_and_a_bad_task_costs_only_itself(tmp_path: Path) -> None:
    source = MixedSource(per_fetch=2)
    with FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}") as store:
        picker = TaskPicker(lambda: store, labels_per_task=5, sources=[source])

        async def scenario() -> list[str | None]:
            try:
                picks = await asyncio.gather(*(picker.next_task(f"a{i}") for i in range(4)))
            finally:
                await picker.close()
            return [None if p is None else p.task.prompt for p in picks]

        assert asyncio.run(scenario()) == ["good 1"] * 4
        assert source.fetches == 1  # four annotators found the queue empty: one fetch
        assert store.tasks.stats(5).total == 1
