"""The generation service's core, shared by gRPC (:mod:`.servicer`) and HTTP (:mod:`.http`):
request validation (a :class:`~plaudit.v1.generation_pb2.GenerateRequest` -> a checked
:class:`~plaudit.services.runtime.policy_model.GenerateJob`) and one generation on the backend
(:mod:`.backend`: Plaudit's engine, batched and hot-swapped, or an OpenAI-compatible server), so
both front ends share it.

Validation raises InvalidArgumentError naming the field (in the proto's terms) and its limit.
"""

from __future__ import annotations

import dataclasses
import math
import time

from plaudit.services.common.errors import InvalidArgumentError
from plaudit.services.generation.backend import GenerationBackend
from plaudit.services.generation.metrics import GenerationMetrics
from plaudit.services.generation.settings import GenerationSettings
from plaudit.services.runtime.policy_model import (
    GenerateJob,
    GenerateResult,
    SamplingParams,
    StreamSink,
)
from plaudit.v1 import generation_pb2

ROLES = ("system", "user", "assistant")
MESSAGE_OVERHEAD_BYTES = 16
"""What one conversation message costs beyond its content: its role and the chat template's
tokens around it, counted against ``max_prompt_bytes`` (security.md, "Generation messages")."""


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def sampling_params(
    sampling: generation_pb2.SamplingParams, settings: GenerationSettings
) -> SamplingParams:
    """Validated sampling parameters (unset temperature and top_p mean 1.0)."""
    temperature = sampling.temperature if sampling.HasField("temperature") else 1.0
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InvalidArgumentError("sampling.temperature", f"{temperature} is not >= 0")
    top_p = sampling.top_p if sampling.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidArgumentError("sampling.top_p", f"{top_p} is outside (0, 1]")
    if sampling.max_new_tokens > settings.max_new_tokens:
        raise InvalidArgumentError(
            "sampling.max_new_tokens",
            f"{sampling.max_new_tokens} exceeds the limit of {settings.max_new_tokens}",
        )
    if len(sampling.stop) > settings.max_stop_strings:
        raise InvalidArgumentError(
            "sampling.stop", f"{len(sampling.stop)} strings exceed the limit of "
            f"{settings.max_stop_strings}",
        )  # fmt: skip
    for i, stop in enumerate(sampling.stop):
        if not stop:
            raise InvalidArgumentError(f"sampling.stop[{i}]", "must not be empty")
        if _size(stop) > settings.max_stop_bytes:
            raise InvalidArgumentError(
                f"sampling.stop[{i}]", f"exceeds the limit of {settings.max_stop_bytes} bytes"
            )
    return SamplingParams(
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=sampling.top_k,
        max_new_tokens=sampling.max_new_tokens,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(sampling.stop),
    )


def request_job(
    request: generation_pb2.GenerateRequest, settings: GenerationSettings
) -> tuple[GenerateJob, int]:
    """The validated job and the UTF-8 size of its input (a conversation's messages count
    :data:`MESSAGE_OVERHEAD_BYTES` each on top of their contents)."""
    which = request.WhichOneof("input")
    limit = settings.max_prompt_bytes
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    if which is None:
        raise InvalidArgumentError("prompt", "give a prompt or a conversation")
    if which == "prompt":
        if not request.prompt:
            raise InvalidArgumentError("prompt", "must not be empty")
        prompt, size = request.prompt, _size(request.prompt)
        if size > limit:
            raise InvalidArgumentError("prompt", f"{size} bytes exceeds the limit of {limit}")
    else:
        turns = request.conversation.messages
        if not turns:
            raise InvalidArgumentError("conversation.messages", "at least one message")
        if len(turns) > settings.max_messages:  # before anything walks them
            raise InvalidArgumentError(
                "conversation.messages",
                f"{len(turns)} messages exceed the limit of {settings.max_messages}",
            )
        for i, turn in enumerate(turns):
            if turn.role not in ROLES:
                raise InvalidArgumentError(
                    f"conversation.messages[{i}].role",
                    f"{turn.role!r} is not one of {', '.join(ROLES)}",
                )
        messages = tuple({"role": t.role, "content": t.content} for t in turns)
        size = sum(_size(t.content) + MESSAGE_OVERHEAD_BYTES for t in turns)
        if size > limit:
            raise InvalidArgumentError("conversation", f"{size} bytes exceeds the limit of {limit}")
    n = request.n or 1
    if n > settings.max_n:
        raise InvalidArgumentError("n", f"{n} exceeds the limit of {settings.max_n}")
    params = sampling_params(request.sampling, settings)
    return GenerateJob(prompt=prompt, messages=messages, n=n, params=params), size


class GenerationCore:
    """One call = one job on the backend (see :mod:`.backend`), counted in the metrics."""

    def __init__(
        self,
        backend: GenerationBackend,
        settings: GenerationSettings,
        metrics: GenerationMetrics,
    ) -> None:
        self.backend = backend
        self._settings = settings
        self.metrics = metrics

    async def generate(
        self,
        job: GenerateJob,
        size: int,
        timeout: float | None = None,
        sink: StreamSink | None = None,
    ) -> GenerateResult:
        """The job's completions (``size``: the UTF-8 bytes of its input, for batch budgeting;
        ``sink``: receives the text while it is generated); raises the domain error of a refused
        job (UNAVAILABLE while no policy can answer)."""
        if sink is not None:
            job = dataclasses.replace(job, sink=sink)
        arrived = time.monotonic()
        outcome = await self.backend.generate(job, size, timeout)
        self._observe_timing(outcome, arrived, job.n)
        self.metrics.prompt_tokens.inc(outcome.prompt_tokens)
        self.metrics.tokens_generated.inc(outcome.generated_tokens)
        for c in outcome.completions:
            self.metrics.completions.labels(c.finish_reason.value).inc()
        return outcome

    def _observe_timing(self, outcome: GenerateResult, arrived: float, n: int) -> None:
        """Time to first token and the decode rate, where the backend timed them."""
        first, last = outcome.first_token_at, outcome.finished_at
        if first is None:
            return
        self.metrics.time_to_first_token.observe(max(0.0, first - arrived))
        after_first = outcome.generated_tokens - n
        if last is not None and last > first and after_first > 0:
            self.metrics.request_tokens_per_second.observe(after_first / (last - first))
