"""The generation service over a real gRPC channel on loopback: sampling contract, errors,
health, reranking by a real reward service, hot swap, and a process without torch."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plaudit.services.common.process import free_port
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.generation.client import GenerationClient, generate_request
from plaudit.services.generation.engine import GenerationEngine
from plaudit.services.reward.client import RewardClient, wait_until_serving
from plaudit.services.runtime.policy_model import (
    FinishReason,
    GenerateJob,
    LoadedPolicy,
    SamplingParams,
    generate_jobs,
)
from plaudit.trainer.policy_export import export_policy_checkpoint
from plaudit.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc
from tests.conftest import NO_TORCH_PRELUDE, REPO, ServerThread, build_tiny_policy

SERVICE = "plaudit.v1.GenerationService"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(generation_server: ServerThread) -> Iterator[GenerationClient]:
    with GenerationClient(generation_server.address) as c:
        yield c


def texts(reply: generation_pb2.GenerateResponse) -> list[str]:
    return [c.text for c in reply.completions]


def offline_greedy(registry: Path, prompt: str, max_new_tokens: int) -> list[int]:
    reg = ModelRegistry(registry, "policy")
    engine = GenerationEngine(max_new_tokens=1024)
    engine.set_model(LoadedPolicy.load(reg, reg.promoted() or "", provider="cpu"))
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    (result,) = engine.process([GenerateJob(prompt=prompt, params=params)])
    assert not isinstance(result, Exception)
    return result.completions[0].token_ids


def test_n_candidates_with_their_tokens_and_finish_reasons(
    client: GenerationClient, tiny_policy_registry: Path
) -> None:
    reply = client.generate(QUESTION, n=4, seed=1, max_new_tokens=12)
    assert len(reply.completions) == 4
    assert reply.model_version == ModelRegistry(tiny_policy_registry, "policy").promoted()
    assert reply.reward_model_version == ""
    assert reply.prompt_tokens > 10  # the chat template's system turn is included
    for c in reply.completions:
        assert 1 <= c.token_count <= 12 and len(c.token_ids) == c.token_count
        assert c.finish_reason in (
            generation_pb2.FINISH_REASON_EOS,
            generation_pb2.FINISH_REASON_LENGTH,
        )
        assert not c.HasField("reward")
    assert len(set(texts(reply))) > 1  # sampled at temperature 1: the candidates differ
    default = client.generate(QUESTION, seed=1)
    assert default.completions[0].token_count <= 16  # the version's default max_new_tokens


def test_the_same_seed_gives_the_same_completions(client: GenerationClient) -> None:
    first = client.generate(QUESTION, n=3, seed=7, top_p=0.9, top_k=100, max_new_tokens=10)
    again = client.generate(QUESTION, n=3, seed=7, top_p=0.9, top_k=100, max_new_tokens=10)
    other = client.generate(QUESTION, n=3, seed=8, top_p=0.9, top_k=100, max_new_tokens=10)
    assert [c.token_ids for c in first.completions] == [c.token_ids for c in again.completions]
    assert texts(first) != texts(other)


def test_greedy_is_deterministic_and_matches_the_engine(
    client: GenerationClient, tiny_policy_registry: Path
) -> None:
    reply = client.generate(QUESTION, n=3, temperature=0.0, max_new_tokens=10)
    assert len({tuple(c.token_ids) for c in reply.completions}) == 1
    again = client.generate(QUESTION, temperature=0.0, max_new_tokens=10)
    assert list(again.completions[0].token_ids) == list(reply.completions[0].token_ids)
    assert list(reply.completions[0].token_ids) == offline_greedy(
        tiny_policy_registry, QUESTION, 10
    )


def test_a_conversation_is_rendered_like_the_equivalent_prompt(client: GenerationClient) -> None:
    greedy: dict[str, Any] = {"temperature": 0.0, "max_new_tokens": 8}
    as_prompt = client.generate(QUESTION, **greedy)
    as_messages = client.generate(messages=[{"role": "user", "content": QUESTION}], **greedy)
    assert as_messages.completions[0].token_ids == as_prompt.completions[0].token_ids
    assert as_messages.prompt_tokens == as_prompt.prompt_tokens
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: " + QUESTION + "\n\nAssistant:"
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": QUESTION},
    ]
    hh = client.generate(dialogue, **greedy)
    chat = client.generate(messages=turns, **greedy)
    assert hh.completions[0].token_ids == chat.completions[0].token_ids
    system = client.generate(
        messages=[{"role": "system", "content": "You answer in French."}, turns[-1]], **greedy
    )
    assert system.prompt_tokens != as_messages.prompt_tokens


def test_stop_strings_end_the_completion(client: GenerationClient) -> None:
    free = client.generate(QUESTION, temperature=0.0, max_new_tokens=16).completions[0]
    stop = free.text[4:7]
    cut = client.generate(QUESTION, temperature=0.0, max_new_tokens=16, stop=[stop]).completions[0]
    assert cut.finish_reason == generation_pb2.FINISH_REASON_STOP_STRING
    assert cut.text == free.text[: free.text.index(stop)]


def test_a_sink_gets_the_text_while_it_is_decoded(tiny_policy_registry: Path) -> None:
    """The decode loop hands each completion's settled text to the job's sink step by step (a
    stop string is never sent, even in part), and the pieces add up to the final texts."""
    reg = ModelRegistry(tiny_policy_registry, "policy")
    model = LoadedPolicy.load(reg, reg.promoted() or "", provider="cpu")
    calls = 0
    forward = model.forward

    def counted(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return forward(*args)

    model.forward = counted  # type: ignore[method-assign,assignment]
    events: list[tuple[int, int | None, str]] = []

    class Sink:
        def started(self, version: str) -> None:
            events.append((calls, None, version))

        def text(self, index: int, delta: str) -> None:
            events.append((calls, index, delta))

    free = generate_jobs(
        model,
        [GenerateJob(prompt=QUESTION, params=SamplingParams(temperature=0.0, max_new_tokens=24))],
        1024,
    )[0]
    assert not isinstance(free, Exception)
    whole = free.completions[0].text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    params = SamplingParams(temperature=0.0, max_new_tokens=24, stop=(stop,))
    calls = 0
    (result,) = generate_jobs(
        model, [GenerateJob(prompt=QUESTION, n=2, params=params, sink=Sink())], 1024
    )
    assert not isinstance(result, Exception)
    assert events[0] == (1, None, model.version)  # after the prefill
    for index, completion in enumerate(result.completions):
        pieces = [(step, text) for step, i, text in events if i == index]
        assert "".join(text for _, text in pieces) == completion.text == whole[: whole.index(stop)]
        assert completion.finish_reason is FinishReason.STOP_STRING
        assert len(pieces) > 3 and pieces[0][0] < calls  # the first text before the last step


def test_concurrent_requests_each_get_their_own_completions(
    client: GenerationClient, generation_server: ServerThread
) -> None:
    prompts = [QUESTION, "hi", "Tell me a story about a dragon and a knight.", "Why?"]
    alone = [client.generate(p, temperature=0.0, max_new_tokens=8) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(
                lambda i: client.generate(prompts[i % 4], temperature=0.0, max_new_tokens=8),
                range(16),
            )
        )
    for i, reply in enumerate(together):
        assert reply.completions[0].token_ids == alone[i % 4].completions[0].token_ids
    port = generation_server.server.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        page = resp.read().decode()
    assert "plaudit_generation_tokens_generated_total" in page
    assert "plaudit_generation_model_info{" in page
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in page.splitlines()
        if line and not line.startswith("#")
    }
    # every request reports its time to first token; those of 8 tokens their decode rate too
    assert samples["plaudit_generation_time_to_first_token_seconds_count"] >= 16
    assert samples["plaudit_generation_request_tokens_per_second_count"] >= 16
    assert samples["plaudit_generation_request_tokens_per_second_sum"] > 0
    batched = [
        line
        for line in page.splitlines()
        if line.startswith("plaudit_generation_batch_size_bucket")
    ]
    assert batched


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": QUESTION, "n": 17}, "n"),
        ({"prompt": QUESTION, "temperature": -0.5}, "sampling.temperature"),
        ({"prompt": QUESTION, "temperature": float("nan")}, "sampling.temperature"),
        ({"prompt": QUESTION, "top_p": 0.0}, "sampling.top_p"),
        ({"prompt": QUESTION, "top_p": 1.5}, "sampling.top_p"),
        ({"prompt": QUESTION, "max_new_tokens": 5000}, "sampling.max_new_tokens"),
        ({"prompt": QUESTION, "stop": [""]}, "sampling.stop[0]"),
        ({"prompt": "x" * 70000}, "prompt"),
        ({"prompt": "word " * 400}, "prompt"),  # more tokens than the context (256)
        ({"messages": []}, "conversation.messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "conversation.messages[0].role"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(
    client: GenerationClient, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.generate(**kwargs, timeout=30)  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()


def test_a_request_without_input_names_the_prompt(client: GenerationClient) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Generate(generation_pb2.GenerateRequest(n=1), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("prompt:")


def test_rerank_without_a_reward_service_is_failed_precondition(client: GenerationClient) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.generate(QUESTION, n=2, rerank=True, timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "reward" in err.value.details()


def test_rerank_sorts_candidates_by_the_reward_service(
    tiny_policy_registry: Path, reward_server: ServerThread, tiny_registry: Path
) -> None:
    server = ServerThread(
        "generation",
        registry=tiny_policy_registry,
        reward_addr=reward_server.address,
        log_level="WARNING",
    ).start()
    try:
        with GenerationClient(server.address) as gen:
            reply = gen.generate(QUESTION, n=5, seed=3, max_new_tokens=10, rerank=True)
            plain = gen.generate(QUESTION, n=5, seed=3, max_new_tokens=10)
            chat = gen.generate(
                messages=[{"role": "user", "content": QUESTION}], n=2, seed=3, rerank=True
            )
    finally:
        server.stop()
    rewards = [c.reward for c in reply.completions]
    assert all(c.HasField("reward") for c in reply.completions)
    assert rewards == sorted(rewards, reverse=True)
    assert reply.reward_model_version == ModelRegistry(tiny_registry, "reward").promoted()
    assert sorted(texts(reply)) == sorted(texts(plain))  # the same candidates, reordered
    with RewardClient(reward_server.address) as scorer:
        expected, _ = scorer.score([QUESTION] * 5, texts(reply))
    assert rewards == pytest.approx(expected, abs=1e-4)
    assert all(c.HasField("reward") for c in chat.completions)


def test_rerank_with_the_reward_service_down_is_unavailable(tiny_policy_registry: Path) -> None:
    server = ServerThread(
        "generation",
        registry=tiny_policy_registry,
        reward_addr=f"127.0.0.1:{free_port()}",
        reward_timeout_s=5,
        log_level="WARNING",
    ).start()
    try:
        with GenerationClient(server.address) as gen, pytest.raises(grpc.RpcError) as err:
            gen.generate(QUESTION, n=2, rerank=True, timeout=30)
    finally:
        server.stop()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "reward service" in err.value.details()


def test_health_is_not_serving_until_a_policy_is_promoted(
    tiny_policy_registry: Path, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    server = ServerThread("generation", registry=registry, poll_interval_s=60, log_level="WARNING")
    server.start(wait=False)
    try:
        with grpc.insecure_channel(server.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            request = health_pb2.HealthCheckRequest(service=SERVICE)
            assert health.Check(request).status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = generation_pb2_grpc.GenerationServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(generate_request(QUESTION), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            shutil.copytree(tiny_policy_registry, registry)  # publish + promote
            admin = admin_pb2_grpc.AdminServiceStub(ch)
            reload = admin.ReloadModel(admin_pb2.ReloadModelRequest(), timeout=60)
            assert reload.swapped and reload.last_swap_error == ""
            assert health.Check(request).status == health_pb2.HealthCheckResponse.SERVING
            assert stub.Generate(generate_request(QUESTION), timeout=30).completions
    finally:
        server.stop()


def test_hot_swap_to_a_new_policy_version(
    tiny_policy_registry: Path, smollm2_tokenizer_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "registry"
    shutil.copytree(tiny_policy_registry, root)
    registry = ModelRegistry(root, "policy")
    old = registry.promoted()
    server = ServerThread("generation", registry=root, poll_interval_s=60, log_level="WARNING")
    server.start()
    try:
        with GenerationClient(server.address) as gen:
            before = gen.generate(QUESTION, temperature=0.0, max_new_tokens=8)
            assert before.model_version == old
            checkpoint = build_tiny_policy(tmp_path / "v2", smollm2_tokenizer_dir, seed=1)
            new = export_policy_checkpoint(str(checkpoint), registry, max_length=256)
            assert new.parent == old
            registry.promote(new.version)
            with grpc.insecure_channel(server.address) as ch:
                admin = admin_pb2_grpc.AdminServiceStub(ch)
                reload = admin.ReloadModel(admin_pb2.ReloadModelRequest(), timeout=60)
            assert reload.swapped and reload.live_version == new.version
            after = gen.generate(QUESTION, temperature=0.0, max_new_tokens=8)
            assert after.model_version == new.version
            assert after.completions[0].token_ids != before.completions[0].token_ids

            # a candidate whose graph does not match its manifest never replaces the live one
            source = tmp_path / "broken"
            shutil.copytree(registry.checkout(new.version)[1], source)
            assert new.generation is not None
            generation = new.generation.model_copy(update={"num_layers": 3})
            broken = new.model_copy(update={"version": "policy-broken", "generation": generation})
            registry.publish(source, broken)
            registry.promote("policy-broken")
            with grpc.insecure_channel(server.address) as ch:
                admin = admin_pb2_grpc.AdminServiceStub(ch)
                reload = admin.ReloadModel(admin_pb2.ReloadModelRequest(), timeout=60)
            assert not reload.swapped and reload.live_version == new.version
            assert "policy-broken" in reload.last_swap_error
            assert "3-layer" in reload.last_swap_error
            still = gen.generate(QUESTION, temperature=0.0, max_new_tokens=8)
            assert still.model_version == new.version
    finally:
        server.stop()


def test_the_service_runs_without_torch(tiny_policy_registry: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-c", NO_TORCH_PRELUDE, "serve", "generation",
            "--registry", str(tiny_policy_registry), "--host", "127.0.0.1",
            "--port", str(port), "--metrics-port", str(free_port()), "--http-port", "0",
            "--log-format", "json",
        ],
        cwd=REPO,
        env={**os.environ, "PLAUDIT_GRACE_PERIOD_S": "10"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_until_serving(f"127.0.0.1:{port}", timeout=60, service=SERVICE)
        with GenerationClient(f"127.0.0.1:{port}") as gen:
            reply = gen.generate(QUESTION, n=2, seed=0, max_new_tokens=6)
        assert len(reply.completions) == 2 and reply.model_version
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_the_cli_generates(generation_server: ServerThread) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "plaudit.cli", "generate", "--addr", generation_server.address,
            "--prompt", QUESTION, "--n", "2", "--temperature", "0", "--max-new-tokens", "4",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert '"model_version"' in result.stdout and "FINISH_REASON_" in result.stdout
