"""``--backend-adapters vllm``: promoted policies reach an OpenAI-compatible server as LoRA
adapters through vLLM's runtime adapter API.

vLLM itself cannot run here (its wheels need CUDA; a CPU build compiles from source), so the
backend is :class:`VllmProtocolServer`: vLLM's adapter routes as its source defines them
(``vllm/entrypoints/openai/serving_models.py``: both fields required, a second load of a name is
400 "has already been loaded", an adapter path without a readable adapter is 404 "No adapter
found", unloading an unknown name is 404; a loaded adapter is listed by ``/v1/models`` with its
base as ``parent`` and answers requests naming it), and it opens what it is given the way vLLM's
loader does: ``adapter_config.json`` (rank against ``--max-lora-rank``) and the safetensors
weights. The adapters are real PEFT adapters of the tiny policy, published by the real export.
The generation service and the chat API are real. ``/v1/chat/completions`` answers which model
served it; sampling against a real server is tests/test_generation_backend.py's (llama.cpp).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from peft import LoraConfig, get_peft_model
from pydantic import ValidationError
from safetensors import safe_open

from plaudit.cli import main
from plaudit.services.common.errors import FailedPreconditionError
from plaudit.services.common.process import free_port
from plaudit.services.common.registry import LoraAdapter, ModelRegistry, check_manifest_paths
from plaudit.services.generation.client import GenerationClient
from plaudit.services.generation.settings import GenerationSettings
from plaudit.trainer.policy_export import (
    export_policy,
    export_policy_checkpoint,
    load_policy_checkpoint,
)
from tests.conftest import ServerThread

BASE = "tiny-base"
POLL_S = 0.2


class VllmProtocolServer:
    """vLLM's OpenAI server as far as adapters go (see the module doc), on a local port."""

    def __init__(self, max_lora_rank: int = 16) -> None:
        self.max_lora_rank = max_lora_rank
        self.loaded: dict[str, str] = {}  # lora_name -> lora_path
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app)

    def __enter__(self) -> VllmProtocolServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def error(message: str, kind: str, status: int) -> web.Response:
        return web.json_response(
            {"object": "error", "message": message, "type": kind, "code": status}, status=status
        )

    async def models(self, request: web.Request) -> web.Response:
        cards = [{"id": BASE, "object": "model", "owned_by": "vllm", "root": BASE, "parent": None}]
        cards += [
            {"id": name, "object": "model", "owned_by": "vllm", "root": path, "parent": BASE}
            for name, path in self.loaded.items()
        ]
        return web.json_response({"object": "list", "data": cards})

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("load", body))
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return self.error(
                "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400
            )
        if name in self.loaded:
            return self.error(
                f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput", 400
            )
        try:  # what vLLM's LoRA loader opens: the PEFT config, then the weights
            config = json.loads((Path(path) / "adapter_config.json").read_text())
            with safe_open(str(Path(path) / "adapter_model.safetensors"), "pt") as weights:
                assert any("lora_A" in key for key in weights.keys())  # noqa: SIM118
        except (OSError, ValueError, AssertionError) as exc:
            return self.error(f"No adapter found for {path}: {exc}", "NotFoundError", 404)
        if config["r"] > self.max_lora_rank:
            return self.error(
                f"LoRA rank {config['r']} is greater than max_lora_rank {self.max_lora_rank}.",
                "BadRequestError",
                400,
            )
        self.loaded[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("unload", body))
        name = body.get("lora_name")
        if name not in self.loaded:
            return self.error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
        del self.loaded[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        model = body.get("model")
        if model != BASE and model not in self.loaded:
            return self.error(f"The model `{model}` does not exist.", "NotFoundError", 404)
        await asyncio.sleep(0.01)
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"from {model}"},
                        "finish_reason": "stop",
                        "stop_reason": None,
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
            }
        )


