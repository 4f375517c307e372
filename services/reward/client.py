"""The reward service's clients: :class:`RewardClient` (blocking: the CLI, the demo, the
benchmark, the trainer) and :class:`AsyncRewardClient` (grpc.aio: generation rerank, feedback
active learning). Both carry the caller's API key and TLS files (``credentials``); both raise the
server's ``grpc.RpcError``, and :func:`domain_error` maps one to a Plaudit error."""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plaudit.services.common.errors import (
    FailedPreconditionError,
    PlauditError,
    ResourceExhaustedError,
    UnavailableError,
)
from plaudit.services.common.security.client import INSECURE, ClientCredentials
from plaudit.v1 import reward_pb2, reward_pb2_grpc

_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def score_request(
    prompts: Sequence[str],
    completions: Sequence[str],
    normalization: reward_pb2.Normalization = reward_pb2.NORMALIZATION_UNSPECIFIED,
) -> reward_pb2.ScoreRequest:
    """One ``Score`` request of (prompt, completion) pairs, in order."""
    items = [
        reward_pb2.ScoreItem(prompt=p, completion=c)
        for p, c in zip(prompts, completions, strict=True)
    ]
    return reward_pb2.ScoreRequest(items=items, normalization=normalization)


def domain_error(address: str, exc: grpc.RpcError) -> PlauditError:
    """The Plaudit error a failed reward call becomes for a service that relays it:
    UNAVAILABLE when the reward service cannot answer in time, RESOURCE_EXHAUSTED when it is
    overloaded, FAILED_PRECONDITION otherwise."""
    code, details = exc.code(), exc.details()
    message = f"reward service at {address}: {code.name}: {details}"
    if code in _UNAVAILABLE:
        return UnavailableError(message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhaustedError(message)
    return FailedPreconditionError(message)


def wait_until_serving(
    address: str,
    timeout: float = 120.0,
    service: str = "",
    credentials: ClientCredentials = INSECURE,
) -> None:
    """Block until the server's health check says SERVING (raise TimeoutError otherwise).

    Health needs no API key; ``credentials`` matter for a TLS server.
    """
    deadline = time.monotonic() + timeout
    with credentials.channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} did not report SERVING within {timeout:.0f}s")


class RewardClient:
    """Blocking client: ``score`` and ``compare`` return plain Python values.

    ``credentials`` carry the API key (role ``score``) and TLS files, if the server wants them.
    """

    def __init__(self, address: str, credentials: ClientCredentials = INSECURE) -> None:
        self.channel = credentials.channel(address)
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        timeout: float = 60.0,
        normalization: reward_pb2.Normalization = reward_pb2.NORMALIZATION_UNSPECIFIED,
    ) -> tuple[list[float], str]:
        """Rewards in order and the reward-model version that gave them."""
        request = score_request(prompts, completions, normalization)
        reply = self.stub.Score(request, timeout=timeout)
        return list(reply.rewards), reply.model_version

    def compare(
        self, prompt: str, a: str, b: str, timeout: float = 60.0
    ) -> reward_pb2.CompareResponse:
        return self.stub.Compare(
            reward_pb2.CompareRequest(prompt=prompt, completion_a=a, completion_b=b),
            timeout=timeout,
        )

    def model(self) -> reward_pb2.GetModelResponse:
        return self.stub.GetModel(reward_pb2.GetModelRequest(), timeout=10)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRewardClient:
    """grpc.aio client (make it inside the loop that uses it); ``timeout_s`` caps every call."""

    def __init__(
        self, address: str, timeout_s: float = 60.0, *, credentials: ClientCredentials = INSECURE
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = credentials.aio_channel(address)
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)

    async def score(
        self, prompts: Sequence[str], completions: Sequence[str], timeout: float | None = None
    ) -> tuple[list[float], str]:
        """Rewards in order (the version's default normalisation) and the reward-model version;
        ``timeout`` (e.g. the caller's own deadline) can only shorten ``timeout_s``."""
        limit = self.timeout_s if timeout is None else min(timeout, self.timeout_s)
        reply = await self._stub.Score(score_request(prompts, completions), timeout=limit)
        return list(reply.rewards), reply.model_version

    async def close(self) -> None:
        await self._channel.close()
