"""Scoring candidates with the reward service (``RewardService.Score``) for rerank requests."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from plaudit.v1 import reward_pb2, reward_pb2_grpc

from services.common.errors import (
    FailedPreconditionError,
    ResourceExhaustedError,
    UnavailableError,
)
from services.common.security import INSECURE, ClientCredentials

_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class RewardScorer:
    """An async channel to the reward service; errors become domain errors."""

    def __init__(
        self, address: str, timeout_s: float, *, credentials: ClientCredentials = INSECURE
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = credentials.aio_channel(address)  # API key and TLS when configured
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)

    async def score(
        self, prompt: str, completions: Sequence[str], timeout: float | None = None
    ) -> tuple[list[float], str]:
        """Rewards of ``completions`` in order (the reward model's default normalisation) and
        the reward model version; UNAVAILABLE when the reward service cannot answer."""
        request = reward_pb2.ScoreRequest(
            items=[reward_pb2.ScoreItem(prompt=prompt, completion=c) for c in completions]
        )
        limit = self.timeout_s if timeout is None else min(timeout, self.timeout_s)
        try:
            reply = await self._stub.Score(request, timeout=limit)
        except grpc.aio.AioRpcError as exc:
            message = f"reward service at {self.address}: {exc.code().name}: {exc.details()}"
            if exc.code() in _UNAVAILABLE:
                raise UnavailableError(message) from exc
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise ResourceExhaustedError(message) from exc
            raise FailedPreconditionError(message) from exc
        return list(reply.rewards), reply.model_version

    async def close(self) -> None:
        await self._channel.close()
