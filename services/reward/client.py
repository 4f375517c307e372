"""A small client for the reward service (used by the CLI, the demo and the benchmark)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from plaudit.v1 import reward_pb2, reward_pb2_grpc

from services.common.security import INSECURE, ClientCredentials


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
        request = reward_pb2.ScoreRequest(
            items=[
                reward_pb2.ScoreItem(prompt=p, completion=c)
                for p, c in zip(prompts, completions, strict=True)
            ],
            normalization=normalization,
        )
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
