"""The reward clients (deadlines, retries, chunking, one model version per call) and the TRL
reward function, against real gRPC servers: the served tiny reward model, or a small scripted
``RewardService`` on port 0 where a test needs failures or a model swap on cue."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from plaudit.services.common.process import free_port
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.reward.client import (
    AsyncRewardClient,
    RetryPolicy,
    RewardClient,
    RewardRpcError,
    channel_target,
    domain_error,
)
from plaudit.services.reward.trl import AsyncPlauditReward, PlauditReward, score_pair
from plaudit.v1 import reward_pb2, reward_pb2_grpc
from tests.conftest import ServerThread

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.05, max_backoff_s=0.2)


class ScriptedReward(reward_pb2_grpc.RewardServiceServicer):
    """Scores ``float(completion)``; fails the first ``fail_first`` calls with ``code``, sleeps
    ``delay_s`` per call, and names the version ``version(call number)`` (v2 adds 1000)."""

    def __init__(
        self,
        fail_first: int = 0,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        delay_s: float = 0.0,
        version: Callable[[int], str] = lambda n: "v1",
    ) -> None:
        self.fail_first, self.code, self.delay_s, self.version = fail_first, code, delay_s, version
        self.sizes: list[int] = []  # items per call, failed calls included
        self._lock = threading.Lock()

    def Score(self, request: reward_pb2.ScoreRequest, context: Any) -> reward_pb2.ScoreResponse:
        with self._lock:
            self.sizes.append(len(request.items))
            n = len(self.sizes)
        if n <= self.fail_first:
            context.abort(self.code, f"scripted failure {n}")
        time.sleep(self.delay_s)
        version = self.version(n)
        bonus = 1000.0 if version == "v2" else 0.0
        return reward_pb2.ScoreResponse(
            rewards=[float(item.completion) + bonus for item in request.items],
            model_version=version,
        )


@contextmanager
def scripted(servicer: ScriptedReward, port: int = 0) -> Iterator[str]:
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    reward_pb2_grpc.add_RewardServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


NUMBERS = [str(i) for i in range(23)]


# -- chunking ------------------------------------------------------------------------------------
def test_chunks_are_reassembled_in_input_order() -> None:
    servicer = ScriptedReward()
    with scripted(servicer) as address, RewardClient(address, max_items_per_request=4) as client:
        rewards, version = client.score(["q"] * 23, NUMBERS)
        assert client.score([], []) == ([], "")
    assert rewards == [float(i) for i in range(23)] and version == "v1"
    assert servicer.sizes == [4, 4, 4, 4, 4, 3]


def test_chunked_scores_match_one_request_on_the_served_model(
    reward_server: ServerThread, tiny_registry: Path
) -> None:
    prompts = [f"question {i % 3}?" for i in range(11)]
    completions = [f"answer number {i} " + "word " * i for i in range(11)]
    with RewardClient(reward_server.address) as whole:
        expected, version = whole.score(prompts, completions)
    with RewardClient(reward_server.address, max_items_per_request=3) as chunked:
        got, chunked_version = chunked.score(prompts, completions)
    assert got == pytest.approx(expected, abs=1e-4)
    assert len(set(expected)) == 11  # distinct rewards: a reordering would show
    assert version == chunked_version == ModelRegistry(tiny_registry, "reward").promoted()


def test_a_model_swap_between_chunks_is_scored_again_by_the_new_version() -> None:
    servicer = ScriptedReward(version=lambda n: "v1" if n <= 2 else "v2")
    with scripted(servicer) as address, RewardClient(address, max_items_per_request=10) as client:
        rewards, version = client.score(["q"] * 23, NUMBERS)
    assert version == "v2"
    assert rewards == [1000.0 + i for i in range(23)]  # every reward is v2's
    assert servicer.sizes == [10, 10, 3, 10, 10]  # chunks 1 and 2 again


# -- retries and deadlines -------------------------------------------------------------------------
def test_unavailable_is_retried() -> None:
    servicer = ScriptedReward(fail_first=2)
    with scripted(servicer) as address, RewardClient(address, retry=FAST_RETRY) as client:
        assert client.score(["q", "q"], ["1", "2"]) == ([1.0, 2.0], "v1")
    assert len(servicer.sizes) == 3


def test_retries_stop_after_max_attempts() -> None:
    servicer = ScriptedReward(fail_first=10)
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.01)
    with (
        scripted(servicer) as address,
        RewardClient(address, retry=retry) as client,
        pytest.raises(RewardRpcError) as err,
    ):
        client.score(["q"], ["1"])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.attempts == 3 and "3 attempt(s)" in err.value.details()
    assert "scripted failure 3" in err.value.details()
    assert len(servicer.sizes) == 3
    assert isinstance(domain_error(address, err.value), Exception)  # relays like before


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT]
)
def test_other_errors_are_not_retried(code: grpc.StatusCode) -> None:
    servicer = ScriptedReward(fail_first=10, code=code)
    with (
        scripted(servicer) as address,
        RewardClient(address, retry=FAST_RETRY) as client,
        pytest.raises(grpc.RpcError) as err,
    ):
        client.score(["q"], ["1"])
    assert err.value.code() == code
    assert len(servicer.sizes) == 1


def test_a_server_that_starts_late_is_reached_by_retrying() -> None:
    port = free_port()
    servicer = ScriptedReward()
    started = threading.Event()

    def start_later() -> None:
        time.sleep(0.5)
        with scripted(servicer, port):
            started.set()
            time.sleep(15)

    threading.Thread(target=start_later, daemon=True).start()
    retry = RetryPolicy(max_attempts=10, initial_backoff_s=0.2, max_backoff_s=1.0)
    with RewardClient(f"127.0.0.1:{port}", retry=retry, timeout_s=14) as client:
        assert client.score(["q"], ["7"]) == ([7.0], "v1")
    assert started.is_set()


def test_the_deadline_bounds_the_whole_call() -> None:
    servicer = ScriptedReward(delay_s=1.5)
    with scripted(servicer) as address, RewardClient(address, retry=FAST_RETRY) as client:
        start = time.monotonic()
        with pytest.raises(RewardRpcError) as err:
            client.score(["q"], ["1"], timeout=0.3)
        elapsed = time.monotonic() - start
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no answer within the call's 0.3 s deadline" in err.value.details()
    assert f"reward service at {address}" in str(err.value)
    assert elapsed < 1.2
    assert len(servicer.sizes) == 1  # DEADLINE_EXCEEDED is not retried


def test_the_async_client_retries_chunks_and_keeps_order() -> None:
    servicer = ScriptedReward(fail_first=1, delay_s=0.05)

    async def main(address: str) -> tuple[list[float], str]:
        client = AsyncRewardClient(address, 10, max_items_per_request=5, retry=FAST_RETRY)
        try:
            scored = await client.score(["q"] * 23, NUMBERS)  # the first request to arrive fails
            with pytest.raises(RewardRpcError) as err:
                await client.score(["q"], ["1"], timeout=0.01)  # shortens timeout_s
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            return scored
        finally:
            await client.close()

    with scripted(servicer) as address:
        rewards, version = asyncio.run(main(address))
    assert rewards == [float(i) for i in range(23)] and version == "v1"
    assert len(servicer.sizes) == 7  # 5 chunks, one of them twice, then the late one
    assert sorted(servicer.sizes[1:6]) == [3, 5, 5, 5, 5]


# -- the TRL reward function -----------------------------------------------------------------------
def test_score_pair_maps_plain_and_conversational_inputs() -> None:
    assert score_pair("2+2=", " 4") == ("2+2=", " 4")
    user = {"role": "user", "content": "Hi?"}
    answer = [{"role": "assistant", "content": "Hello."}]
    assert score_pair([user], answer) == ("\n\nHuman: Hi?\n\nAssistant:", "Hello.")
    system = {"role": "system", "content": "Be brief."}
    assert score_pair([system, user], answer) == (
        "Be brief.\n\nHuman: Hi?\n\nAssistant:",
        "Hello.",
    )
    blocks = [{"role": "assistant", "content": [{"type": "text", "text": "Hel"}, {"text": "lo."}]}]
    assert score_pair([user], blocks)[1] == "Hello."
    started = {"role": "assistant", "content": "Well, "}  # the policy continues this turn
    assert score_pair([user, started], answer) == ("\n\nHuman: Hi?\n\nAssistant:", "Well, Hello.")
    tool_turns = [
        {"role": "assistant", "content": "let me look"},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "It is 42."},
    ]
    prompt, completion = score_pair([user], tool_turns)
    assert completion == "It is 42." and prompt.startswith("\n\nHuman: Hi?\n\nAssistant: let me")


def test_the_reward_functions_score_through_the_service(reward_server: ServerThread) -> None:
    prompts: list[Any] = [[{"role": "user", "content": "Name a colour."}]] * 2
    completions: list[Any] = [
        [{"role": "assistant", "content": "Blue."}],
        [{"role": "assistant", "content": "I will not."}],
    ]
    with RewardClient(reward_server.address) as direct:
        expected, version = direct.score(
            ["\n\nHuman: Name a colour.\n\nAssistant:"] * 2, ["Blue.", "I will not."]
        )
    sync = PlauditReward(reward_server.address, keep_calls=True)
    assert sync(prompts=prompts, completions=completions, completion_ids=[[1], [2]], extra=[0, 0])
    assert sync.calls[0].rewards == pytest.approx(expected, abs=1e-5)
    assert sync.model_versions == {version} and sync.__name__ == "plaudit_reward"
    sync.close()

    async_reward = AsyncPlauditReward(reward_server.address, name="plaudit_async")

    async def main() -> list[float]:
        try:
            return await async_reward(prompts=prompts, completions=completions)
        finally:
            await async_reward.aclose()

    assert asyncio.run(main()) == pytest.approx(expected, abs=1e-5)
    assert async_reward.last_model_version == version


@pytest.mark.parametrize(
    "conversational", [False, True], ids=["plain-prompts-sync", "conversational-async"]
)
def test_grpo_trains_on_plaudit_rewards(
    reward_server: ServerThread,
    tiny_registry: Path,
    tiny_policy_checkpoint: Path,
    tmp_path: Path,
    conversational: bool,
) -> None:
    """Two GRPO optimizer steps with the tiny policy: the rewards TRL logged and trained on are
    the served reward model's (through the blocking function for plain prompts, the async one,
    on TRL's own event loop, for conversations)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    questions = ["What is a cat?", "Name a river.", "Why is the sky blue?", "Say hello."]
    prompts: list[Any] = (
        [[{"role": "user", "content": q}] for q in questions] if conversational else questions
    )
    reward = (AsyncPlauditReward if conversational else PlauditReward)(
        reward_server.address, keep_calls=True
    )
    args = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
    )
    trainer = GRPOTrainer(
        model=str(tiny_policy_checkpoint),
        reward_funcs=[cast(Any, reward)],  # TRL types a reward function as returning a list
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
    )
    trainer.train()
    if isinstance(reward, AsyncPlauditReward):  # its channel lives on TRL's loop
        asyncio.run_coroutine_threadsafe(reward.aclose(), trainer.async_loop).result(10)
    else:
        reward.close()

    logged = [e for e in trainer.state.log_history if "rewards/plaudit_reward/mean" in e]
    assert trainer.state.global_step == 2 and len(logged) == 2
    assert len(reward.calls) == 2  # one generation batch per optimizer step
    served = ModelRegistry(tiny_registry, "reward").promoted()
    assert reward.model_versions == {served}
    with RewardClient(reward_server.address) as direct:
        for entry, call in zip(logged, reward.calls, strict=True):
            assert len(call.rewards) == 4
            assert entry["rewards/plaudit_reward/mean"] == pytest.approx(
                sum(call.rewards) / 4, abs=1e-4
            )
            again, version = direct.score(call.prompts, call.completions)
            assert again == pytest.approx(call.rewards, abs=1e-4) and version == served
    # what TRL last generated and the rewards it used are exactly what Plaudit was asked/answered
    last: Any = trainer._logs
    texts = [score_pair(p, c) for p, c in zip(last["prompt"], last["completion"], strict=True)]
    assert texts == list(zip(reward.calls[-1].prompts, reward.calls[-1].completions, strict=True))
    assert list(last["rewards"]["plaudit_reward"]) == pytest.approx(reward.calls[-1].rewards)
    if conversational:
        assert all(p.endswith("\n\nAssistant:") for p in reward.calls[-1].prompts)