@pytest.fixture(scope="module")
def versions(
    tmp_path_factory: pytest.TempPathFactory, tiny_policy_checkpoint: Path
) -> dict[str, str]:
    """A registry with two LoRA policies (rank 4 and 8), one stacked on another policy, and one
    full fine-tune (no adapter); nothing promoted."""
    root = tmp_path_factory.mktemp("adapter-registry")
    registry = ModelRegistry(root, "policy")
    out = {"root": str(root)}
    for label, rank, stacked in (("r4", 4, None), ("r8", 8, None), ("stacked", 4, "policy-x")):
        model, tokenizer, _ = load_policy_checkpoint(str(tiny_policy_checkpoint))
        config = LoraConfig(r=rank, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        peft = get_peft_model(model, config)
        saved = root.parent / f"adapter-{label}"
        peft.save_pretrained(str(saved))
        merged: Any = peft.merge_and_unload()
        info = LoraAdapter(base=BASE, rank=rank, stacked_on=stacked)
        out[label] = export_policy(
            merged, tokenizer, registry, max_length=64, max_new_tokens=4, adapter=(saved, info)
        ).version
    out["full"] = export_policy_checkpoint(
        str(tiny_policy_checkpoint), registry, max_length=64, max_new_tokens=4
    ).version
    return out


def service(versions: dict[str, str], url: str, **extra: Any) -> ServerThread:
    return ServerThread(
        "generation",
        backend="openai",
        backend_url=url,
        backend_model=BASE,
        backend_adapters="vllm",
        backend_poll_s=POLL_S,
        backend_adapter_unload_grace_s=2 * POLL_S,
        registry=versions["root"],
        log_level="WARNING",
        **extra,
    )


@contextmanager
def adapter_stack(
    versions: dict[str, str], *, wait: bool = True, max_lora_rank: int = 16, **extra: Any
) -> Iterator[tuple[VllmProtocolServer, ServerThread]]:
    """The vLLM-protocol server and a generation service following ``versions``' registry into
    it (started, waiting for SERVING when ``wait``), stopped after."""
    with VllmProtocolServer(max_lora_rank) as vllm:
        server = service(versions, vllm.url, **extra).start(wait=wait)
        try:
            yield vllm, server
        finally:
            server.stop()


def wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def answered_by(client: GenerationClient) -> str:
    reply = client.generate("Hello?", max_new_tokens=4)
    assert reply.completions[0].text == f"from {reply.model_version}"
    return reply.model_version


def metric(server: ServerThread, outcome: str) -> float:
    value = server.server.metrics.backend_adapters.labels(outcome)._value.get()
    return float(value)


@pytest.fixture()
def registry(versions: dict[str, str]) -> Iterator[ModelRegistry]:
    registry = ModelRegistry(versions["root"], "policy")
    yield registry
    pointer = Path(versions["root"]) / "policy" / "promoted.json"
    pointer.unlink(missing_ok=True)  # each test starts with nothing promoted


def test_promotions_reach_the_backend_as_adapters(
    versions: dict[str, str], registry: ModelRegistry
) -> None:
    with adapter_stack(versions) as (vllm, server), GenerationClient(server.address) as client:
        assert answered_by(client) == BASE  # nothing promoted: the base model
        registry.promote(versions["r4"], reason="test")
        wait_for(lambda: answered_by(client) == versions["r4"])
        folder = Path(versions["root"]) / "policy" / "versions" / versions["r4"]
        assert vllm.loaded == {versions["r4"]: str(folder / "adapter")}

        # a new promotion while requests keep coming: none fails, the version moves
        # forward once and stays
        seen: list[str] = []
        failures: list[BaseException] = []
        stop = threading.Event()

        def hammer() -> None:
            with GenerationClient(server.address) as c:
                while not stop.is_set():
                    try:
                        seen.append(answered_by(c))
                    except BaseException as exc:
                        failures.append(exc)

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        registry.promote(versions["r8"], reason="test")
        wait_for(lambda: vllm.loaded.keys() == {versions["r8"]})  # r4 unloaded, idle
        time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join(10)
        assert not failures
        assert seen[0] == versions["r4"] and seen[-1] == versions["r8"]
        assert set(seen) == {versions["r4"], versions["r8"]}
        assert answered_by(client) == versions["r8"]
        assert metric(server, "loaded") == 2 and metric(server, "unloaded") == 1

        # vLLM restarts and forgets its run-time adapters: r8 is loaded again
        vllm.loaded.clear()
        wait_for(lambda: vllm.loaded.keys() == {versions["r8"]})
        wait_for(lambda: answered_by(client) == versions["r8"])
        assert metric(server, "loaded") == 3

        # rollback to an unloaded version: loaded again
        registry.promote(versions["r4"], reason="rollback")
        wait_for(lambda: answered_by(client) == versions["r4"])

        # versions that cannot be served as an adapter: refused once, r4 stays
        for refused, label in enumerate(("full", "stacked"), start=1):
            registry.promote(versions[label], reason="test")
            wait_for(lambda n=refused: metric(server, "refused") == n)
            time.sleep(3 * POLL_S)
            assert answered_by(client) == versions["r4"]
        assert [c for c in vllm.calls if c[0] == "load"][-1][1]["lora_name"] == versions[
            "r4"
        ]  # no load was tried for them


def test_an_adapter_the_backend_refuses_keeps_the_service_not_serving_until_it_loads(
    versions: dict[str, str], registry: ModelRegistry, tmp_path: Path
) -> None:
    registry.promote(versions["r8"], reason="test")
    with (
        adapter_stack(versions, wait=False, max_lora_rank=4) as (vllm, server),  # r8: 400
        grpc.insecure_channel(server.address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)

        def status() -> int:
            return int(health.Check(health_pb2.HealthCheckRequest(service="")).status)

        time.sleep(4 * POLL_S)
        assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert metric(server, "failed") >= 2  # tried again (after one poll, then backing off)
        with GenerationClient(server.address) as client:
            with pytest.raises(grpc.RpcError) as caught:
                answered_by(client)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            vllm.max_lora_rank = 16  # the operator raises --max-lora-rank
            wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING)
            assert answered_by(client) == versions["r8"]


def test_the_backend_gets_the_adapter_path_as_it_sees_the_registry(
    versions: dict[str, str], registry: ModelRegistry
) -> None:
    registry.promote(versions["r4"], reason="test")
    with adapter_stack(versions, wait=False, backend_adapter_root="/mnt/registry/versions/") as (
        vllm,
        server,
    ):
        wait_for(lambda: any(call[0] == "load" for call in vllm.calls))
        load = next(body for verb, body in vllm.calls if verb == "load")
        assert load == {
            "lora_name": versions["r4"],
            "lora_path": f"/mnt/registry/versions/{versions['r4']}/adapter",
        }  # no such folder here: 404, so the service does not serve yet
        wait_for(lambda: metric(server, "failed") >= 1)
        with GenerationClient(server.address) as client, pytest.raises(grpc.RpcError) as e:
            answered_by(client)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not loaded at the backend yet" in str(e.value.details())


def test_adapters_of_another_base_are_refused_and_the_base_serves(
    versions: dict[str, str], registry: ModelRegistry
) -> None:
    registry.promote(versions["r4"], reason="test")
    with adapter_stack(versions, backend_adapter_base="another-base") as (vllm, server):
        with GenerationClient(server.address) as client:
            assert answered_by(client) == BASE
        assert metric(server, "refused") == 1 and not vllm.loaded


def test_an_unreadable_registry_at_start_is_not_serving_until_it_reads(
    versions: dict[str, str], registry: ModelRegistry
) -> None:
    registry.promote(versions["r4"], reason="test")
    pointer = Path(versions["root"]) / "policy" / "promoted.json"
    good = pointer.read_bytes()
    pointer.write_text("{torn")
    with adapter_stack(versions, wait=False) as (vllm, server):
        time.sleep(3 * POLL_S)
        with GenerationClient(server.address) as client:
            with pytest.raises(grpc.RpcError) as caught:
                answered_by(client)  # not the base model while a policy may be promoted
            assert "registry cannot be read" in str(caught.value.details())
            pointer.write_bytes(good)
            wait_for(lambda: vllm.loaded.keys() == {versions["r4"]})
            wait_for(lambda: answered_by(client) == versions["r4"])


def test_registry_show_names_the_adapter(
    versions: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["registry", "show", versions["stacked"], "--kind", "policy"]
    assert main([*args, "--registry", versions["root"], "--log-level", "WARNING"]) == 0
    shown = capsys.readouterr().out
    assert "LoRA adapter" in shown
    assert "adapter/ (rank 4 on tiny-base, trained over policy policy-x)" in shown


def test_adapters_need_the_openai_backend() -> None:
    with pytest.raises(ValidationError, match="backend_adapters"):
        GenerationSettings(backend_adapters="vllm")


def test_a_manifest_naming_an_unlisted_adapter_is_refused(
    versions: dict[str, str], registry: ModelRegistry
) -> None:
    manifest = registry.manifest(versions["r4"])
    assert manifest.lora_adapter is not None
    files = {k: v for k, v in manifest.files.items() if k != "adapter/adapter_model.safetensors"}
    with pytest.raises(FailedPreconditionError, match=r"adapter_model\.safetensors"):
        check_manifest_paths(manifest.version, manifest.model_copy(update={"files": files}))
    outside = manifest.model_copy(
        update={"lora_adapter": manifest.lora_adapter.model_copy(update={"path": "../x"})}
    )
    with pytest.raises(FailedPreconditionError, match="escapes"):
        check_manifest_paths(manifest.version, outside)
