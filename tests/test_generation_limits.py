"""Issue 17 item 5: a conversation's message count is limited and each message costs bytes.

The attack: 200,000 empty ``ChatMessage``s (0 content bytes) used to pass validation and be
templated and tokenized in the generation service's single worker. Now ``request_job`` refuses
more than ``max_messages`` messages before walking them, and counts every message
``MESSAGE_OVERHEAD_BYTES`` on top of its content against ``max_prompt_bytes``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from plaudit.services.common.errors import InvalidArgumentError
from plaudit.services.generation.core import MESSAGE_OVERHEAD_BYTES, request_job
from plaudit.services.generation.http import ChatRequest
from plaudit.services.generation.settings import GenerationSettings
from plaudit.services.runtime.policy_model import LoadedPolicy
from plaudit.v1 import generation_pb2, generation_pb2_grpc
from tests.conftest import ServerThread

ATTACK = 200_000
SETTINGS = GenerationSettings()


def conversation(count: int, content: str = "") -> generation_pb2.GenerateRequest:
    message = generation_pb2.ChatMessage(role="user", content=content)
    return generation_pb2.GenerateRequest(
        conversation=generation_pb2.Conversation(messages=[message] * count)
    )


# -- the validation itself ---------------------------------------------------------------------
def test_200k_empty_messages_are_refused_before_they_are_walked() -> None:
    request = conversation(ATTACK)
    started = time.perf_counter()
    with pytest.raises(InvalidArgumentError) as err:
        request_job(request, SETTINGS)
    assert time.perf_counter() - started < 0.1
    assert err.value.field == "conversation.messages"
    assert f"limit of {SETTINGS.max_messages}" in str(err.value)


def test_the_message_limit_is_inclusive_and_configurable() -> None:
    job, size = request_job(conversation(SETTINGS.max_messages), SETTINGS)
    assert job.messages is not None and len(job.messages) == SETTINGS.max_messages
    assert size == SETTINGS.max_messages * MESSAGE_OVERHEAD_BYTES
    with pytest.raises(InvalidArgumentError):
        request_job(conversation(3), GenerationSettings(max_messages=2))


def test_each_message_counts_its_overhead_against_the_byte_limit() -> None:
    settings = GenerationSettings(max_prompt_bytes=1000, max_messages=1000)
    # 100 one-byte messages: 100 content bytes, but 1,700 bytes of real cost
    with pytest.raises(InvalidArgumentError) as err:
        request_job(conversation(100, "x"), settings)
    assert err.value.field == "conversation"
    assert "1700 bytes" in str(err.value)
    _, size = request_job(conversation(2, "hello"), settings)
    assert size == 2 * (5 + MESSAGE_OVERHEAD_BYTES)


def test_the_chat_route_names_messages() -> None:
    body = {"messages": [{"role": "user", "content": ""}] * (SETTINGS.max_messages + 1)}
    with pytest.raises(InvalidArgumentError) as err:
        ChatRequest(body, SETTINGS)
    assert err.value.field == "messages"


# -- the attack against a running service ------------------------------------------------------
@pytest.fixture
def encodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Calls of the policy's tokenization (the servers run in this process)."""
    calls: list[Any] = []
    original = LoadedPolicy.encode

    def spy(self: LoadedPolicy, job: Any) -> list[int]:
        calls.append(job)
        return original(self, job)

    monkeypatch.setattr(LoadedPolicy, "encode", spy)
    yield calls


def test_grpc_refuses_200k_empty_messages_without_tokenizing(
    generation_server: ServerThread, encodes: list[Any]
) -> None:
    with grpc.insecure_channel(generation_server.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        # 1.6 MB: over the call's message limit (derived from max_prompt_bytes), if there is one
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(conversation(ATTACK), timeout=30)
        assert time.perf_counter() - started < 5
        assert err.value.code() in {
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        }, err.value
        # 20k empty messages fit any message-size limit: the call's field limit refuses them
        # before they are parsed (services/common/security/limits.py:count_fields)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(conversation(20_000), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
        assert "protobuf fields" in (err.value.details() or "")
        # one message over max_messages passes the field limit: the servicer's count refuses it
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(conversation(SETTINGS.max_messages + 1), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("conversation.messages:"), err.value.details()
    assert encodes == []


def test_http_refuses_too_many_messages_without_tokenizing(
    generation_server: ServerThread, encodes: list[Any]
) -> None:
    # as many empty messages as the body limit admits (200k do not fit: 413 "body")
    messages = [{"role": "user", "content": ""}] * 10_000
    request = urllib.request.Request(
        generation_server.http_url + "/v1/chat/completions",
        data=json.dumps({"model": "policy", "messages": messages}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    reply = json.loads(err.value.read())
    assert err.value.code == 400
    assert reply["error"]["param"] == "messages", reply
    assert encodes == []
