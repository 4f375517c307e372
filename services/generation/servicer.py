"""gRPC servicer for plaudit.v1.GenerationService: proto -> job (validated by
:func:`~plaudit.services.generation.core.request_job`), one batched generation
(:class:`~plaudit.services.generation.core.GenerationCore`), optional rerank by the reward
service, job -> proto.

Validation raises InvalidArgumentError naming the field and its limit; the interceptor turns
every domain error into its status.
"""

from __future__ import annotations

import grpc

from plaudit.services.common.errors import FailedPreconditionError
from plaudit.services.common.textfmt import messages_to_dialogue
from plaudit.services.generation.core import GenerationCore, request_job
from plaudit.services.generation.settings import GenerationSettings
from plaudit.services.reward.client import AsyncRewardClient, domain_error
from plaudit.services.runtime.policy_model import FinishReason
from plaudit.v1 import generation_pb2, generation_pb2_grpc

_FINISH = {
    FinishReason.EOS: generation_pb2.FINISH_REASON_EOS,
    FinishReason.STOP_STRING: generation_pb2.FINISH_REASON_STOP_STRING,
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
}


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(
        self, core: GenerationCore, settings: GenerationSettings, reward: AsyncRewardClient | None
    ) -> None:
        self._core = core
        self._settings = settings
        self._metrics = core.metrics
        self._reward = reward

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.GenerateResponse:
        job, size = request_job(request, self._settings)
        if request.rerank and self._reward is None:
            raise FailedPreconditionError(
                "rerank: no reward service is configured (start with --reward-addr)"
            )
        outcome = await self._core.generate(job, size, context.time_remaining())

        completions = [
            generation_pb2.Completion(
                text=c.text,
                token_count=c.token_count,
                finish_reason=_FINISH[c.finish_reason],
                token_ids=c.token_ids,
            )
            for c in outcome.completions
        ]
        reward_version = ""
        if request.rerank:
            assert self._reward is not None
            prompt = (
                job.prompt if job.prompt is not None else messages_to_dialogue(job.messages or ())
            )
            texts = [c.text for c in completions]
            try:
                rewards, reward_version = await self._reward.score(
                    [prompt] * len(texts),
                    texts,
                    timeout=context.time_remaining(),
                    model=self._settings.reward_model,
                    objective=self._settings.reward_objective,
                )
            except grpc.aio.AioRpcError as exc:
                raise domain_error(self._reward.address, exc) from exc
            for completion, reward in zip(completions, rewards, strict=True):
                completion.reward = reward
            completions.sort(key=lambda c: -c.reward)  # stable: ties keep sampling order
            self._metrics.reranked.inc()
        return generation_pb2.GenerateResponse(
            completions=completions,
            model_version=outcome.version,
            reward_model_version=reward_version,
            prompt_tokens=outcome.prompt_tokens,
        )