# -- many replicas: one client, round robin ---------------------------------------------------
def test_channel_target_lists_replicas_and_names_the_field() -> None:
    assert channel_target("reward.internal:50051") == "reward.internal:50051"
    assert channel_target("dns:///plaudit-reward-headless:50051") == (
        "dns:///plaudit-reward-headless:50051"
    )
    assert channel_target(["10.0.0.7:50051", "10.0.0.8:50051"]) == (
        "ipv4:10.0.0.7:50051,10.0.0.8:50051"
    )
    assert channel_target(" 127.0.0.1:1, 127.0.0.1:2 ") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    for bad, why in [
        ("a.internal:1,b.internal:1", "dns:///NAME:PORT"),
        ("10.0.0.7:1,,", "empty entry"),
        ("10.0.0.7,10.0.0.8:1", "is not IP:port"),
        ("10.0.0.7:1,[::1]:1", "mixes IPv4 and IPv6"),
        (["dns:///a:1", "10.0.0.7:1"], "goes alone"),
    ]:
        with pytest.raises(ValueError, match=re.escape(why)) as err:
            channel_target(bad)
        assert str(err.value).startswith("address: ")
    with pytest.raises(ValueError, match="address: "):
        RewardClient("a.internal:1,b.internal:1")


def _replica(servicer: ScriptedReward) -> tuple[grpc.Server, str]:
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    reward_pb2_grpc.add_RewardServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_round_robin_spreads_calls_and_survives_a_replica_going_away() -> None:
    one, two = ScriptedReward(), ScriptedReward()
    (server_one, first), (server_two, second) = _replica(one), _replica(two)
    try:
        with RewardClient([first, second], retry=FAST_RETRY) as client:
            for _ in range(40):
                assert client.score(["p"], ["1"])[0] == [1.0]
            assert min(len(one.sizes), len(two.sizes)) >= 15, (one.sizes, two.sizes)

            async def spread() -> None:
                aio = AsyncRewardClient(f"{first},{second}", 10, retry=FAST_RETRY)
                try:
                    for _ in range(20):
                        assert (await aio.score(["p"], ["2"]))[0] == [2.0]
                finally:
                    await aio.close()

            before = len(one.sizes), len(two.sizes)
            asyncio.run(spread())
            assert len(one.sizes) > before[0] and len(two.sizes) > before[1]

            server_one.stop(0).wait()  # a replica goes away: every call lands on the other
            before = len(one.sizes), len(two.sizes)
            for _ in range(10):
                assert client.score(["p"], ["3"])[0] == [3.0]
            assert len(one.sizes) == before[0] and len(two.sizes) == before[1] + 10
    finally:
        server_one.stop(0)
        server_two.stop(0)


