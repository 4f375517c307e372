"""The generation service's OpenAI-style HTTP API, with the ``openai`` package as the client (and
raw HTTP for what it would never send): shapes, sampling, streaming, models, errors naming the
field, the API-key guard, metrics, and a hot swap under traffic."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import grpc
import openai
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openai.types.chat import ChatCompletionMessageParam

from plaudit.services.common.process import free_port
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.common.security.keys import hash_key, new_api_key
from plaudit.services.generation.access import ROUTE_ROLES
from plaudit.services.generation.client import GenerationClient
from plaudit.services.generation.http import GenerationHttpApi
from plaudit.services.generation.settings import GenerationSettings
from plaudit.trainer.policy_export import export_policy_checkpoint
from plaudit.v1 import admin_pb2, admin_pb2_grpc, generation_pb2
from tests.conftest import ServerThread, build_tiny_policy

QUESTION = "What is the capital of France?"
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
TURNS = [{"role": "user", "content": QUESTION}]  # the same, for the gRPC client


def openai_client(server: ServerThread, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.http_url + "/v1", api_key=api_key, max_retries=0, timeout=60
    )


@pytest.fixture(scope="module")
def client(generation_server: ServerThread) -> Iterator[openai.OpenAI]:
    with openai_client(generation_server) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(generation_server: ServerThread) -> Iterator[GenerationClient]:
    with GenerationClient(generation_server.address) as c:
        yield c


def raw_post(server: ServerThread, path: str, body: bytes, **headers: str) -> tuple[int, Any]:
    """POST ``body`` as is; (status, decoded JSON reply)."""
    request = urllib.request.Request(
        server.http_url + path,
        data=body,
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# -- shapes and sampling -----------------------------------------------------------------------
def test_chat_completion_is_the_grpc_conversation(
    client: openai.OpenAI, grpc_client: GenerationClient, tiny_policy_registry: Path
) -> None:
    reply = client.chat.completions.create(
        model="any-name", messages=USER, temperature=0, max_tokens=8, user="someone"
    )
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == ModelRegistry(tiny_policy_registry, "policy").promoted()
    (choice,) = reply.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    same = grpc_client.generate(messages=TURNS, temperature=0.0, max_new_tokens=8)
    assert choice.message.content == same.completions[0].text
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == same.prompt_tokens
    assert reply.usage.completion_tokens == same.completions[0].token_count
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # text parts and the "developer" role (OpenAI's newer name for system)
    parts = client.chat.completions.create(
        model="m",
        messages=[
            {"role": "developer", "content": "You answer in French."},
            {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
        ],
        temperature=0,
        max_completion_tokens=8,
    )
    system = grpc_client.generate(
        messages=[{"role": "system", "content": "You answer in French."}, *TURNS],
        temperature=0.0,
        max_new_tokens=8,
    )
    assert parts.choices[0].message.content == system.completions[0].text


def test_completions_n_seed_and_several_prompts(
    client: openai.OpenAI, grpc_client: GenerationClient
) -> None:
    sampling: dict[str, Any] = {"n": 3, "seed": 7, "top_p": 0.9, "max_tokens": 10}
    first = client.completions.create(model="m", prompt=QUESTION, **sampling)
    assert first.object == "text_completion" and first.id.startswith("cmpl-")
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert len(set(texts)) > 1  # temperature 1: the candidates differ
    again = client.completions.create(model="m", prompt=QUESTION, **sampling)
    assert [c.text for c in again.choices] == texts  # the seed reproduces them
    other = client.completions.create(model="m", prompt=QUESTION, **{**sampling, "seed": 8})
    assert [c.text for c in other.choices] != texts
    grpc_reply = grpc_client.generate(QUESTION, n=3, seed=7, top_p=0.9, max_new_tokens=10)
    assert [c.text for c in grpc_reply.completions] == texts
    for c in first.choices:
        assert c.finish_reason in ("stop", "length") and c.logprobs is None

    batch = client.completions.create(model="m", prompt=[QUESTION, "hi"], n=2, max_tokens=4)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.usage is not None and batch.usage.completion_tokens <= 16


def test_stop_strings_and_max_tokens(client: openai.OpenAI) -> None:
    free = client.completions.create(model="m", prompt=QUESTION, temperature=0, max_tokens=16)
    text = free.choices[0].text
    stop = text[4:7]
    for given in (stop, [stop, "never-generated-xyz"]):
        cut = client.completions.create(
            model="m", prompt=QUESTION, temperature=0, max_tokens=16, stop=given
        )
        assert cut.choices[0].finish_reason == "stop"
        assert cut.choices[0].text == text[: text.index(stop)]
    short = client.completions.create(model="m", prompt=QUESTION, temperature=0, max_tokens=2)
    assert short.usage is not None and short.usage.completion_tokens <= 2


def test_streaming_sends_the_same_completion_as_chunks(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="m", messages=USER, n=2, seed=3, max_tokens=12)
    stream = client.chat.completions.create(
        model="m",
        messages=USER,
        n=2,
        seed=3,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    content = ["", ""]
    finish: dict[int, str] = {}
    chunks = list(stream)
    for chunk in chunks[:-1]:
        assert chunk.object == "chat.completion.chunk" and chunk.model == whole.model
        (choice,) = chunk.choices
        content[choice.index] += choice.delta.content or ""
        if choice.finish_reason is not None:
            finish[choice.index] = choice.finish_reason
    assert content == [c.message.content for c in whole.choices]
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage

    plain = client.completions.create(model="m", prompt=QUESTION, temperature=0, max_tokens=8)
    pieces = list(
        client.completions.create(
            model="m", prompt=QUESTION, temperature=0, max_tokens=8, stream=True
        )
    )
    assert "".join(p.choices[0].text for p in pieces) == plain.choices[0].text
    assert pieces[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(p.usage is None for p in pieces)


def test_streaming_sends_text_while_the_tokens_are_generated(
    client: openai.OpenAI, generation_server: ServerThread
) -> None:
    """The first text arrives before the request has finished generating (whose tokens the
    service counts only at the end): 8 completions of up to 200 tokens each."""
    metrics = generation_server.server.metrics.registry
    name = "plaudit_generation_tokens_generated_total"
    before = metrics.get_sample_value(name)
    stream = client.completions.create(
        model="m", prompt=QUESTION, n=8, seed=1, max_tokens=200, stream=True
    )
    at_first_text, pieces = None, 0
    texts = [""] * 8
    for chunk in stream:
        (choice,) = chunk.choices
        if choice.text:
            pieces += 1
            texts[choice.index] += choice.text
            if at_first_text is None:
                at_first_text = metrics.get_sample_value(name)
    assert at_first_text == before  # nothing counted yet: the generation was still running
    assert metrics.get_sample_value(name) > before
    assert pieces > 8 * 10 and all(texts)  # token by token, not one piece per completion


def test_another_service_samples_on_this_one_as_its_openai_backend(
    generation_server: ServerThread, tiny_policy_registry: Path
) -> None:
    """This API is an OpenAI-compatible server, so a second generation service can use it as its
    ``--backend openai``: same completions and counts, streamed through, health and version from
    the backend (llama.cpp's server as the backend: tests/test_generation_backend.py)."""
    front = ServerThread(
        "generation",
        backend="openai",
        backend_url=generation_server.http_url + "/v1",
        backend_poll_s=0.3,
        log_level="WARNING",
    ).start()
    try:
        version = ModelRegistry(tiny_policy_registry, "policy").promoted()
        greedy: dict[str, Any] = {"temperature": 0.0, "max_new_tokens": 8}
        with (
            GenerationClient(front.address) as via,
            GenerationClient(generation_server.address) as direct,
        ):
            relayed, own = via.generate(QUESTION, **greedy), direct.generate(QUESTION, **greedy)
            assert relayed.model_version == own.model_version == version
            assert relayed.prompt_tokens == own.prompt_tokens
            (a,), (b,) = relayed.completions, own.completions
            assert (a.text, a.token_count, a.finish_reason) == (
                b.text,
                b.token_count,
                b.finish_reason,
            )
            stop = b.text[3:6]
            cut = via.generate(QUESTION, stop=[stop], **greedy).completions[0]
            assert cut.text == b.text[: b.text.index(stop)]
            assert cut.finish_reason == generation_pb2.FINISH_REASON_STOP_STRING
            assert len(via.generate(QUESTION, n=3, seed=2, max_new_tokens=4).completions) == 3
        with openai_client(front) as client:
            whole = client.chat.completions.create(
                model="m", messages=USER, temperature=0, max_tokens=8
            )
            chunks = list(
                client.chat.completions.create(
                    model="m",
                    messages=USER,
                    temperature=0,
                    max_tokens=8,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == whole.choices[0].message.content
            assert chunks[-1].usage == whole.usage and whole.model == version
            assert [m.id for m in client.models.list().data] == [version]
    finally:
        front.stop()


def test_an_unreachable_backend_is_unavailable_and_not_serving() -> None:
    front = ServerThread(
        "generation",
        backend="openai",
        backend_url=f"http://127.0.0.1:{free_port()}",
        backend_model="policy",
        log_level="WARNING",
    ).start(wait=False)
    try:
        with grpc.insecure_channel(front.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with GenerationClient(front.address) as client, pytest.raises(grpc.RpcError) as err:
            client.generate(QUESTION, max_new_tokens=2, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "cannot be reached" in (err.value.details() or "")
        with openai_client(front) as c, pytest.raises(openai.APIStatusError) as down:
            c.models.list()
        assert down.value.status_code == 503
    finally:
        front.stop()


def test_models_lists_the_live_policy(client: openai.OpenAI, tiny_policy_registry: Path) -> None:
    version = ModelRegistry(tiny_policy_registry, "policy").promoted()
    models = client.models.list()
    assert [m.id for m in models.data] == [version]
    assert models.data[0].object == "model" and models.data[0].owned_by == "plaudit"
    assert client.models.retrieve(str(version)).id == version
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("policy-not-here")


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x" * 70000}]}, "messages"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, "messages"),  # > context
        ({"messages": USER, "max_tokens": 5000}, "max_tokens"),
        ({"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": USER, "temperature": -1}, "temperature"),
        ({"messages": USER, "top_p": 0}, "top_p"),
        ({"messages": USER, "n": 17}, "n"),
        ({"messages": USER, "stop": [""]}, "stop[0]"),
        ({"messages": USER, "seed": -1}, "seed"),
        ({"messages": USER, "logprobs": True}, "logprobs"),
        ({"messages": USER, "presence_penalty": 0.5}, "presence_penalty"),
        ({"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
        (
            {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools",
        ),
    ],
)
def test_bad_chat_requests_are_400_naming_the_field(
    client: openai.OpenAI, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", **kwargs)
    assert err.value.status_code == 400
    assert err.value.param == param, err.value.body
    assert err.value.code == "INVALID_ARGUMENT" and err.value.type == "invalid_request_error"
    assert f"{param}: " in err.value.message


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": [QUESTION, ""]}, "prompt[1]"),
        ({"prompt": QUESTION, "echo": True}, "echo"),
        ({"prompt": QUESTION, "logprobs": 2}, "logprobs"),
        ({"prompt": QUESTION, "best_of": 3}, "best_of"),
    ],
)
def test_bad_completion_requests_are_400_naming_the_field(
    client: openai.OpenAI, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m", **kwargs)
    assert err.value.param == param, err.value.body


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/chat/completions", b'{"model": "m", "messages": [', "body"),
        ("/v1/chat/completions", b"\xff\xfe", "body"),
        ("/v1/chat/completions", b"[1, 2]", "body"),
        ("/v1/chat/completions", b'{"model": "m"}', "messages"),
        ("/v1/chat/completions", b'{"messages": "hi"}', "messages"),
        ("/v1/chat/completions", b'{"messages": ["hi"]}', "messages[0]"),
        ("/v1/chat/completions", b'{"messages": [{"content": "hi"}]}', "messages[0].role"),
        ("/v1/chat/completions", b'{"model": 5, "messages": [{"role": "user", "content": "hi"}]}',
         "model"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "n": "3"}',
         "n"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "n": true}',
         "n"),
        ("/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
         "temperature"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stop": 5}',
         "stop"),
        ("/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
        ("/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": "hi"}], "stream_options": {}}',
         "stream_options"),
        ("/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1e400}', "seed"),
        ("/v1/completions", b'{"prompt": null}', "prompt"),
        ("/v1/completions", b'{"prompt": "hi", "max_tokens": 1.5}', "max_tokens"),
        ("/v1/completions", b'{"prompt": "hi", "n": 99999999999999999999999}', "n"),
    ],
)  # fmt: skip
def test_malformed_bodies_are_4xx_json_naming_the_field(
    generation_server: ServerThread, path: str, body: bytes, field: str
) -> None:
    status, reply = raw_post(generation_server, path, body)
    assert status == 400, reply
    assert reply["error"]["field"] == field == reply["error"]["param"], reply
    assert reply["error"]["code"] == "INVALID_ARGUMENT"
    assert reply["error"]["message"].startswith(f"{field}: ")


def test_oversize_and_non_json_bodies(generation_server: ServerThread) -> None:
    status, reply = raw_post(
        generation_server, "/v1/chat/completions", b'{"prompt": "' + b"x" * 2_000_000 + b'"}'
    )
    assert status == 413 and reply["error"]["field"] == "body", reply
    status, reply = raw_post(
        generation_server, "/v1/completions", b"prompt=hi", **{"Content-Type": "text/plain"}
    )
    assert status == 400 and reply["error"]["field"] == "body", reply


def test_health_and_metrics(generation_server: ServerThread, client: openai.OpenAI) -> None:
    with urllib.request.urlopen(generation_server.http_url + "/healthz", timeout=5) as reply:
        assert json.loads(reply.read())["status"] == "SERVING"
    client.models.list()
    metrics = generation_server.server.metrics.registry
    labels = {"route": "/v1/models", "status": "200"}
    assert metrics.get_sample_value("plaudit_generation_http_requests_total", labels) >= 1
    count = "plaudit_generation_http_request_duration_seconds_count"
    assert metrics.get_sample_value(count, {"route": "/v1/models"}) >= 1


def test_every_api_route_needs_a_named_role() -> None:
    api = GenerationHttpApi(cast(Any, None), GenerationSettings())
    app = web.Application()
    app.add_routes(api.routes())
    routes = {
        f"{route.method} {route.resource.canonical}"
        for route in app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/v1/")
        and route.method != "HEAD"
    }
    assert routes == set(ROUTE_ROLES)
    assert set(ROUTE_ROLES.values()) == {"generate"}


def test_api_keys_are_checked_like_grpc(tiny_policy_registry: Path) -> None:
    keys = {"gen": new_api_key(), "scorer": new_api_key()}
    roles = {"gen": ["generate"], "scorer": ["score"]}
    entries = [{"name": n, "sha256": hash_key(k), "roles": roles[n]} for n, k in keys.items()]
    server = ServerThread(
        "generation", registry=tiny_policy_registry, api_keys=entries, log_level="WARNING"
    ).start()
    try:
        with openai_client(server, keys["gen"]) as allowed:
            reply = allowed.chat.completions.create(model="m", messages=USER, max_tokens=2)
            assert reply.choices[0].message.content is not None
            assert allowed.models.list().data
        with openai_client(server, "not-a-key") as stranger:
            with pytest.raises(openai.AuthenticationError) as unknown:
                stranger.chat.completions.create(model="m", messages=USER, max_tokens=2)
            assert unknown.value.status_code == 401
        with openai_client(server, keys["scorer"]) as scorer:
            with pytest.raises(openai.PermissionDeniedError) as denied:
                scorer.completions.create(model="m", prompt=QUESTION, max_tokens=2)
            assert "generate" in denied.value.message
            with pytest.raises(openai.PermissionDeniedError):
                scorer.models.list()
        status, reply = raw_post(server, "/v1/completions", b"not even json")
        assert status == 401, reply  # refused before the body is read
        with urllib.request.urlopen(server.http_url + "/healthz", timeout=5) as health:
            assert health.status == 200  # public, like the gRPC health service
    finally:
        server.stop()


# -- hot swap --------------------------------------------------------------------------------------
def test_a_hot_swap_under_traffic_fails_no_request(
    tiny_policy_registry: Path, smollm2_tokenizer_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "registry"
    shutil.copytree(tiny_policy_registry, root)
    registry = ModelRegistry(root, "policy")
    old = registry.promoted()
    checkpoint = build_tiny_policy(tmp_path / "v2", smollm2_tokenizer_dir, seed=1)
    new = export_policy_checkpoint(str(checkpoint), registry, max_length=256)
    server = ServerThread("generation", registry=root, poll_interval_s=60, log_level="WARNING")
    server.start()
    try:
        stop = threading.Event()

        def traffic(i: int) -> list[tuple[str, str]]:
            seen: list[tuple[str, str]] = []
            with openai_client(server) as c:
                while not stop.is_set() or not seen:
                    if i % 2:
                        chat = c.chat.completions.create(
                            model="m", messages=USER, temperature=0, max_tokens=4
                        )
                        seen.append((chat.model, chat.choices[0].message.content or ""))
                    else:
                        text = c.completions.create(
                            model="m", prompt=QUESTION, temperature=0, max_tokens=4, stream=True
                        )
                        chunks = list(text)
                        seen.append((chunks[0].model, "".join(k.choices[0].text for k in chunks)))
            return seen

        with ThreadPoolExecutor(4) as pool:
            running = [pool.submit(traffic, i) for i in range(4)]
            registry.promote(new.version)
            with grpc.insecure_channel(server.address) as channel:
                admin = admin_pb2_grpc.AdminServiceStub(channel)
                reload = admin.ReloadModel(admin_pb2.ReloadModelRequest(), timeout=60)
            assert reload.swapped and reload.live_version == new.version
            with openai_client(server) as c:
                after = c.chat.completions.create(
                    model="m", messages=USER, temperature=0, max_tokens=4
                )
                assert after.model == new.version
                assert [m.id for m in c.models.list().data] == [new.version]
            stop.set()
            seen = [pair for future in running for pair in future.result()]  # none raised
        assert {model for model, _ in seen} <= {old, new.version}
        assert new.version in {model for model, _ in seen}
    finally:
        server.stop()
