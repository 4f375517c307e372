"""plaudit.v1.AdminService: an immediate registry check for model-serving processes."""

from __future__ import annotations

from typing import Any

import grpc

from plaudit.services.common.hotswap import ModelWatcher
from plaudit.services.common.security.client import INSECURE, ClientCredentials
from plaudit.services.common.security.guard import CallRoles
from plaudit.v1 import admin_pb2, admin_pb2_grpc

CALL_ROLES: CallRoles = {"/plaudit.v1.AdminService/ReloadModel": "admin"}
"""Only ``admin`` reloads; a model-serving process adds this to its own service's table."""


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, watcher: ModelWatcher[Any]) -> None:
        self._watcher = watcher

    async def ReloadModel(
        self, request: admin_pb2.ReloadModelRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ReloadModelResponse:
        outcome = await self._watcher.check()
        return admin_pb2.ReloadModelResponse(
            live_version=outcome.live_version or "",
            promoted_version=outcome.promoted_version or "",
            swapped=outcome.swapped,
            last_swap_error=outcome.error,
        )


def notify_reload(
    address: str, timeout: float = 300.0, credentials: ClientCredentials = INSECURE
) -> admin_pb2.ReloadModelResponse:
    """Ask a serving process at ``address`` to pick up the registry's promoted version now
    (its API key needs the ``admin`` role)."""
    with credentials.channel(address) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        return stub.ReloadModel(admin_pb2.ReloadModelRequest(), timeout=timeout)
