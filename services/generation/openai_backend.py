"""Generation on an OpenAI-compatible server (``--backend openai``): vLLM, TGI, llama.cpp's server.

Plaudit keeps its API (gRPC and the OpenAI-style routes), validation, limits, auth, metrics and
rerank; only sampling moves. Each of a job's ``n`` completions is one request to the backend with
``n: 1``, sent concurrently: every server honours that (llama.cpp's ignores ``n``), and each
completion gets its own token count.

* Input, as Plaudit's engine renders it (:class:`~plaudit.services.common.textfmt.PromptFormatter`):
  with ``backend_text_format`` ``chat_template`` (the default, for chat models) a conversation, or
  a prompt split into turns by :func:`~plaudit.services.common.textfmt.dialogue_to_messages`, goes
  to ``/v1/chat/completions`` and the backend's chat template renders it; with ``plain`` (base
  models) the prompt, or a conversation as an HH-style dialogue, goes to ``/v1/completions`` as
  text.

* Sampling: ``temperature``, ``top_p``, ``max_tokens`` (a request's ``max_new_tokens``, else the
  service's ``max_new_tokens``), ``stop``, ``top_k`` when set (an extension vLLM and llama.cpp
  read), ``seed`` (completion ``k`` of a request with seed ``s`` asks for ``s + k``).
* Finish reasons: ``length`` -> LENGTH; ``stop`` -> STOP_STRING when the backend's
  ``stop_reason`` (vLLM) is a string, EOS when it is a token id or null; a backend that does not
  say (llama.cpp, TGI) is taken to have stopped on a stop string when the request had any, else
  on end-of-sequence.
* Token counts: the backend's ``usage`` (a stream without usage: one token per text chunk, and
  0 prompt tokens). Token ids are not known (the gRPC ``token_ids`` are empty).
* Version: what the backend answers in ``model`` (the id ``/v1/models`` lists). With
  ``--backend-adapters vllm`` the registry's promoted policy is loaded as a LoRA adapter named
  by its version, and requests name it (:mod:`.adapters`).
* Streaming: a job with a sink is streamed from the backend (``stream: true``), text handed on
  chunk by chunk.
* Health: ``/v1/models`` is probed every ``backend_poll_s``; the service is SERVING only while
  the backend answers and lists the model, and a request that cannot reach the backend turns it
  NOT_SERVING at once.
* Errors: unreachable, 5xx or no answer in time -> UNAVAILABLE (DEADLINE_EXCEEDED when the
  client's deadline ran out); 400/413/422 -> INVALID_ARGUMENT naming the backend's ``param`` (else
  the input); 429 -> RESOURCE_EXHAUSTED; 404 (no such model) -> FAILED_PRECONDITION. At most
  ``max_queue_items`` completions are in flight; more are refused with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from plaudit.services.common.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    PlauditError,
    ResourceExhaustedError,
    UnavailableError,
)
from plaudit.services.common.textfmt import dialogue_to_messages, messages_to_dialogue
from plaudit.services.generation.adapters import AdapterFollower, Outcome
from plaudit.services.generation.backend import LiveVersion
from plaudit.services.generation.settings import GenerationSettings
from plaudit.services.runtime.policy_model import (
    Candidate,
    FinishReason,
    GenerateJob,
    GenerateResult,
)

log = logging.getLogger(__name__)

OnChange = Callable[[LiveVersion | None], Awaitable[None]]
_SEEDS = 2**63  # seeds sent stay within a signed 64-bit integer


def finish_reason(choice: dict[str, Any], job: GenerateJob) -> FinishReason:
    """The domain's finish reason of a backend choice (see the module doc)."""
    reason = choice.get("finish_reason")
    if reason == "length":
        return FinishReason.LENGTH
    if reason == "stop":
        if "stop_reason" in choice:  # vLLM: the stop string, a stop token id, or null (EOS)
            return (
                FinishReason.STOP_STRING
                if isinstance(choice["stop_reason"], str)
                else FinishReason.EOS
            )
        return FinishReason.STOP_STRING if job.params.stop else FinishReason.EOS
    return FinishReason.EOS


def backend_error(status: int, text: str, job: GenerateJob) -> PlauditError:
    """The domain error of a backend's non-200 answer."""
    message, param = text.strip()[:500], None
    with contextlib.suppress(ValueError, AttributeError):
        body = json.loads(text)
        error = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(error, dict):
            message = str(error.get("message") or error.get("detail") or error)[:500]
            param = error.get("param")
    if status in (400, 413, 422):
        field = param if isinstance(param, str) and param else None
        field = field or ("conversation" if job.messages is not None else "prompt")
        return InvalidArgumentError(field, f"the backend refused it: {message}")
    if status == 404:
        return FailedPreconditionError(f"the backend has no such model: {message}")
    if status == 429:
        return ResourceExhaustedError(f"the backend is overloaded: {message}")
    return UnavailableError(f"the backend answered HTTP {status}: {message}")