# -- verl's custom reward function --------------------------------------------------------------
def test_verl_reward_function_takes_what_verl_passes(reward_server: ServerThread) -> None:
    """``compute_score`` loaded both ways verl loads a custom reward function (a file path in
    older verl, ``pkg://`` in newer) and called as verl's reward managers call it: keywords
    only, ``reward_kwargs`` merged in, from a worker thread (the reward loop's executor)."""
    import functools
    import importlib
    import importlib.util

    import numpy as np

    from plaudit.services.reward import verl

    assert verl.__file__ is not None
    spec = importlib.util.spec_from_file_location("custom_module", verl.__file__)
    assert spec is not None and spec.loader is not None
    from_file = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(from_file)
    from_pkg = importlib.import_module("plaudit.services.reward.verl")

    def verl_wrapper(raw_fn: Any, extra: dict[str, Any], **kwargs: Any) -> Any:
        return raw_fn(**{**kwargs, **extra})  # verl.trainer.ppo.reward._call_with_kwargs

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    extra_info: dict[str, Any] = {
        "split": "train", "index": 3, "prompt": messages,
        "num_turns": 2, "rollout_reward_scores": {},  # added by the reward loop's manager
    }  # fmt: skip
    with RewardClient(reward_server.address) as direct:
        prompt, completion = score_pair(messages, "Paris.")
        (expected,), _ = direct.score([prompt], [completion])
        (plain,), _ = direct.score(["What is the capital of France?"], ["Paris."])
    for module in (from_file, from_pkg):
        fn = functools.partial(
            verl_wrapper, module.compute_score, {"address": reward_server.address}
        )

        def one(info: Any, fn: Any = fn) -> Any:
            return fn(data_source="hh", solution_str="Paris.", ground_truth="", extra_info=info)

        with ThreadPoolExecutor(4) as pool:
            numpy_prompt = {**extra_info, "prompt": np.array(messages, dtype=object)}
            got = list(pool.map(one, [extra_info, numpy_prompt]))
        assert got == pytest.approx([expected, expected], abs=1e-5)
        gsm8k = {"question": "What is the capital of France?", "index": 0}
        question = fn(
            data_source="openai/gsm8k",
            solution_str="Paris.",
            ground_truth="Paris",
            extra_info=gsm8k,
        )
        assert isinstance(question, float) and question == pytest.approx(plain, abs=1e-5)
        bad: list[tuple[dict[str, Any], str]] = [
            ({"extra_info": {"index": 0}}, "extra_info.prompt"),
            ({"extra_info": None}, "extra_info"),
            ({"extra_info": {"prompt": [1, 2]}}, "extra_info.prompt"),
            ({"extra_info": extra_info, "normalization": "SIGMOID"}, "normalization"),
        ]
        for kwargs, field in bad:
            with pytest.raises(ValueError, match=rf"^{re.escape(field)}:"):
                fn(data_source="hh", solution_str="Paris.", ground_truth="", **kwargs)
        with pytest.raises(ValueError, match=r"^address:"):
            module.compute_score(
                data_source="hh", solution_str="x", ground_truth="", extra_info=extra_info
            )
        module.close()


