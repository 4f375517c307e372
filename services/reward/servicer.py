"""gRPC servicer for plaudit.v1.RewardService: one call into :class:`~plaudit.services.reward.
core.RewardCore` per RPC (the HTTP front end calls the same core).

Validation raises InvalidArgumentError naming the field and its limit; the interceptor turns
every domain error into its status.
"""

from __future__ import annotations

import grpc

from plaudit.services.reward.core import RewardCore
from plaudit.v1 import reward_pb2, reward_pb2_grpc


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, core: RewardCore) -> None:
        self._core = core

    async def Score(
        self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> reward_pb2.ScoreResponse:
        return await self._core.score(request, context.time_remaining())

    async def Compare(
        self, request: reward_pb2.CompareRequest, context: grpc.aio.ServicerContext
    ) -> reward_pb2.CompareResponse:
        return await self._core.compare(request, context.time_remaining())

    async def GetModel(
        self, request: reward_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> reward_pb2.GetModelResponse:
        return self._core.get_model(request.model)