class OpenAIBackend:
    """A :class:`~plaudit.services.generation.backend.GenerationBackend` over HTTP (see the module
    doc). :meth:`start` and :meth:`close` run on the service's event loop; ``on_change`` is
    awaited whenever the live version changes (None: the backend cannot answer)."""

    def __init__(
        self,
        settings: GenerationSettings,
        on_change: OnChange,
        adapter_outcome: Outcome = lambda _: None,
    ) -> None:
        self._settings = settings
        self.adapters = (
            AdapterFollower(
                settings.model_registry("policy"),
                adapter_root=settings.backend_adapter_root,
                poll_s=settings.backend_poll_s,
                unload_grace_s=settings.backend_adapter_unload_grace_s,
                expected_base=settings.backend_adapter_base,
                outcome=adapter_outcome,
            )
            if settings.backend_adapters == "vllm"
            else None
        )
        self._url = settings.backend_url
        self.chat = settings.backend_text_format == "chat_template"
        self._on_change = on_change
        self._headers = (
            {"Authorization": f"Bearer {settings.backend_api_key}"}
            if settings.backend_api_key
            else {}
        )
        self._session: aiohttp.ClientSession | None = None
        self._live: LiveVersion | None = None
        self._ready = asyncio.Event()
        self._probing: asyncio.Task[None] | None = None
        self._in_flight = 0

    @property
    def url(self) -> str:
        return self._url

    # -- lifecycle and health --------------------------------------------------------------------
    async def start(self) -> None:
        """Probe once, then keep probing every ``backend_poll_s``."""
        self._session = aiohttp.ClientSession(headers=self._headers)
        await self.probe()
        self._probing = asyncio.get_running_loop().create_task(self._probe_forever())

    async def stop_probing(self) -> None:
        """No more probes (so health is left to a shutdown); requests still go through."""
        if self._probing is not None:
            self._probing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probing
            self._probing = None

    async def close(self) -> None:
        await self.stop_probing()
        if self._session is not None:
            await self._session.close()

    async def wait_ready(self, timeout: float) -> None:
        """Return once the backend has answered a probe; raise TimeoutError after ``timeout``."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    def live(self) -> LiveVersion | None:
        return self._live

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.backend_poll_s)
            try:
                await self.probe()
            except Exception:  # an unforeseen answer must not stop the probing (health)
                log.exception("backend probe failed")
                await self._set_live(None, "the last probe failed unexpectedly")

    async def probe(self) -> None:
        """With adapters, follow the registry first (:meth:`AdapterFollower.sync`); then
        ``GET /v1/models``: live when the backend answers and lists the model (the adapter in
        use, else the one asked for, else its first)."""
        assert self._session is not None
        wait = aiohttp.ClientTimeout(total=max(5.0, self._settings.backend_poll_s))
        if self.adapters is not None:
            await self.adapters.sync(self._session, self._url, self._settings.backend_timeout_s)
            if self.adapters.blocked is not None:
                await self._set_live(None, self.adapters.blocked)
                return
        try:
            async with self._session.get(self._url + "/v1/models", timeout=wait) as reply:
                if reply.status != 200:
                    raise UnavailableError(f"/v1/models answered HTTP {reply.status}")
                body = await reply.json(content_type=None)
            models = [m for m in body.get("data", []) if isinstance(m, dict) and "id" in m]
            ids = [str(m["id"]) for m in models]
            if self.adapters is not None:
                self.adapters.listed(ids)
            name = self._model_name() or (ids[0] if ids else "")
            if name not in ids:
                raise UnavailableError(f"the backend lists no model {name!r} (it has {ids})")
            entry = models[ids.index(name)]
            created = entry.get("created")
            live = LiveVersion(
                name,
                created if isinstance(created, int) else 0,
                str(entry.get("owned_by") or "backend"),
            )
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, UnavailableError) as exc:
            await self._set_live(None, f"{type(exc).__name__}: {exc}")
            return
        await self._set_live(live)

    async def _set_live(self, live: LiveVersion | None, why: str = "") -> None:
        if live == self._live:
            return
        self._live = live
        if live is None:
            log.warning("generation backend not serving", extra={"url": self._url, "why": why})
        else:
            log.info("generation backend serving", extra={"url": self._url, "model": live.version})
            self._ready.set()
        await self._on_change(live)

    # -- generation ------------------------------------------------------------------------------
    async def generate(
        self, job: GenerateJob, size: int, timeout: float | None = None
    ) -> GenerateResult:
        """Each completion one backend request, all at once; the first failure cancels the rest
        and is raised as its domain error."""
        if self._session is None:
            raise UnavailableError("the generation backend is not started")
        if self._in_flight + job.n > self._settings.max_queue_items:
            raise ResourceExhaustedError(
                f"{self._in_flight} completions in flight at the backend (limit "
                f"{self._settings.max_queue_items}); retry later"
            )
        if self.adapters is not None and self.adapters.blocked is not None:
            raise UnavailableError(self.adapters.blocked)
        live = self._live
        name = live.version if live is not None else self._model_name()
        if not name:
            raise UnavailableError(f"the generation backend at {self._url} has not answered yet")
        started: list[bool] = []
        seconds = timeout if timeout is not None else self._settings.backend_timeout_s
        self._in_flight += job.n
        if self.adapters is not None:
            self.adapters.enter(name)
        tasks = [asyncio.ensure_future(self._one(job, k, name, started)) for k in range(job.n)]
        try:
            async with asyncio.timeout(seconds):
                answers = await asyncio.gather(*tasks)
        except TimeoutError:
            if timeout is not None:
                raise DeadlineExceededError(
                    f"the backend did not finish within the deadline ({seconds:.1f} s)"
                ) from None
            raise UnavailableError(
                f"the backend did not answer within backend_timeout_s ({seconds} s)"
            ) from None
        finally:
            self._in_flight -= job.n
            if self.adapters is not None:
                self.adapters.leave(name)
            for task in tasks:
                task.cancel()
        return GenerateResult(
            [candidate for candidate, _, _ in answers], answers[0][2], answers[0][1]
        )

    def _model_name(self) -> str:
        """The model requests name: the adapter in use, else ``backend_model`` ('' = any)."""
        if self.adapters is not None and self.adapters.model is not None:
            return self.adapters.model
        return self._settings.backend_model

    def _body(self, job: GenerateJob, k: int, name: str) -> dict[str, Any]:
        p = job.params
        body: dict[str, Any] = {
            "model": name,
            "n": 1,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "max_tokens": p.max_new_tokens or self._settings.max_new_tokens,
        }
        if p.top_k:
            body["top_k"] = p.top_k
        if p.stop:
            body["stop"] = list(p.stop)
        if p.seed is not None:
            body["seed"] = (p.seed + k) % _SEEDS
        if self.chat:
            turns = job.messages
            body["messages"] = (
                [dict(m) for m in turns]
                if turns is not None
                else dialogue_to_messages(job.prompt or "")
            )
        else:
            body["prompt"] = (
                job.prompt if job.prompt is not None else messages_to_dialogue(job.messages or ())
            )
        if job.sink is not None:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def _one(
        self, job: GenerateJob, k: int, name: str, started: list[bool]
    ) -> tuple[Candidate, int, str]:
        """Completion ``k`` of ``job``: (candidate, prompt tokens, version)."""
        assert self._session is not None
        chat = self.chat
        path = "/v1/chat/completions" if chat else "/v1/completions"
        try:
            async with self._session.post(self._url + path, json=self._body(job, k, name)) as reply:
                if reply.status != 200:
                    raise backend_error(reply.status, await reply.text(), job)
                if job.sink is None:
                    body = await reply.json(content_type=None)
                    return self._answer(body, job, chat, name)
                if not started:
                    started.append(True)
                    job.sink.started(name)
                return await self._stream(reply, job, k, chat, name)
        except (aiohttp.ClientConnectionError, OSError) as exc:
            await self._set_live(None, f"{type(exc).__name__}: {exc}")
            raise UnavailableError(
                f"the generation backend at {self._url} cannot be reached: {exc}"
            ) from exc
        except (aiohttp.ClientError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise UnavailableError(
                f"the generation backend answered something unreadable: {type(exc).__name__}: {exc}"
            ) from exc

    @staticmethod
    def _answer(
        body: dict[str, Any], job: GenerateJob, chat: bool, name: str
    ) -> tuple[Candidate, int, str]:
        choice = body["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        usage = body.get("usage") or {}
        candidate = Candidate(
            str(text or ""), [], finish_reason(choice, job), int(usage.get("completion_tokens", 0))
        )
        return candidate, int(usage.get("prompt_tokens", 0)), str(body.get("model") or name)

    @staticmethod
    async def _stream(
        reply: aiohttp.ClientResponse, job: GenerateJob, k: int, chat: bool, name: str
    ) -> tuple[Candidate, int, str]:
        """Read server-sent events, handing each text delta to the job's sink."""
        assert job.sink is not None
        parts: list[str] = []
        last: dict[str, Any] = {}
        usage: dict[str, Any] = {}
        version = name
        pending = b""
        done = False
        async for data in reply.content.iter_any():
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                event = json.loads(payload)
                if event.get("error"):
                    raise UnavailableError(f"the backend's stream failed: {event['error']}")
                version = str(event.get("model") or version)
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    delta = (
                        (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    )
                    if delta:
                        parts.append(delta)
                        job.sink.text(k, delta)
                    if choice.get("finish_reason"):
                        last = choice
            if done:
                break
        if not last:
            raise UnavailableError("the backend's stream ended before its finish reason")
        count = int(usage.get("completion_tokens", len(parts)))
        candidate = Candidate("".join(parts), [], finish_reason(last, job), count)
        return candidate, int(usage.get("prompt_tokens", 0)), version