def test_a_call_across_replicas_mid_rollout_waits_for_them_to_agree() -> None:
    """One replica already serves v2, the other v1 for 0.4 s more: the chunks of one call land
    on both, and the call keeps rescoring (pausing between rounds, so the replicas can converge)
    until every chunk comes from one version, instead of failing after a few quick rounds."""
    flip_at: list[float] = []

    def lagging(n: int) -> str:
        if not flip_at:
            flip_at.append(time.monotonic() + 0.4)
        return "v1" if time.monotonic() < flip_at[0] else "v2"

    def consistent(rewards: list[float], version: str) -> bool:
        bonus = 1000.0 if version == "v2" else 0.0
        return rewards == [bonus + i for i in range(12)]

    ahead, behind = ScriptedReward(version=lambda n: "v2"), ScriptedReward(version=lagging)
    (server_ahead, first), (server_behind, second) = _replica(ahead), _replica(behind)
    try:
        with RewardClient([first, second], max_items_per_request=1, retry=FAST_RETRY) as client:
            assert consistent(*client.score(["p"] * 12, NUMBERS[:12], timeout=20))
        assert len(behind.sizes) >= 6 and len(ahead.sizes) >= 6  # both answered

        async def mid_rollout() -> tuple[list[float], str]:
            flip_at.clear()
            aio = AsyncRewardClient([first, second], 20, max_items_per_request=1, retry=FAST_RETRY)
            try:
                return await aio.score(["p"] * 12, NUMBERS[:12])
            finally:
                await aio.close()

        assert consistent(*asyncio.run(mid_rollout()))
    finally:
        server_ahead.stop(0)
        server_behind.stop(0)
